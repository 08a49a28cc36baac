"""`calq compare`: a recipe's variants (recipes/compare.yaml: min-max, SmoothQuant, AWQ and GPTQ) on the same samples,
statistics and evaluation data, each as it quantizes.

Writes one table (compare.md, compare.csv) and a plot (compare.png) next to the usual report.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quant.files import atomic_path, write_text_atomic  # noqa: E402
from quant.pipeline import RunResult, run  # noqa: E402
from quant.recipe import Recipe  # noqa: E402

COLUMNS = (
    ("variant", lambda n, e, ref: n),
    ("method", lambda n, e, ref: e["method"]),
    ("perplexity", lambda n, e, ref: e["text"]["perplexity"]),
    ("ppl_increase_pct", lambda n, e, ref: 100 * (e["text"]["perplexity"] / ref["text"]["perplexity"] - 1)),
    ("kl_to_fp", lambda n, e, ref: e["text"]["kl_to_reference"]),
    ("top1_agreement", lambda n, e, ref: e["text"]["top1_agreement"]),
    ("token_ece", lambda n, e, ref: e["text"]["ece"]),
    ("mmlu_accuracy", lambda n, e, ref: e["mmlu"].get("accuracy")),
    ("mmlu_ece", lambda n, e, ref: e["mmlu"].get("ece")),
    ("size_mb", lambda n, e, ref: e["size_mb"]),
    ("quantize_s", lambda n, e, ref: e["quantize_seconds"]),
    ("quantize_peak_rss_mb", lambda n, e, ref: e["quantize_peak_rss_mb"]),
)


def comparison_rows(report: dict) -> list[dict]:
    ev = report["evaluation"]
    ref = ev[report["reference"]]
    return [{col: get(name, e, ref) for col, get in COLUMNS} for name, e in ev.items()]


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_comparison(report: dict, run_dir: Path) -> list[dict]:
    rows = comparison_rows(report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[c for c, _ in COLUMNS])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(run_dir / "compare.csv", buf.getvalue())
    md = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(r[c]) for c, _ in COLUMNS) + " |" for r in rows]
    write_text_atomic(run_dir / "compare.md", "\n".join(md) + "\n")

    quantized = [r for r in rows if r["method"] != "none"]
    names = [r["variant"] for r in quantized]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, (col, label) in zip(axes.flat, [("ppl_increase_pct", "perplexity increase over fp (%)"),
                                            ("kl_to_fp", "KL to fp (nats/token)"),
                                            ("token_ece", "next-token ECE"), ("quantize_s", "quantization time (s)")]):
        colors = ["tab:gray" if r["method"] == "minmax" else "tab:blue" for r in quantized]
        ax.barh(names, [r[col] or 0 for r in quantized], color=colors)
        if col == "token_ece":
            ax.axvline(rows[0]["token_ece"], color="k", ls="--", lw=1, label="fp")
            ax.legend()
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(f"min-max (gray) vs smoothing methods (blue): {report['recipe']['model']['source']}")
    fig.tight_layout()
    with atomic_path(run_dir / "compare.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return rows


def compare(recipe: Recipe, run_dir: Path | None = None) -> RunResult:
    """Run the recipe's variants on its model, samples and evaluation data, compared as they quantize: no
    re-calibration, logit lens, gates or export (`calq run` does those)."""
    evaluation = recipe.evaluation.model_copy(update={"logit_lens": None})
    spec = recipe.model_copy(update={"gates": (), "recalibrate": None, "export": (), "evaluation": evaluation})
    result = run(spec, Path(run_dir) if run_dir else recipe.run_dir)
    write_comparison(result.report, result.run_dir)
    return result
