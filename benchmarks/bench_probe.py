"""External confidence on the real default model (README, "External confidence"): the default recipe's model,
calibration, variants and re-calibration, evaluated on one probe source only, with the probe on.

    python benchmarks/bench_probe.py next_sentence            # the built-in task: ~30 fit / ~90 report items
    python benchmarks/bench_probe.py next_sentence --samples 16   # what the README's table was measured with
    python benchmarks/bench_probe.py mmlu --per-subject 2     # MMLU: 114 report items, ~228 fit items

Writes runs/bench-probe-<source>/ (report.md, report.json, the checkpoints with their probe.json) and prints the
report's probe section. The held-out text is cut to 2 windows (the run needs it, the comparison does not), the
logit lens, the other task, the gates and the exports are off: the probe's numbers are those a full run reports.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from quant.files import write_text_atomic
from quant.pipeline import run
from quant.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="mmlu or next_sentence")
    p.add_argument("--per-subject", type=int, default=2, help="MMLU report items per subject")
    p.add_argument("--fit-items", type=int, default=256)
    p.add_argument("--signals", nargs="+", default=["max_prob", "entropy", "margin", "hidden"])
    p.add_argument("--kind", default="logistic")
    p.add_argument("--C", type=float, default=0.05)
    p.add_argument("--samples", type=int, default=128, help="calibration samples (the default recipe's: 128)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    recipe = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text())
    ev = recipe["evaluation"]
    ev["text"] = {**ev["text"], "windows": 2}
    ev["logit_lens"] = None
    ev["tasks"] = [dict(t, max_items=None) for t in ev["tasks"] if t["name"] == args.source]
    ev["mmlu"] = {**ev["mmlu"], "per_subject": args.per_subject} if args.source == "mmlu" else None
    recipe["calibration"]["num_samples"] = args.samples
    recipe.update(name=f"bench-probe-{args.source}", gates=[], export=[],
                  probe={"source": args.source, "fit_items": args.fit_items, "signals": args.signals,
                         "kind": args.kind, "C": args.C})
    out = args.out or ROOT / "runs" / recipe["name"]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "bench_recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    result = run(load_recipe(out / "bench_recipe.yaml"), out)
    rest = (out / "report.md").read_text().split("## External confidence", 1)[1]
    print("## External confidence" + rest.split("\n## ", 1)[0])
    t = result.report["timings"]
    print(f"probe fit {t['probe_fit']:.1f} s, probe report {t['probe_report']:.1f} s, whole run "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
