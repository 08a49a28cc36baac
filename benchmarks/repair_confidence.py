"""Confidence repair after quantization, compared: no repair, labelled T, label-free T (DACA), dual_align T and a
step along the calibration direction.

Every repair is fitted on the recipe's calibration samples (never the evaluation split). A temperature is evaluated
as a view of its variant's forward pass; a direction step as the stepped model's own forward pass. The gap to full
precision is the paired bootstrap interval of (variant - fp) on the same windows / items.

    python benchmarks/repair_confidence.py --out benchmarks/results/repair_confidence   # the README table
    python benchmarks/repair_confidence.py --out benchmarks/results/repair_direction --no-recipe-variants \
        --repairs labelled label_free direction direction_any_top1          # the direction rows
    python benchmarks/repair_confidence.py --out benchmarks/results/repair_direction_recipe --no-minmax-variants \
        --repairs labelled label_free direction direction_any_top1          # ... on the recipe's variants

Variants: the default recipe's two, plus aggressive min-max W4 (symmetric g128, and per channel), where a
temperature has more to repair. Writes results.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import calq_kernels as kernels
from quant.checks import REFERENCE, EvalConfig, evaluate
from quant.checks.evaluation import TextEvalConfig
from quant.confidence import RecalibrateConfig
from quant.confidence.recalibrate import fit_recalibration, reference_logits
from quant.data import select_samples
from quant.files import write_text_atomic
from quant.methods import QuantSpec, quantize_variant
from quant.models import load_model
from quant.recipe import load_recipe

VARIANTS = [
    {"name": "w4-g128-minmax", "scheme": "W4A16"},
    {"name": "w4-channel-minmax", "scheme": "W4A16", "weights": {"strategy": "channel", "group_size": None}},
]
REPAIRS = {"labelled": {"method": "labelled"}, "label_free": {"method": "label_free"},
           "dual_align": {"method": "dual_align"}, "direction": {"method": "direction"},
           "direction_any_top1": {"method": "direction", "max_top1_change": 1.0}}
"""Rows per variant: the recalibrate config each is fitted with (over the recipe's). direction_any_top1 lifts the
direction's top-1 constraint, to show what the step does when it may change predictions."""
ROWS = (("text.ece", 4), ("text.nll", 4), ("text.kl_to_reference", 4), ("text.accuracy", 4),
        ("task.next_sentence.ece", 3), ("task.next_sentence.accuracy", 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/repair_confidence"))
    parser.add_argument("--recipe", default="recipes/default.yaml")
    parser.add_argument("--windows", type=int, default=16, help="held-out Wikipedia windows of 512 tokens")
    parser.add_argument("--items", type=int, default=48, help="next_sentence items reported")
    parser.add_argument("--no-recipe-variants", action="store_true", help="only the aggressive min-max variants")
    parser.add_argument("--no-minmax-variants", action="store_true", help="only the recipe's variants")
    parser.add_argument("--repairs", nargs="+", choices=list(REPAIRS), default=list(REPAIRS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe)
    model, tokenizer = load_model(recipe.model)
    samples = select_samples(tokenizer, recipe.calibration).token_ids
    specs = [] if args.no_recipe_variants else list(recipe.quantize)
    specs += [] if args.no_minmax_variants else [QuantSpec.model_validate(v) for v in VARIANTS]
    base = recipe.recalibrate or RecalibrateConfig()
    configs = {m: base.model_copy(update=REPAIRS[m]) for m in args.repairs}
    references = {m: reference_logits(model, samples, c) for m, c in configs.items() if c.needs_reference}
    models, fits = {REFERENCE: model}, {}
    with kernels.weight_cache(max_bytes=8 * 2**30):
        for spec in specs:
            variant = quantize_variant(model, spec, None, samples).model
            models[spec.name] = variant
            for method, cfg in configs.items():
                fit = fit_recalibration(variant, samples, cfg, references.get(method))
                fits[f"{spec.name}+{method}"] = fit.summary()
                models[f"{spec.name}+{method}"] = fit.view(spec.name, variant)
                print(spec.name, method, {k: v for k, v in fit.summary().items() if k != "process"}, flush=True)
        del references
        task = next(t for t in recipe.evaluation.tasks if t.name == "next_sentence")
        cfg = EvalConfig(text=TextEvalConfig(windows=args.windows), mmlu=None, ece_bins=recipe.evaluation.ece_bins,
                         tasks=(task.model_copy(update={"max_items": args.items}),))
        evals = evaluate(models, tokenizer, cfg, REFERENCE)
    result = {"seconds": time.perf_counter() - t0, "windows": args.windows, "items": args.items,
              "fits": fits,
              "evaluation": {n: {"intervals": {k: [e.value, e.low, e.high] for k, e in ev.intervals.items()},
                                 "vs_reference": {k: [d["difference"].value, d["difference"].low,
                                                      d["difference"].high] for k, d in ev.vs_reference.items()}}
                             for n, ev in evals.items()}}
    write_text_atomic(args.out / "results.json", json.dumps(result, indent=1))
    write_text_atomic(args.out / "table.md", table(result))
    print(table(result))
    print(f"total {result['seconds']:.0f} s", flush=True)


def table(result: dict) -> str:
    """Per model: T (or the direction step), then each metric with its interval and, below fp, its paired difference
    to fp."""
    ev, fits = result["evaluation"], result["fits"]
    head = "| model | T or step | " + " | ".join(m for m, _ in ROWS) + " |"
    lines = [head, "|---|---|" + "---|" * len(ROWS)]
    for name, e in ev.items():
        cells = []
        for metric, digits in ROWS:
            v, lo, hi = e["intervals"][metric]
            cell = f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            if metric in e["vs_reference"]:
                d, dlo, dhi = e["vs_reference"][metric]
                cell += f"<br>Δfp {d:+.{digits}f} [{dlo:+.{digits}f}, {dhi:+.{digits}f}]"
            cells.append(cell)
        fit = fits.get(name)
        t = "-" if fit is None else f"{fit['temperature']:.3f}" if "temperature" in fit else f"{fit['alpha']:+.4f}"
        lines.append(f"| {name} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
