"""report.json (everything, machine-readable) and report.md (the side-by-side table people read)."""

from __future__ import annotations

import json
from pathlib import Path

from quant.confidence import SUFFIX
from quant.confidence.bands import markdown as bands_markdown
from quant.confidence.lens import markdown as lens_markdown
from quant.files import write_text_atomic


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _interval(e: dict, key: str, digits: int = 4) -> str:
    """`point [low, high]` from the evaluation's bootstrap intervals (the point alone when there is none)."""
    est = e.get("intervals", {}).get(key)
    if est is None:
        if key.startswith("task."):
            section, _, name = key.removeprefix("task.").rpartition(".")
            return _fmt(e["tasks"].get(section, {}).get(name), digits)
        section, _, name = key.partition(".")
        return _fmt(e[section].get(name), digits)
    return f"{est['value']:.{digits}f} [{est['low']:.{digits}f}, {est['high']:.{digits}f}]"


def _recalibration(report: dict) -> list[str]:
    ev = report["evaluation"]
    lines = ["", "## Re-calibration (folded into the checkpoint)",
             "The saved checkpoint of each variant is its re-calibrated copy (a temperature in the final norm, "
             "`calq_temperature` in the safetensors metadata; or a calibration-direction step as the bias of the last "
             "down projection, `calq_direction`); gates check it. ECE with 95% bootstrap intervals, before -> after.",
             "", "| variant | method | fitted | fit positions | token ECE before | token ECE after | MMLU ECE before "
             "| MMLU ECE after |", "|---|---|---|---|---|---|---|---|"]
    for name, fit in report["recalibration"].items():
        before, after = ev[name], ev[fit["variant"]]
        mmlu = [_interval(e, "mmlu.ece") if e["mmlu"] else "-" for e in (before, after)]
        bound = " (at the search bound)" if fit.get("at_bound") else ""
        fitted = f"T = {fit['temperature']:.3f}" if fit["method"] != "direction" else \
            f"step {fit['alpha']:+.4f} x {fit['scale']:.2f}"
        lines.append(f"| {name} | {fit['method']} | {fitted}{bound} | {fit['positions']} | "
                     f"{_interval(before, 'text.ece')} | {_interval(after, 'text.ece')} | {mmlu[0]} | {mmlu[1]} |")
    for name, fit in report["recalibration"].items():
        if fit.get("process"):
            p = fit["process"]
            lines.append(f"\n{name} (dual_align): peak divergence layer {p['peak_layer']} (Jensen-Shannon "
                         f"{p['js_by_layer'][p['peak_layer'] - 1]:.4f} -> {p['js_by_layer'][p['peak_layer']]:.4f} "
                         f"nats; last layer {p['js_by_layer'][-1]:.4f}); {p['disagree']} fit positions disagree "
                         f"with full precision, {p['rows']} readouts of layers {p['peak_layer']}.."
                         f"{len(p['js_by_layer']) - 1} in the process term (weight {p['weight']:g}).")
        if fit["method"] == "direction":
            lines.append(f"\n{name} (direction, {fit['target']}): the top direction of full precision's updates in its "
                         f"last {fit['layers']} layers ({fit['explained']:.1%} of their energy), a step of "
                         f"{fit['alpha']:+.4f} typical residual norms ({fit['scale']:.2f}) as the bias of "
                         f"{fit['layer']}; objective {fit['objective_before']:.4f} -> {fit['objective_after']:.4f}; "
                         f"top-1 changed on {fit['top1_changed']:.2%} of the fit positions"
                         + (f" (the optimum, {fit['optimum'][0]:+.4f}, changed {fit['optimum'][1]:.2%}: step "
                            "shortened to the allowed share)." if fit["shortened"] else "."))
    return lines


TASK_ROWS = (("accuracy", "accuracy"), ("acc (summed log-likelihood)", "acc"), ("acc_norm (per character)", "acc_norm"),
             ("mean confidence", "mean_confidence"), ("ECE", "ece"), ("ECE (equal-mass)", "ece_mass"), ("MCE", "mce"),
             ("Brier", "brier"), ("NLL", "nll"), ("AUROC", "auroc"), ("AURC", "aurc"),
             ("selective accuracy", "selective_accuracy"), ("selective coverage", "selective_coverage"),
             ("answers cut at max_new_tokens", "truncated"), ("answer tokens (mean)", "answer_tokens"))


