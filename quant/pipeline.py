"""The whole job a recipe describes: select -> stats -> quantize -> evaluate -> gate -> report.

Slow stages (sample selection, activation statistics) cache their artifacts in the run directory
with a fingerprint of the recipe sections they depend on: a rerun after an interruption resumes from
them, and a changed recipe recomputes them. Every artifact is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import calq_kernels as kernels
import psutil
import torch
from torch import nn

from quant.calibrate import ActivationStats, Streamed, collect_stats
from quant.confidence import SUFFIX, Tempered, band_table, layer_calibration, reference_logits
from quant.confidence.recalibrate import Fit, direction_carrier, fit_recalibration
from quant.data import Selection, select_samples, source_fingerprint, special_prefix
from quant.checks import REFERENCE, GateReport, ModelEval, check_gates, eval_windows, evaluate
from quant.checks.evaluation import check_tokenizer, templated
from quant.checks.probing import fit_probes, probe_report
from quant.checks.plots import confidence_histogram, reliability_diagram
from quant.checks.report import write_report
from quant.checks.tasks import describe
from quant.data.tasks import load_task
from quant.files import atomic_path, write_text_atomic
from quant.formats import export, save_quantized
from quant.methods import QuantizeResult, kernel_paths, prepare_kernels, quantize_variant, quantize_variants
from quant.models import load_model, model_fingerprint
from quant.recipe import Recipe

log = logging.getLogger(__name__)


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 20 ms (MB)."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self.mb = self._proc.memory_info().rss / 2**20
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.mb = max(self.mb, self._proc.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, self._proc.memory_info().rss / 2**20)


@dataclass
class RunResult:
    run_dir: Path
    selection: Selection
    stats: ActivationStats
    variants: dict[str, QuantizeResult]
    evals: dict[str, ModelEval]
    gates: GateReport
    report: dict
    recalibration: dict[str, TemperatureFit] = field(default_factory=dict)
    """Fitted temperature per variant (empty when the recipe's recalibrate is null)."""


def calibration_fingerprint(recipe: Recipe) -> str:
    """What the cached stages (samples, statistics) were computed from: the recipe's model and calibration sections
    and the content of what they read (model files, tokenizer, data files)."""
    content = {"model": model_fingerprint(recipe.model),
               "data": [source_fingerprint(s) for s in recipe.calibration.sources]}
    return hashlib.sha256(json.dumps([recipe.section_hash("model", "calibration"), content]).encode()).hexdigest()[:16]


def _fingerprint_ok(directory: Path, fingerprint: str) -> bool:
    stamp = directory / "fingerprint"
    return stamp.exists() and stamp.read_text().strip() == fingerprint


def _selection(recipe: Recipe, tokenizer, directory: Path, fingerprint: str, reused: dict) -> Selection:
    reused["calibration samples"] = _fingerprint_ok(directory, fingerprint)
    if reused["calibration samples"]:
        return Selection.load(directory)
    selection = select_samples(tokenizer, recipe.calibration)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        selection.save(tmp)
        (tmp / "fingerprint").write_text(fingerprint)
    return selection


def _cached_stats(directory: Path, fingerprint: str, reused: dict) -> ActivationStats | None:
    stats = None
    if (directory / "stats.json").exists():
        stats = ActivationStats.load(directory)
        if stats.meta.get("fingerprint") != fingerprint:
            stats = None
    reused["activation statistics"] = stats is not None
    return stats


def _stats_meta(recipe: Recipe, fingerprint: str) -> dict:
    return {"model": recipe.model.source, "fingerprint": fingerprint}


def _stats(recipe: Recipe, model, selection: Selection, directory: Path, fingerprint: str,
           reused: dict) -> ActivationStats:
    stats = _cached_stats(directory, fingerprint, reused)
    if stats is None:
        stats = collect_stats(model, selection.token_ids, meta=_stats_meta(recipe, fingerprint))
        stats.save(directory)
    return stats


def _sequential(recipe: Recipe, selection: Selection, directory: Path, fingerprint: str,
                reused: dict) -> tuple[ActivationStats, dict]:
    """Statistics (unless cached) and every variant in one walk over the checkpoint streamed from disk."""
    cached = _cached_stats(directory, fingerprint, reused)
    stats, variants = quantize_variants(Streamed(recipe.model, recipe.sequential.device), selection.token_ids,
                                        recipe.quantize, cached, recipe.sequential.propagate,
                                        meta=_stats_meta(recipe, fingerprint))
    if cached is None:
        stats.save(directory)
    return stats, variants


def calibrate(recipe: Recipe, model, tokenizer, run_dir: Path, with_stats: bool = True,
              reused: dict | None = None) -> tuple[Selection, ActivationStats | None]:
    """The recipe's calibration samples and (unless weight-only work needs none) activation statistics, cached in
    `run_dir` and reused when what they were computed from is unchanged; `reused` records which were."""
    reused = {} if reused is None else reused
    fingerprint = calibration_fingerprint(recipe)
    selection = _selection(recipe, tokenizer, run_dir / "calibration", fingerprint, reused)
    stats = _stats(recipe, model, selection, run_dir / "stats", fingerprint, reused) if with_stats else None
    return selection, stats


def _setup(recipe: Recipe, tokenizer) -> str:
    """One line of what the evaluation read, as the report states it."""
    text, mmlu = recipe.evaluation.text, recipe.evaluation.mmlu
    prefix = tokenizer.convert_ids_to_tokens(special_prefix(tokenizer))
    starts = f"each starting with {' '.join(prefix)} (the tokenizer's own prefix)" if prefix else \
        "no BOS (the tokenizer adds none)"
    line = (f"held-out text: {text.windows} x {text.seq_len} tokens of {', '.join(text.sources)} (evaluation split), "
            f"{starts}; MMLU: ")
    if mmlu is None:
        return line + "off"
    prompt = "chat template" if templated(tokenizer, mmlu.chat_template) else "plain prompt ending 'Answer:'"
    if mmlu.shots:
        prompt = f"standard {mmlu.shots}-shot prompt, examples from the subject's fit split"
    return line + f"{mmlu.mode}, {mmlu.per_subject} items per subject (report split), {prompt}"


def run(recipe: Recipe, run_dir: Path | None = None) -> RunResult:
    run_dir = Path(run_dir or recipe.run_dir)
    timings: dict[str, float] = {}
    peak_mb: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            out = fn(*args)
        timings[name] = time.perf_counter() - t0
        peak_mb[name] = peak.mb
        return out

    model, tokenizer = timed("load_model", load_model, recipe.model)
    check_tokenizer(tokenizer, recipe.evaluation)
    if recipe.recalibrate is not None and recipe.recalibrate.method == "direction":
        direction_carrier(model)  # a model whose checkpoint cannot carry the step is refused before any stage runs
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the model loads: a bad recipe leaves no run dir
    write_text_atomic(run_dir / "recipe.json", recipe.model_dump_json(indent=1))
    fingerprint, reused = calibration_fingerprint(recipe), {}
    selection = timed("select_samples", _selection, recipe, tokenizer, run_dir / "calibration", fingerprint, reused)
    if recipe.sequential is not None:
        stats, variants = timed("sequential", _sequential, recipe, selection, run_dir / "stats", fingerprint, reused)
    else:
        stats = timed("activation_stats", _stats, recipe, model, selection, run_dir / "stats", fingerprint, reused)
        variants = {spec.name: timed(f"quantize_{spec.name}", quantize_variant, model, spec, stats,
                                     selection.token_ids)
                    for spec in recipe.quantize}
    for variant in variants.values():  # a streamed walk keeps its quantized layers on CPU
        prepare_kernels(variant.model.to(recipe.model.torch_device))
    fits: dict[str, Fit] = {}
    # re-calibrated variants: what is saved and gated (the raw variant is evaluated too)
    shipped: dict[str, Tempered | nn.Module] = {}
    lens = None
    # every forward pass of the quantized models from here on: their CPU kernels keep prepared weights, then free them
    with kernels.weight_cache(max_bytes=int(recipe.evaluation.weight_cache_gb * 2**30)):
        reference = None
        if recipe.recalibrate is not None and recipe.recalibrate.needs_reference:  # one fp pass for all variants
            reference = timed("recalibrate_reference", reference_logits, model, selection.token_ids,
                              recipe.recalibrate)
        for name, variant in variants.items():
            if recipe.recalibrate is not None:
                fits[name] = timed(f"recalibrate_{name}", fit_recalibration, variant.model, selection.token_ids,
                                   recipe.recalibrate, reference)
                shipped[name + SUFFIX] = fits[name].view(name, variant.model)
        del reference  # the fits are done: free its logits (400 MB on the default model) before evaluation
        models = {REFERENCE: model, **{n: v.model for n, v in variants.items()}, **shipped}
        probes = {} if recipe.probe is None else timed("probe_fit", fit_probes, models, tokenizer, recipe.evaluation,
                                                       recipe.probe)
        for name, variant in variants.items():  # the shipped model (re-calibrated, if it is) and its probe
            if name in fits:
                view = shipped[name + SUFFIX]  # a folded copy already, unless it is a view of the variant's logits
                repaired = view if isinstance(view, nn.Module) else fits[name].fold(variant.model)
                save_quantized(replace(variant, model=repaired), tokenizer, run_dir / "models" / name,
                               fits[name].metadata(), probes.get(name + SUFFIX))
            else:
                save_quantized(variant, tokenizer, run_dir / "models" / name, probe=probes.get(name))
        evals = timed("evaluate", evaluate, models, tokenizer, recipe.evaluation, REFERENCE)
        for name, ev in evals.items():  # what gate rules on coverage read
            v = variants.get(name.removesuffix(SUFFIX) if name in shipped else name)
            ev.coverage = {"share": v.coverage.share if v and v.coverage else 0.0}
        probing = None if recipe.probe is None else timed("probe_report", probe_report, models, tokenizer, evals,
                                                          recipe.evaluation, recipe.probe, probes)
        if recipe.evaluation.logit_lens is not None:  # where in depth quantization moves confidence
            lens_cfg = recipe.evaluation.logit_lens
            windows = eval_windows(tokenizer, recipe.evaluation.text.model_copy(
                update={"windows": lens_cfg.windows, "seq_len": lens_cfg.seq_len}))
            lens = timed("logit_lens", layer_calibration, models, windows, recipe.evaluation.ece_bins,
                         lens_cfg.positions)
            lens.plot(run_dir / "layerwise.png", f"layer-wise calibration ({recipe.name})")
    gates = check_gates(evals, list(recipe.gates), REFERENCE, list(shipped) or list(variants))
    gates.write(run_dir)

    fp_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    evaluation = {}
    for name, ev in evals.items():
        base = name.removesuffix(SUFFIX) if name in shipped else name
        v = variants.get(base)
        evaluation[name] = {"text": ev.text, "mmlu": ev.mmlu, "tasks": ev.tasks,
                            "answer_distribution": ev.answer_distribution,
                            "intervals": {k: asdict(e) for k, e in ev.intervals.items()},
                            "vs_reference": {k: {c: asdict(e) for c, e in d.items()} for k, d in ev.vs_reference.items()},
                            "temperature": fits[base].summary().get("temperature") if name in shipped else None,
                            "size_mb": (v.weight_bytes() if v else fp_bytes) / 2**20,
                            "method": v.spec.method if v else "none",
                            "scheme": v.spec.scheme if v else None,
                            "quantize_seconds": timings.get(f"quantize_{base}"),
                            "quantize_peak_rss_mb": peak_mb.get(f"quantize_{base}"),
                            "layers_quantized": len(v.quantized) if v else 0,
                            "layers_kept": len(v.kept) if v else "all", "kept": v.kept if v else {},
                            "skipped": v.skipped if v else {},
                            "coverage": v.coverage.line() if v and v.coverage else None,
                            "converted": v.converted if v else {}}
    report = {
        "recipe": recipe.model_dump(mode="json"), "reference": REFERENCE,
        "evaluation_setup": _setup(recipe, tokenizer),
        "special_prefix": tokenizer.convert_ids_to_tokens(special_prefix(tokenizer)),
        "calibration": {k: v for k, v in selection.manifest().items() if k != "samples"},
        "stats": {"layers": len(stats.layers), "top_outlier_layers": dict(sorted(
            stats.summary().items(), key=lambda kv: -kv[1]["outlier_ratio"])[:5])},
        "evaluation": evaluation,
        "tasks": {**{t.name: describe(load_task(t), tokenizer) for t in recipe.evaluation.tasks},
                  **{t: "lm-eval task through the bridge (quant/checks/harness.py): log-likelihood of each choice, "
                        "confidence = softmax over the choices' summed log-likelihoods; acc and acc_norm as lm-eval"
                     for t in (recipe.evaluation.lm_eval.tasks if recipe.evaluation.lm_eval else ())}},
        "gates": {"passed": gates.passed, "results": [r.__dict__ for r in gates.results],
                  "lines": [r.line() for r in gates.results], "markdown": gates.markdown()},
        "recalibration": {n: {**f.summary(), "variant": n + SUFFIX} for n, f in fits.items()},
        "logit_lens": lens.table() if lens else None,
        "probe": None if probing is None else {
            **{k: v for k, v in probing.items() if k != "bands"}, "saved": [f"models/{n}/probe.json" for n in variants],
            "not_carried": [f"export/{e.variant}-{e.format}" for e in recipe.export]},
        "confidence_bands": {},
        "cache": {"fingerprint": fingerprint, "reused": reused},
        "timings": timings,
        "peak_rss_mb": peak_mb,
        "torch_threads": torch.get_num_threads(),
        "kernels": {"paths": {n: kernel_paths(v.model) for n, v in variants.items()},
                    "cpu": kernels.cpu_dispatch().summary()},
    }
    for kind in ("token", "mmlu"):
        preds = {n: getattr(ev, f"{kind}_predictions") for n, ev in evals.items()}
        if all(p is not None for p in preds.values()):
            reliability_diagram({n: (p.confidence, p.correct) for n, p in preds.items()},
                                run_dir / f"reliability_{kind}.png", f"{kind} reliability ({recipe.name})",
                                recipe.evaluation.ece_bins)
            confidence_histogram({n: p.confidence for n, p in preds.items()}, REFERENCE,
                                 run_dir / f"confidence_{kind}.png", f"{kind} confidence ({recipe.name})")
            report["confidence_bands"][kind] = {n: band_table(p.confidence, p.correct) for n, p in preds.items()}
    for section in evals[REFERENCE].task_predictions:  # one reliability diagram per task section
        preds = {n: ev.task_predictions[section] for n, ev in evals.items()}
        reliability_diagram({n: (p.confidence, p.correct) for n, p in preds.items()},
                            run_dir / f"reliability_task_{section}.png", f"task {section} reliability ({recipe.name})",
                            recipe.evaluation.ece_bins)
        report["confidence_bands"][f"task.{section}"] = {n: band_table(p.confidence, p.correct) for n, p in preds.items()}
    if probing is not None:
        report["confidence_bands"][f"probe.{recipe.probe.source}"] = probing["bands"]
    for cfg in recipe.export:
        timed(f"export_{cfg.variant}_{cfg.format}", export, run_dir, cfg,
              run_dir / "export" / f"{cfg.variant}-{cfg.format}")
    write_report(report, run_dir)  # after the exports: their timings are in it (`timings` is the same dict)
    return RunResult(run_dir, selection, stats, variants, evals, gates, report, fits)
