"""The confidence probe (quant.confidence.probe) on every evaluated model: fitted on the fit split of its source
(MMLU or a multiple-choice task), reported on the evaluation's own items of that source against the model's internal
confidence, with the same bootstrap intervals (and paired ones for the probe's change) as every other metric.

The choice probabilities of reported items are the evaluation's (Predictions.probabilities); the hidden state at the
scoring position comes from one more forward pass over the prompts (`last_hidden`), the probe's only cost besides
a few multiply-adds per answer. `calq ask` reads the hidden state from the forward pass it runs anyway.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quant.checks.evaluation import (EvalConfig, ModelEval, Predictions, letter_scoring, mmlu_encoded, mmlu_fit_items,
                                     mmlu_probabilities, reduce_section, stratified_items, templated)
from quant.checks.scoring import padded
from quant.checks.tasks import choice_probabilities, task_prompts
from quant.confidence.bands import band_table
from quant.confidence.probe import Probe, ProbeConfig, fit_probe, signal_matrix
from quant.confidence.recalibrate import Models, forward_groups
from quant.data import load_mmlu
from quant.data.tasks import load_task

ROWS = ("internal", "probe", "combined")
"""The confidences compared: the model's top choice probability, the probe's, and their mean."""
REPORTED = ("auroc", "ece", "selective_accuracy", "selective_coverage", "aurc", "brier", "accuracy")


def answer_state(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state) at the last position of each left-padded row, positions counted from each
    row's first real token: what `calq ask` scores an answer from, and what the probe reads."""
    dev = next(model.parameters()).device
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=False,
                logits_to_keep=1, output_hidden_states=True)
    return out.logits[:, -1].float().cpu(), out.hidden_states[-1][:, -1].float().cpu()


@torch.inference_mode()
def last_hidden(models: Models, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                batch_size: int) -> dict[str, np.ndarray]:
    """The last hidden state (items, hidden size) at the end of every prompt, per model (a tempered view shares its
    base's)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, np.ndarray] = {}
    for model, views in forward_groups(models):
        rows = []
        for start in tqdm(range(0, len(order), batch_size), desc=f"probe hidden states ({views[0][0]})",
                          unit="batch", leave=False):
            ids, mask = padded([prompts[i] for i in order[start:start + batch_size]], pad)
            rows.append(answer_state(model, ids, mask)[1])
        hidden = np.empty((len(prompts), rows[0].shape[1]))
        hidden[order] = torch.cat(rows).numpy()
        out.update({name: hidden for name, _ in views})
    return out


def _scoring(tokenizer: PreTrainedTokenizerBase, eval_cfg: EvalConfig, cfg: ProbeConfig) -> str:
    if cfg.source == "mmlu":
        return letter_scoring(eval_cfg.mmlu.mode, templated(tokenizer, eval_cfg.mmlu.chat_template))
    task = next(t for t in eval_cfg.tasks if t.name == cfg.source)
    return f"task {task.name}, {task.scoring}"


def fit_probes(models: Models, tokenizer: PreTrainedTokenizerBase, eval_cfg: EvalConfig,
               cfg: ProbeConfig) -> dict[str, Probe]:
    """One probe per model, fitted on the source's fit split (never a reported item)."""
    if cfg.source == "mmlu":
        items = mmlu_fit_items(eval_cfg.mmlu, cfg.fit_items)
        probs, labels = mmlu_probabilities(models, tokenizer, items, eval_cfg.mmlu), np.array([it.answer for it in items])
        prompts, batch = mmlu_encoded(tokenizer, items, eval_cfg.mmlu), eval_cfg.mmlu.batch_size
    else:
        task = load_task(next(t for t in eval_cfg.tasks if t.name == cfg.source))
        task = replace(task, items=task.fit[:cfg.fit_items])
        probs, labels, _ = choice_probabilities(models, tokenizer, task)
        prompts, batch = task_prompts(task, tokenizer), task.config.batch_size
    hidden = last_hidden(models, tokenizer, prompts, batch) if "hidden" in cfg.signals else {}
    scoring = _scoring(tokenizer, eval_cfg, cfg)
    return {name: fit_probe(signal_matrix(p, hidden.get(name), cfg.signals), p.argmax(1) == labels, cfg, scoring)
            for name, p in probs.items()}


def _reported(evals: dict[str, ModelEval], source: str) -> dict[str, Predictions]:
    return {n: e.mmlu_predictions if source == "mmlu" else e.task_predictions[source] for n, e in evals.items()}


def probe_report(models: Models, tokenizer: PreTrainedTokenizerBase, evals: dict[str, ModelEval],
                 eval_cfg: EvalConfig, cfg: ProbeConfig, probes: dict[str, Probe]) -> dict:
    """Internal, probe and combined confidence of every model on the evaluation's items of the probe's source: each
    metric with its bootstrap interval, the probe's paired change against internal, the confidence bands, and what
    the probe costs per answer. Plain dicts, as report.json stores them."""
    preds = _reported(evals, cfg.source)
    t0 = time.perf_counter()
    hidden = {}
    if "hidden" in cfg.signals:
        if cfg.source == "mmlu":
            prompts = mmlu_encoded(tokenizer, stratified_items(load_mmlu("report"), eval_cfg.mmlu.per_subject,
                                                               eval_cfg.mmlu.seed), eval_cfg.mmlu)
            batch = eval_cfg.mmlu.batch_size
        else:
            task = load_task(next(t for t in eval_cfg.tasks if t.name == cfg.source))
            prompts, batch = task_prompts(task, tokenizer), task.config.batch_size
        hidden = last_hidden(models, tokenizer, prompts, batch)
    hidden_s = time.perf_counter() - t0
    out = {"models": {}, "bands": {}}
    predict_s, n = 0.0, 0
    for name, p in preds.items():
        x = signal_matrix(p.probabilities, hidden.get(name), cfg.signals)
        t1 = time.perf_counter()
        probe = np.array([probes[name].predict(row[None])[0] for row in x])  # one answer at a time, as `calq ask`
        predict_s, n = predict_s + time.perf_counter() - t1, n + len(x)
        confidences = {"internal": p.confidence, "probe": probe, "combined": (p.confidence + probe) / 2}
        rows = {r: Predictions(c, p.correct, p.prediction, p.cluster, {"brier": (c - p.correct) ** 2})
                for r, c in confidences.items()}
        reduced = reduce_section(rows, eval_cfg, "internal")
        out["models"][name] = {r: {k: asdict(v) for k, v in intervals.items() if k in REPORTED}
                               for r, (_, intervals, _) in reduced.items()}
        out["models"][name]["change"] = {r: {k: asdict(changes[k]["difference"]) for k in REPORTED if k in changes}
                                         for r, (_, _, changes) in reduced.items() if r != "internal"}
        out["bands"][name] = band_table(probe, p.correct)
    groups = len(forward_groups(models))
    out.update({"source": cfg.source, "signals": list(cfg.signals), "kind": cfg.kind,
                "scoring": next(iter(probes.values())).scoring,
                "fit_items": next(iter(probes.values())).fit_items, "report_items": len(next(iter(preds.values())).correct),
                "hidden_ms_per_answer": 1000 * hidden_s / max(len(next(iter(preds.values())).correct) * groups, 1)
                if hidden else 0.0,
                "probe_ms_per_answer": 1000 * predict_s / max(n, 1)})
    return out