def _tasks(report: dict) -> list[str]:
    """One table per task section: every metric with its interval, fp beside every variant."""
    ev = report["evaluation"]
    names = list(ev)
    lines = ["", "## Tasks (95% bootstrap intervals over items; reliability_task_<name>.png)"]
    described = report.get("tasks", {})
    for section in ev[report["reference"]].get("tasks", {}):
        lines += ["", f"### task.{section}", described.get(section.split(".")[0], "") if "." not in section else
                  "confidence = mean token probability of the answer (what `calq ask` bands)", "",
                  "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for label, key in TASK_ROWS:
            if key in ev[report["reference"]]["tasks"][section]:
                lines.append(f"| {label} | " + " | ".join(
                    _interval(ev[n], f"task.{section}.{key}") for n in names) + " |")
    return lines


PROBE_ROWS = (("AUROC (right vs wrong)", "auroc"), ("ECE", "ece"), ("accuracy at confidence >= {at}", "selective_accuracy"),
              ("coverage at confidence >= {at}", "selective_coverage"), ("AURC", "aurc"), ("Brier (binary)", "brier"))


def _probe(report: dict) -> list[str]:
    """Internal vs probe vs combined confidence, per model, with intervals and the paired change against internal."""
    pr = report["probe"]
    at = report["recipe"]["evaluation"].get("selective_threshold", 0.75)
    est = lambda e: f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"  # noqa: E731
    lines = ["", f"## External confidence (probe on {pr['source']})",
             f"A {pr['kind']} probe on {', '.join(pr['signals'])}, fitted per model on {pr['fit_items']} items of the "
             f"fit split ({pr['scoring']}), reported on the evaluation's {pr['report_items']} items; combined = the "
             "mean of internal and probe. 95% bootstrap intervals; the probe's and combined's paired change against "
             f"internal below. Cost per answer: probe {pr['probe_ms_per_answer']:.3f} ms, hidden-state pass "
             f"{pr['hidden_ms_per_answer']:.1f} ms per item and model (a separate pass here; `calq ask` reads it from "
             "its own).",
             f"Saved with the calq checkpoints ({', '.join(pr['saved'])}); `calq ask` uses it for answers scored "
             "the same way."]
    if pr["not_carried"]:
        lines.append(f"Not carried by the exports ({', '.join(pr['not_carried'])}): those formats have no place for it.")
    lines += ["", "| model | confidence | " + " | ".join(label.format(at=at) for label, _ in PROBE_ROWS) + " |",
              "|---|---|" + "---|" * len(PROBE_ROWS)]
    for name, rows in pr["models"].items():
        for row in ("internal", "probe", "combined"):
            lines.append(f"| {name} | {row} | " + " | ".join(est(rows[row][k]) if k in rows[row] else "-"
                                                              for _, k in PROBE_ROWS) + " |")
        for row, change in rows["change"].items():
            lines.append(f"| {name} | {row} - internal | " + " | ".join(
                f"{change[k]['value']:+.3f} [{change[k]['low']:+.3f}, {change[k]['high']:+.3f}]" if k in change else "-"
                for _, k in PROBE_ROWS) + " |")
    return lines


def markdown(report: dict) -> str:
    ev = report["evaluation"]
    ref = ev[report["reference"]]
    at = report["recipe"]["evaluation"].get("selective_threshold", 0.75)
    mmlu_cfg = report["recipe"]["evaluation"].get("mmlu") or {}
    mmlu = f"MMLU {mmlu_cfg['shots']}-shot" if mmlu_cfg.get("shots") else "MMLU zero-shot"
    rows = [
        ("perplexity", lambda e: _interval(e, "text.perplexity", 3), 0),
        ("perplexity vs fp", lambda e: f"{100 * (e['text']['perplexity'] / ref['text']['perplexity'] - 1):+.1f}%", 0),
        ("token top-1 accuracy", lambda e: _interval(e, "text.accuracy"), 0),
        ("token mean confidence", lambda e: e["text"]["mean_confidence"], 4),
        ("token ECE (15 bins)", lambda e: _interval(e, "text.ece"), 0),
        ("token ECE (equal-mass)", lambda e: _interval(e, "text.ece_mass"), 0),
        ("token MCE", lambda e: _interval(e, "text.mce"), 0),
        ("token Brier", lambda e: _interval(e, "text.brier"), 0),
        ("token NLL", lambda e: _interval(e, "text.nll"), 0),
        ("token AUROC (right vs wrong)", lambda e: _interval(e, "text.auroc"), 0),
        ("token AURC", lambda e: _interval(e, "text.aurc"), 0),
        (f"token accuracy at confidence >= {at}", lambda e: _interval(e, "text.selective_accuracy"), 0),
        (f"token coverage at confidence >= {at}", lambda e: _interval(e, "text.selective_coverage"), 0),
        ("KL to fp (nats/token)", lambda e: e["text"]["kl_to_reference"], 4),
        ("top-1 agreement with fp", lambda e: e["text"]["top1_agreement"], 4),
        (f"{mmlu} accuracy", lambda e: _interval(e, "mmlu.accuracy") if e["mmlu"] else None, 0),
        (f"{mmlu} ECE", lambda e: _interval(e, "mmlu.ece") if e["mmlu"] else None, 0),
        (f"{mmlu} ECE (equal-mass)", lambda e: _interval(e, "mmlu.ece_mass") if e["mmlu"] else None, 0),
        (f"{mmlu} Brier", lambda e: _interval(e, "mmlu.brier") if e["mmlu"] else None, 0),
        (f"{mmlu} NLL", lambda e: _interval(e, "mmlu.nll") if e["mmlu"] else None, 0),
        (f"{mmlu} AUROC", lambda e: _interval(e, "mmlu.auroc") if e["mmlu"] else None, 0),
        (f"{mmlu} AURC", lambda e: _interval(e, "mmlu.aurc") if e["mmlu"] else None, 0),
        (f"{mmlu} accuracy at confidence >= {at}", lambda e: _interval(e, "mmlu.selective_accuracy") if e["mmlu"] else None, 0),
        (f"{mmlu} coverage at confidence >= {at}", lambda e: _interval(e, "mmlu.selective_coverage") if e["mmlu"] else None, 0),
        (f"{mmlu} answers A/B/C/D", lambda e: "/".join(str(v) for v in e["answer_distribution"].values()) or None, 0),
        ("temperature (re-calibration)", lambda e: e.get("temperature"), 3),
        ("weights (MB)", lambda e: e["size_mb"], 1),
        ("linear layers quantized / kept", lambda e: f"{e['layers_quantized']} / {e['layers_kept']}", 0),
    ]
    names = list(ev)
    lines = [f"# calq report: {report['recipe']['name']}", "",
             f"Model `{report['recipe']['model']['source']}`; {report['evaluation_setup']}.", "",
             "Every calibration metric with its 95% bootstrap interval [low, high] (text: whole windows resampled; "
             "MMLU: items).", "",
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
    covered = {n: e["coverage"] for n, e in ev.items() if e.get("coverage") and not n.endswith(SUFFIX)}
    if covered:
        lines += ["", "## Coverage (matmul weights quantized)"]
        lines += [f"- {n}: {line}" for n, line in covered.items()]
    converted = next((e["converted"] for e in ev.values() if e.get("converted")), None)
    if converted:
        kinds: dict[str, int] = {}
        for what in converted.values():
            kinds[what] = kinds.get(what, 0) + 1
        lines += ["", "Converted to nn.Linear before calibration (exact): "
                  + "; ".join(f"{k} x {what}" for what, k in kinds.items())]
    kept = {n: e["kept"] for n, e in ev.items() if e.get("kept")}
    if kept:
        lines += ["", "## Layers kept in full precision"]
        for n, layers in kept.items():
            lines.append(f"- {n}: " + ", ".join(f"{k} ({v})" for k, v in layers.items()))
    skipped = {n: e["skipped"] for n, e in ev.items() if e.get("skipped") and not n.endswith(SUFFIX)}
    if skipped:
        lines += ["", "## Work a method left undone"]
        for n, items in skipped.items():
            reasons = sorted(set(items.values()))
            lines.append(f"- {n}: {len(items)} skipped ({'; '.join(reasons)}), e.g. {next(iter(items))}")
    if report.get("tasks"):
        lines += _tasks(report)
    if report.get("recalibration"):
        lines += _recalibration(report)
    if report.get("probe"):
        lines += _probe(report)
    if report["gates"]["results"]:
        lines += ["", f"## Gate: {'PASS' if report['gates']['passed'] else 'FAIL'}", report["gates"]["markdown"]]
    if report.get("logit_lens"):
        lines += ["", f"## Layer-wise calibration (logit lens, {report['logit_lens']['tokens']} tokens; layerwise.png)",
                  lens_markdown(report["logit_lens"])]
    for kind, tables in report.get("confidence_bands", {}).items():
        lines += ["", f"## Confidence bands ({kind})", bands_markdown(tables, "tokens" if kind == "token" else "items")]
    kernels = report.get("kernels")
    if kernels:
        lines += ["", "## Kernels (which path each quantized linear ran)"]
        lines += [f"- {n}: " + "; ".join(f"{k} x{c}" for k, c in paths.items()) for n, paths in kernels["paths"].items()]
        lines += ["```", kernels["cpu"], "```"]
    reused = report.get("cache", {}).get("reused", {})
    if reused:
        said = {True: "reused (same model, tokenizer, data and recipe)", False: "computed"}
        lines += ["", "## Cached stages", ", ".join(f"{k}: {said[v]}" for k, v in reused.items())
                  + f" (fingerprint {report['cache']['fingerprint']})."]
    lines += ["", "## Timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, run_dir: Path) -> None:
    write_text_atomic(Path(run_dir) / "report.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(Path(run_dir) / "report.md", markdown(report))
