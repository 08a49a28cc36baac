"""External confidence on the real default model (README, "External confidence"): fp and the default recipe's first
variants, the probe fitted on the fit split of one source and compared with the internal confidence on its report
split, with the evaluation's bootstrap intervals, by the very functions `calq run` calls (quant.checks.probing).

    python benchmarks/bench_probe.py next_sentence --report-items 24     # what the README's table was measured with
    python benchmarks/bench_probe.py mmlu --per-subject 1 --fit-items 57

Variants are quantized without the pipeline's other stages (no statistics: `--variants 1` is W8A8 min-max, which
needs none; `--variants 2` adds AWQ, which collects statistics on `--samples` calibration samples first). Prints
one markdown table and writes it, with the raw numbers, to --out (default runs/bench-probe-<source>.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import calq_kernels as kernels

from quant.calibrate import collect_stats
from quant.checks.evaluation import MMLUConfig, reduce, stratified_items, collect_mmlu
from quant.checks.probing import fit_probes, probe_report
from quant.checks.tasks import collect_tasks
from quant.confidence.probe import ProbeConfig
from quant.data import load_mmlu, select_samples
from quant.data.tasks import load_task
from quant.files import write_text_atomic
from quant.methods import quantize_variant
from quant.models import load_model
from quant.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("AUROC", "auroc"), ("ECE", "ece"), ("acc. at conf >= 0.75", "selective_accuracy"),
        ("coverage at conf >= 0.75", "selective_coverage"))


def table(out: dict) -> str:
    est = lambda e: f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"  # noqa: E731
    lines = ["| model | confidence | " + " | ".join(label for label, _ in ROWS) + " |", "|---|---|" + "---|" * len(ROWS)]
    for name, rows in out["models"].items():
        for row in ("internal", "probe", "combined"):
            lines.append(f"| {name} | {row} | " + " | ".join(est(rows[row][k]) for _, k in ROWS) + " |")
        lines.append(f"| {name} | probe - internal (paired) | " + " | ".join(
            est(rows["change"]["probe"][k]) for _, k in ROWS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="mmlu or next_sentence")
    p.add_argument("--variants", type=int, default=1, help="how many of the default recipe's variants (1 or 2)")
    p.add_argument("--report-items", type=int, default=None, help="cap on the reported items (task source)")
    p.add_argument("--per-subject", type=int, default=2, help="MMLU report items per subject")
    p.add_argument("--fit-items", type=int, default=256)
    p.add_argument("--samples", type=int, default=128, help="calibration samples for AWQ's statistics")
    p.add_argument("--signals", nargs="+", default=["max_prob", "entropy", "margin", "hidden"])
    p.add_argument("--kind", default="logistic")
    p.add_argument("--C", type=float, default=0.05)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    t0 = time.perf_counter()
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    model, tok = load_model(recipe.model)
    models = {"fp": model}
    specs = recipe.quantize[:args.variants]
    stats = samples = None
    if any(s.method != "minmax" for s in specs):
        samples = select_samples(tok, recipe.calibration.model_copy(update={"num_samples": args.samples})).token_ids
        stats = collect_stats(model, samples)
    for spec in specs:
        models[spec.name] = quantize_variant(model, spec, stats, samples).model
    quantized_s = time.perf_counter() - t0
    cfg = ProbeConfig(source=args.source, signals=tuple(args.signals), kind=args.kind, C=args.C,
                      fit_items=args.fit_items)
    ev = recipe.evaluation
    if args.source == "mmlu":
        ev = ev.model_copy(update={"tasks": (), "mmlu": MMLUConfig(**{**ev.mmlu.model_dump(),
                                                                     "per_subject": args.per_subject})})
    else:
        task = next(t for t in ev.tasks if t.name == args.source).model_copy(update={"max_items": args.report_items})
        ev = ev.model_copy(update={"tasks": (task,), "mmlu": None})
    with kernels.weight_cache(max_bytes=int(ev.weight_cache_gb * 2**30)):
        t1 = time.perf_counter()
        probes = fit_probes(models, tok, ev, cfg)
        fit_s = time.perf_counter() - t1
        if args.source == "mmlu":
            items = stratified_items(load_mmlu("report"), ev.mmlu.per_subject, ev.mmlu.seed)
            preds = {"mmlu": collect_mmlu(models, tok, items, ev.mmlu)}
        else:
            preds = collect_tasks(models, tok, [load_task(ev.tasks[0])])
        evals = reduce(preds, ev, "fp")
        t2 = time.perf_counter()
        out = probe_report(models, tok, evals, ev, cfg, probes)
        report_s = time.perf_counter() - t2
    out.pop("bands")
    out["seconds"] = {"load_and_quantize": quantized_s, "probe_fit (fit split scored + hidden pass + fit)": fit_s,
                      "probe_report (hidden pass + predict)": report_s, "total": time.perf_counter() - t0}
    md = table(out)
    print(md)
    print(f"fit {out['fit_items']} / report {out['report_items']} items ({out['scoring']}); probe "
          f"{out['probe_ms_per_answer']:.3f} ms per answer, hidden pass {out['hidden_ms_per_answer']:.0f} ms per item "
          f"and model; " + ", ".join(f"{k} {v:.0f} s" for k, v in out["seconds"].items()))
    path = args.out or ROOT / "runs" / f"bench-probe-{args.source}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"args": vars(args) | {"out": str(path)}, **out, "table": md}, indent=1))


if __name__ == "__main__":
    main()
