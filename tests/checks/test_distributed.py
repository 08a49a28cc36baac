import json
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quant.errors import CalqError
from quant.checks.distributed import evaluate_distributed
from quant.checks.evaluation import BootstrapConfig, EvalConfig, MMLUConfig, TextEvalConfig, evaluate
from quant.data.tasks import TaskConfig
from quant.methods import QuantSpec, WeightScheme, quantize_variant
from tests.checks.test_tasks import MC_ROWS

# 3 windows: uneven blocks over 2 processes; 57 MMLU items in batches of 8: 8 batches, the last one short
CFG = EvalConfig(text=TextEvalConfig(windows=3, seq_len=64), mmlu=MMLUConfig(per_subject=1, batch_size=8),
                 bootstrap=BootstrapConfig(resamples=50))


def _worker(rank: int, world: int, port: int, models, tokenizer, out: str, cfg: EvalConfig) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        evals = evaluate_distributed(models, tokenizer, cfg, reference="fp")
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(evals, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fp_and_w4(tiny_model) -> dict:
    return {"fp": tiny_model, "w4": quantize_variant(tiny_model, QuantSpec(name="w4", weights=WeightScheme(
        num_bits=4, group_size=32, symmetric=False))).model}


def _two_process_evals(models, tokenizer, tmp_path, cfg: EvalConfig) -> list[dict]:
    """What each of 2 gloo processes returns from evaluate_distributed."""
    # fork: the children inherit the imported modules (a spawned child re-imports torch and transformers)
    mp.start_processes(_worker, args=(2, _free_port(), models, tokenizer, str(tmp_path / "evals"), cfg), nprocs=2,
                       start_method="fork")
    out = []
    for rank in range(2):
        with open(tmp_path / f"evals.{rank}", "rb") as f:
            out.append(pickle.load(f))
    return out


@pytest.mark.parametrize("family", ["llama"])
def test_two_gloo_processes_reproduce_the_single_process_metrics_exactly(tiny_model, tokenizer, tmp_path):
    models = _fp_and_w4(tiny_model)
    single = evaluate(models, tokenizer, CFG, reference="fp")
    for dist_evals in _two_process_evals(models, tokenizer, tmp_path, CFG):
        for name, s in single.items():
            d = dist_evals[name]
            assert d.text["n"] == 3 * 63 and d.mmlu["n"] == 57
            np.testing.assert_equal(d.text, s.text)  # exact, NaN == NaN
            np.testing.assert_equal(d.mmlu, s.mmlu)
            assert d.intervals.keys() == s.intervals.keys() and d.answer_distribution == s.answer_distribution
            np.testing.assert_equal({k: vars(v) for k, v in d.intervals.items()},
                                    {k: vars(v) for k, v in s.intervals.items()})
            np.testing.assert_equal({k: {c: vars(e) for c, e in v.items()} for k, v in d.vs_reference.items()},
                                    {k: {c: vars(e) for c, e in v.items()} for k, v in s.vs_reference.items()})
            for kind in ("token_predictions", "mmlu_predictions"):
                np.testing.assert_equal(vars(getattr(d, kind)), vars(getattr(s, kind)))


@pytest.mark.parametrize("family", ["llama"])
def test_two_gloo_processes_share_the_tasks_items(tiny_model, tokenizer, tmp_path):
    """Each process scores a block of each task's items (multiple choice: 5 items, uneven blocks; free text: both
    sections); the gathered metrics equal one process's to float rounding (batches are padded within a block)."""
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    tasks = (TaskConfig(name="mc", kind="multiple_choice", path=str(tmp_path / "mc.jsonl"), fields={"id": "id"}),
             TaskConfig(name="ft", kind="free_text", path="builtin:facts", fields={"id": "id"}, max_items=5,
                        max_new_tokens=3))
    cfg = CFG.model_copy(update={"mmlu": None, "tasks": tasks})
    models = _fp_and_w4(tiny_model)
    single = evaluate(models, tokenizer, cfg, reference="fp")
    for dist_evals in _two_process_evals(models, tokenizer, tmp_path, cfg):
        for name, s in single.items():
            d = dist_evals[name]
            assert set(d.tasks) == set(s.tasks) == {"mc", "ft", "ft.mean_token"}
            assert d.tasks["mc"]["n"] == s.tasks["mc"]["n"] >= 2 and d.tasks["ft"]["n"] == s.tasks["ft"]["n"] >= 2
            for section in s.tasks:
                assert d.tasks[section] == pytest.approx(s.tasks[section], rel=1e-5, abs=1e-6, nan_ok=True)
                np.testing.assert_equal(d.task_predictions[section].correct, s.task_predictions[section].correct)


@pytest.mark.parametrize("family", ["llama"])
def test_without_a_process_group_it_says_how_to_launch(tiny_model, tokenizer):
    with pytest.raises(CalqError, match="torchrun"):
        evaluate_distributed({"fp": tiny_model}, tokenizer, CFG, reference="fp")
