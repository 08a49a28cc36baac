"""Distributed evaluation: evaluation windows and MMLU batches sharded over torch.distributed processes.

Each process runs the models on its share of the work unit the single-process evaluation already uses:
a contiguous block of text windows (one forward pass each), every world-th MMLU batch (the very
batches, so padding is identical) and a contiguous block of each task's reported items. The raw per-token
and per-item arrays are gathered to every process in single-process order and reduced there by
evaluate.reduce, so the text and MMLU metrics and bootstrap intervals equal a single-process run exactly;
task items are batched within a block, so their padding, and their scores to float rounding, can differ
(tests/checks/test_distributed.py checks both on gloo).

    torchrun --nproc-per-node 2 -m quant.cli eval runs/default    # re-evaluate a run's checkpoints
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from quant.confidence.recalibrate import Models
from quant.checks.tasks import collect_tasks
from quant.data import load_mmlu, load_task
from quant.errors import CalqError
from quant.checks.evaluation import (EvalConfig, ModelEval, Predictions, collect_text, eval_windows, mmlu_predictions,
                                       mmlu_probabilities, reduce, stratified_items)


def _block(n: int, rank: int, world: int) -> slice:
    """The rank-th of `world` contiguous, near-equal blocks of range(n)."""
    return slice(rank * n // world, (rank + 1) * n // world)


def evaluate_distributed(models: Models, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig,
                         reference: str) -> dict[str, ModelEval]:
    """evaluate() with the work shared by the processes of the default process group; every process
    returns the same results, equal to evaluate() in one process."""
    if not dist.is_initialized():
        raise CalqError("distributed evaluation needs a process group; launch with torchrun "
                        "(or call torch.distributed.init_process_group first)")
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {sorted(models)}")
    rank, world = dist.get_rank(), dist.get_world_size()
    windows = eval_windows(tokenizer, cfg.text)
    if len(windows) < world:
        raise CalqError(f"{len(windows)} evaluation windows cannot be shared by {world} processes; "
                        "raise evaluation.text.windows or launch fewer processes")
    mine = collect_text(models, windows[_block(len(windows), rank, world)], reference)
    shards: list[dict[str, Predictions]] = [None] * world
    dist.all_gather_object(shards, mine)
    predictions = {"text": {name: Predictions.concatenate([s[name] for s in shards]) for name in models}}
    if cfg.mmlu is not None:
        items = stratified_items(load_mmlu("report"), cfg.mmlu.per_subject, cfg.mmlu.seed)
        probs = mmlu_probabilities(models, tokenizer, items, cfg.mmlu, shard=(rank, world))
        for p in probs.values():  # each row was scored by exactly one process, zeros elsewhere: a sum is exact
            t = torch.from_numpy(p)
            dist.all_reduce(t)
            np.copyto(p, t.numpy())
        predictions["mmlu"] = mmlu_predictions(probs, items)
    tasks = [load_task(t) for t in cfg.tasks]
    small = [t.config.name for t in tasks if len(t.items) < world]
    if small:
        raise CalqError(f"task {small[0]} has fewer reported items than the {world} processes; raise its max_items "
                        "or launch fewer processes")
    mine = collect_tasks(models, tokenizer, [replace(t, items=t.items[_block(len(t.items), rank, world)])
                                             for t in tasks])
    task_shards: list[dict[str, dict[str, Predictions]]] = [None] * world
    dist.all_gather_object(task_shards, mine)
    for section, by_model in mine.items():
        predictions[section] = {name: Predictions.concatenate([s[section][name] for s in task_shards])
                                for name in by_model}
    return reduce(predictions, cfg, reference)
