"""What calibration-sample selection buys: W4 AWQ and GPTQ calibrated on diverse, random and first-N selections.

calq's claim against the peers' random or first-N rows is its diverse selection (quant/data/select.py). This runs
both methods on each strategy's selection at each size, from the same pool and with the same seed, and evaluates
every variant against full precision on held-out text of each calibration domain (Wikipedia, news, reviews: the
evaluation split of the same sources, so first-N, whose rows all come from the pool's first source, is not
favoured by a Wikipedia-only evaluation). The methods see every selected token (`max_tokens` = samples x seq_len,
unless --max-tokens caps it), so the sample count is what changes.

    python benchmarks/selection_study.py --out benchmarks/results/selection_study --seq-len 256   # README's table

Writes results.json (one row per strategy, size, method and evaluation domain, kept across reruns: a row already
there is not recomputed, and the run says how many it reused), selection_study.csv and selection_study.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import calq_kernels as kernels  # noqa: E402
from quant.checks import REFERENCE, EvalConfig, evaluate  # noqa: E402
from quant.checks.evaluation import TextEvalConfig  # noqa: E402
from quant.data import SelectConfig, select_samples  # noqa: E402
from quant.files import write_text_atomic  # noqa: E402
from quant.methods import QuantSpec, quantize_variants  # noqa: E402
from quant.calibrate import Resident  # noqa: E402
from quant.recipe import load_recipe  # noqa: E402
from quant.models import load_model  # noqa: E402

METRICS = ("kl_to_reference", "perplexity", "ece", "top1_agreement")


def key(row: dict) -> tuple:
    return row["strategy"], row["samples"], row["method"], row["domain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/selection_study"))
    parser.add_argument("--recipe", default="recipes/default.yaml", help="model and calibration pool come from it")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--strategies", nargs="+", default=["diverse", "random", "first"])
    parser.add_argument("--methods", nargs="+", default=["awq", "gptq"])
    parser.add_argument("--group-size", type=int, default=128, help="W4A16_ASYM group size (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration window (default: the recipe's)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cap on the tokens the methods see (default: every selected token)")
    parser.add_argument("--domains", nargs="+", default=["wikipedia", "news", "reviews:2"],
                        help="evaluation sources, each with its window count after a colon (default: --windows; the "
                             "packaged reviews have 2 held-out windows of 512 tokens)")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens per domain")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {key(r) for r in rows}
    recipe = load_recipe(args.recipe)
    model, tokenizer = load_model(recipe.model)
    calibration = recipe.calibration.model_copy(update={"seq_len": args.seq_len or recipe.calibration.seq_len})
    domains = dict((d.split(":")[0], int(d.split(":")[1]) if ":" in d else args.windows) for d in args.domains)
    evals = {d: EvalConfig(text=TextEvalConfig(sources=(d,), windows=w), mmlu=None) for d, w in domains.items()}
    reused = 0
    for n in args.sizes:
        for strategy in args.strategies:
            wanted = [(m, d) for m in args.methods for d in domains if (strategy, n, m, d) not in done]
            reused += len(args.methods) * len(domains) - len(wanted)
            if not wanted:
                continue
            t0 = time.perf_counter()
            selection = select_samples(tokenizer, calibration.model_copy(update={"num_samples": n,
                                                                                 "strategy": strategy}))
            tokens = sum(len(t) for t in selection.token_ids)
            budget = min(tokens, args.max_tokens or tokens)
            specs = [QuantSpec.model_validate({"name": m, "scheme": "W4A16_ASYM", "method": m,
                                               "weights": {"group_size": args.group_size},
                                               "options": {"max_tokens": budget}})
                     for m in sorted({m for m, _ in wanted})]
            _, variants = quantize_variants(Resident(model), selection.token_ids, specs)
            seconds = time.perf_counter() - t0
            models = {REFERENCE: model, **{name: v.model for name, v in variants.items()}}
            with kernels.weight_cache(max_bytes=4 * 2**30):
                for domain in sorted({d for _, d in wanted}):
                    result = evaluate(models, tokenizer, evals[domain], REFERENCE)
                    for method in variants:
                        if (method, domain) not in wanted:
                            continue
                        ev = result[method]
                        row = {"strategy": strategy, "samples": n, "method": method, "domain": domain,
                               "tokens_seen": budget, "quantize_seconds": round(seconds, 1),
                               "per_source": selection.per_source,
                               "diversity": selection.diversity["mean_pairwise_distance"],
                               "fp_perplexity": result[REFERENCE].text["perplexity"],
                               "fp_ece": result[REFERENCE].text["ece"]}
                        for m in METRICS:
                            est = ev.intervals[f"text.{m}"]
                            row.update({m: est.value, f"{m}_low": est.low, f"{m}_high": est.high})
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "per_source"}), flush=True)
            write_text_atomic(results_path, json.dumps(rows, indent=1))
    print(f"{reused} rows reused from {results_path}, {len(rows)} in all", flush=True)
    write_table(rows, args.out / "selection_study.csv")
    plot(rows, args.out / "selection_study.png")


def mean_over_domains(rows: list[dict]) -> dict[tuple, dict]:
    """Per strategy, size and method: each metric averaged over the evaluation domains (equal weight)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["samples"], r["method"]), []).append(r)
    return {k: {m: sum(r[m] for r in g) / len(g) for m in METRICS} | {"domains": len(g)} for k, g in groups.items()}


def write_table(rows: list[dict], path: Path) -> None:
    fields = ["strategy", "samples", "method", "domain", "tokens_seen", "quantize_seconds", "diversity",
              *[f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")], "fp_perplexity", "fp_ece"]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=key))
    tmp.replace(path)


def plot(rows: list[dict], path: Path) -> None:
    means = mean_over_domains(rows)
    methods = sorted({k[2] for k in means})
    fig, axes = plt.subplots(len(methods), 3, figsize=(13, 3.6 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, metric in enumerate(("kl_to_reference", "perplexity", "ece")):
            ax = axes[i][j]
            for strategy in sorted({k[0] for k in means}):
                pts = sorted((k[1], v[metric]) for k, v in means.items() if k[0] == strategy and k[2] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("calibration samples")
            ax.set_title(f"W4 {method}: {metric} (mean over domains)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
