"""Every stage computes on the model's device and creates no tensor on a device of its own choosing.

A CPU-only machine cannot put the model on a GPU, so the check turns the question around: the model and its inputs
are on the CPU, and the default device is `meta` while the stages run. A tensor a stage creates without naming a
device (torch.zeros(n), torch.arange(k), a module's buffers) lands on meta, and the first operation that meets the
model's tensors fails, or its result is meta: exactly the tensors that would sit on the CPU beside a GPU model.
Host-side work that must stay on the CPU (index arithmetic, results gathered for reduction) names "cpu" explicitly.
"""

import contextlib

import pytest
import torch

from quant.ask import ask
from quant.calibrate import Streamed, collect_stats
from quant.confidence import RecalibrateConfig, Tempered, layer_calibration, recalibrate
from quant.checks.evaluation import EvalConfig, MMLUConfig, TextEvalConfig, eval_windows, evaluate
from quant.formats import load, save_quantized
from quant.methods import QuantSpec, quantize_variant, quantize_variants
from quant.models import ModelConfig

SPECS = (QuantSpec(name="m", scheme="W4A16_ASYM", weights={"group_size": 32}),
         QuantSpec(name="s", scheme="W8A8", method="smoothquant", input_activations={"dynamic": False}),
         QuantSpec(name="a", scheme="W4A16", weights={"group_size": 32}, method="awq",
                   options={"n_grid": 2, "clip_grid": 2}),
         QuantSpec(name="g", scheme="W4A16", weights={"group_size": 32}, method="gptq"))


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _samples(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g, device="cpu") for n in (40, 30, 50)]


def _real(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and bool(torch.isfinite(t.float()).all())


def test_every_stage_computes_on_the_models_device(tiny_model, tokenizer, tmp_path):
    samples = _samples(tiny_model.config.vocab_size)
    ids = samples[0][None]
    with default_device_meta():
        stats = collect_stats(tiny_model, samples)
        assert all(s.absmax.device.type == "cpu" for s in stats.layers.values())
        variants = {spec.name: quantize_variant(tiny_model, spec, stats, samples) for spec in SPECS}
        for name, v in variants.items():
            assert _real(v.model(input_ids=ids, use_cache=False).logits), name
        fixed = recalibrate(variants["m"].model, samples, RecalibrateConfig(positions=64, max_samples=2),
                            reference=tiny_model)
        assert 0.25 <= fixed.fit.temperature <= 4
        cfg = EvalConfig(text=TextEvalConfig(windows=2, seq_len=64), mmlu=MMLUConfig(per_subject=1, batch_size=32),
                         bootstrap={"resamples": 20})
        models = {"fp": tiny_model, "m": variants["m"].model, "m+T": Tempered("m", fixed.fit.temperature)}
        evals = evaluate(models, tokenizer, cfg, "fp")
        assert evals["m+T"].text["n"] == 2 * 63 and evals["m"].mmlu["n"] == 57
        lens = layer_calibration(models, eval_windows(tokenizer, TextEvalConfig(windows=1, seq_len=32)))
        assert len(lens.layers["m"]) == tiny_model.config.num_hidden_layers + 1
        assert ask(variants["g"].model, tokenizer, "Which?", ["alpha", "beta"]).confidence > 0
        save_quantized(variants["s"], tokenizer, tmp_path / "s")
        reloaded, _ = load(tmp_path / "s", device="cpu")
        assert _real(reloaded(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("family", ["llama"])
def test_the_streamed_walk_computes_on_its_device(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "fp")
    samples = _samples(tiny_model.config.vocab_size)
    with default_device_meta():
        stats, variants = quantize_variants(Streamed(ModelConfig(source=str(tmp_path / "fp"), device="cpu")), samples,
                                            SPECS)
        assert all(s.absmax.device.type == "cpu" for s in stats.layers.values())
        for name, v in variants.items():
            assert _real(v.model(input_ids=samples[0][None], use_cache=False).logits), name


def test_the_check_catches_a_tensor_made_without_a_device(tiny_model):
    """The mechanism itself: a stage that made its scales with torch.ones(n) would be caught."""
    weight = tiny_model.model.layers[0].mlp.down_proj.weight
    with default_device_meta(), pytest.raises((RuntimeError, NotImplementedError)):
        (weight * torch.ones(weight.shape[1])).sum().item()


@pytest.mark.parametrize("family", ["llama"])
def test_task_scoring_computes_on_the_models_device(tiny_model, tokenizer, tmp_path):
    import json

    import numpy as np

    from quant.checks.tasks import collect_tasks
    from quant.data.tasks import TaskConfig, load_task

    rows = [{"question": f"alpha {i}", "choices": ["beta", "gamma delta", "river"], "answer": i % 3} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = [load_task(TaskConfig(name=n, path=str(tmp_path / "t.jsonl"), kind="multiple_choice", scoring=s))
             for n, s in (("ll", "loglikelihood"), ("letters", "letters"))]
    tasks.append(load_task(TaskConfig(name="ft", path="builtin:facts", kind="free_text", max_items=3,
                                      max_new_tokens=3)))
    with default_device_meta():
        out = collect_tasks({"fp": tiny_model, "fp+T": Tempered("fp", 1.5)}, tokenizer, tasks)
    assert set(out) == {"task.ll", "task.letters", "task.ft", "task.ft.mean_token"}
    for section in out.values():
        for p in section.values():
            assert np.isfinite(p.confidence).all() and ((p.confidence > 0) & (p.confidence <= 1)).all()
