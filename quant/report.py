"""report.json (everything, machine-readable) and report.md (the side-by-side table people read)."""

from __future__ import annotations

import json
from pathlib import Path

from quant.bands import markdown as bands_markdown
from quant.cache import write_text_atomic
from quant.lens import markdown as lens_markdown


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(report: dict) -> str:
    ev = report["evaluation"]
    ref = ev[report["reference"]]
    rows = [
        ("perplexity", lambda e: e["text"]["perplexity"], 3),
        ("perplexity vs fp", lambda e: f"{100 * (e['text']['perplexity'] / ref['text']['perplexity'] - 1):+.1f}%", 0),
        ("token top-1 accuracy", lambda e: e["text"]["accuracy"], 4),
        ("token mean confidence", lambda e: e["text"]["mean_confidence"], 4),
        ("token ECE (15 bins)", lambda e: e["text"]["ece"], 4),
        ("token Brier", lambda e: e["text"]["brier"], 4),
        ("KL to fp (nats/token)", lambda e: e["text"]["kl_to_reference"], 4),
        ("top-1 agreement with fp", lambda e: e["text"]["top1_agreement"], 4),
        ("MMLU accuracy", lambda e: e["mmlu"].get("accuracy"), 4),
        ("MMLU ECE", lambda e: e["mmlu"].get("ece"), 4),
        ("MMLU Brier", lambda e: e["mmlu"].get("brier"), 4),
        ("MMLU answers A/B/C/D", lambda e: "/".join(str(v) for v in e["answer_distribution"].values()) or None, 0),
        ("weights (MB)", lambda e: e["size_mb"], 1),
        ("linear layers quantized / kept", lambda e: f"{e['layers_quantized']} / {e['layers_kept']}", 0),
    ]
    names = list(ev)
    lines = [f"# calq report: {report['recipe']['name']}", "",
             f"Model `{report['recipe']['model']['source']}`; {report['evaluation_setup']}.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get, digits in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(get(ev[n]), digits) for n in names) + " |")
    cal = report["calibration"]
    d = cal["diversity"]
    lines += ["", "## Calibration samples",
              f"{sum(cal['per_source'].values())} samples from a pool of {cal['pool_size']} windows "
              f"({cal['duplicates_removed']} exact/near duplicates removed); per source: "
              + ", ".join(f"{k} {v}" for k, v in cal["per_source"].items()) + ".",
              f"Diversity (TF-IDF/LSA space): mean pairwise distance {d['mean_pairwise_distance']:.3f} "
              f"(random selection: {d['random_mean_pairwise_distance']:.3f}); coverage radius "
              f"{d['coverage_radius']:.3f} (random: {d['random_coverage_radius']:.3f}; lower is better)."]
    kept = {n: e["kept"] for n, e in ev.items() if e.get("kept")}
    if kept:
        lines += ["", "## Layers kept in full precision"]
        for n, layers in kept.items():
            lines.append(f"- {n}: " + ", ".join(f"{k} ({v})" for k, v in layers.items()))
    if report["gates"]["results"]:
        lines += ["", f"## Gate: {'PASS' if report['gates']['passed'] else 'FAIL'}"]
        lines += [f"- {r}" for r in report["gates"]["lines"]]
    if report.get("logit_lens"):
        lines += ["", f"## Layer-wise calibration (logit lens, {report['logit_lens']['tokens']} tokens; layerwise.png)",
                  lens_markdown(report["logit_lens"])]
    for kind, tables in report.get("confidence_bands", {}).items():
        lines += ["", f"## Confidence bands ({kind})", bands_markdown(tables, "tokens" if kind == "token" else "items")]
    lines += ["", "## Timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, run_dir: Path) -> None:
    write_text_atomic(Path(run_dir) / "report.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(Path(run_dir) / "report.md", markdown(report))
