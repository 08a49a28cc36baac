"""Smoothing groups traced from the model: the table's groups where it has them, exact folds everywhere else (MoE
routers scaled along), and candidates that would not fold exactly left out."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quant.calibrate.walker import LayerInputs, Resident
from quant.methods.mappings import ARCHITECTURES, smoothing_groups, traced_groups
from quant.models import fold_scales, route_all_experts


def _probes(model, length: int = 12):
    source = Resident(model)
    with route_all_experts():
        track = source.inputs([torch.randint(0, model.config.vocab_size, (length,), device="cpu")])
        out = []
        for i, layer in enumerate(source.layers):
            out.append((layer, track.at(i)))
            track.hidden = track.at(i).run(layer.module)
    return out


def _tiny(model_type: str, **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # fused experts start at zero
                p.normal_(0, 0.1)
            if p.dim() == 1:  # norms start at 1 (or 0 for 1 + w): make a wrong fold visible
                p.add_(torch.rand(p.shape, device="cpu"))
    return model


def test_traced_groups_are_the_tables_groups(tiny_model):
    for layer, probe in _probes(tiny_model):
        traced, _ = traced_groups(layer, probe)
        table, _ = smoothing_groups(layer, ARCHITECTURES[tiny_model.config.model_type])
        assert [(g.prev, g.names) for g in traced] == [(g.prev, g.names) for g in table]


@pytest.mark.parametrize("model_type, extra, n_groups, unsmoothed", [
    ("gpt2", {}, 2, "mlp.c_proj"),  # ln_1 -> c_attn, ln_2 -> c_fc (gelu: c_fc -> c_proj is no fold)
    ("opt", {"ffn_dim": 48, "word_embed_proj_dim": 32}, 4, None),  # relu(x / s) = relu(x) / s: fc1 -> fc2 folds
    ("gemma", {}, 3, "self_attn.o_proj"),  # (1 + w) norms, found by their behaviour; GQA: no v_proj -> o_proj
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, 6,  # router scaled along, up -> down per expert
     "self_attn.o_proj"),
])
def test_every_traced_group_folds_exactly(model_type, extra, n_groups, unsmoothed):
    """Each traced group folds exactly; a linear no sibling feeds exactly is named as skipped, with the reason."""
    model = _tiny(model_type, **extra)
    ids = torch.randint(0, 64, (1, 16), device="cpu")
    ref = model(ids).logits
    found = [traced_groups(layer, probe) for layer, probe in _probes(model)]
    assert [len(g) for g, _ in found] == [n_groups] * 2
    for _, skipped in found:
        assert [label.rpartition(" -> ")[2] for label in skipped] == ([unsmoothed] if unsmoothed else [])
        assert all("no exact fold" in reason for reason in skipped.values())
    if model_type == "mixtral":
        assert len(found[0][0][1].also) == 1 and len(found[0][0][1].names) == 8  # the router; 4 x (gate, up)
    g = torch.Generator(device="cpu").manual_seed(1)
    for groups, _ in found:
        for group in groups:
            width = group.linears[0].in_features
            fold_scales(group.prev, group.readers, torch.exp(torch.rand(width, generator=g, device="cpu") - 0.5))
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=0)


def test_a_linear_behind_a_nonlinearity_is_no_group():
    """gate_proj feeds down_proj through silu(gate) * up: only up_proj -> down_proj folds."""
    model = _tiny("llama")
    layer, probe = _probes(model)[0]
    groups, _ = traced_groups(layer, probe)
    feeders = {name for name, m in layer.module.named_modules() for grp in groups if grp.prev is m}
    assert feeders == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert isinstance(probe, LayerInputs)


def test_tracing_runs_the_whole_layer_as_often_with_16_experts_as_with_4():
    """A fold between siblings (up_proj -> down_proj of one expert) is checked on their parent, not the layer: the
    whole layer runs a fixed number of times, so tracing a 128-expert layer costs 128 expert forwards, not 128 layer
    forwards (measured on a Qwen3-MoE-shaped layer: 33.8 s before, 0.44 s after: benchmarks/bench_tracing.py)."""
    runs = {}
    for experts in (4, 16):
        model = _tiny("qwen3_moe", num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=24)
        layer, probe = _probes(model)[0]
        count = [0]
        hook = layer.module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        groups, _ = traced_groups(layer, probe)
        hook.remove()
        assert sum(len(g.names) for g in groups) == 3 + 3 * experts  # q/k/v, every expert's gate/up and down
        runs[experts] = count[0]
    assert runs[4] == runs[16] <= 8, runs


@pytest.mark.slow
def test_tracing_gives_the_tables_numbers_on_the_default_model(monkeypatch):
    """SmolLM2-135M-Instruct (real weights): SmoothQuant W8A8 and AWQ W4 g64 with traced groups and with the table
    (its fallback without a calibration sample) give bit-identical models (measured: 483 and 693 tensors equal)."""
    import quant.methods.awq as awq
    import quant.methods.smoothquant as smoothquant
    from quant.methods import QuantSpec, mappings, quantize_variants
    from quant.models import ModelConfig, load_model

    model, tokenizer = load_model(ModelConfig(source="smollm2-135m-instruct", dtype="float32", device="cpu"))
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, len(tokenizer), (32,), generator=g, device="cpu") for _ in range(2)]
    specs = [QuantSpec(name="sq", scheme="W8A8", method="smoothquant"),
             QuantSpec(name="awq", scheme="W4A16_ASYM", weights={"group_size": 64}, method="awq",
                       options={"max_tokens": 64, "n_grid": 4, "clip_grid": 2})]
    _, traced = quantize_variants(Resident(model), samples, specs)
    table = lambda layer, model_type, probe, method: mappings.layer_groups(layer, model_type, None, method)  # noqa: E731
    monkeypatch.setattr(smoothquant, "layer_groups", table)
    monkeypatch.setattr(awq, "layer_groups", table)
    _, tabled = quantize_variants(Resident(model), samples, specs)
    for name in ("sq", "awq"):
        ours, theirs = traced[name].model.state_dict(), tabled[name].model.state_dict()
        assert ours.keys() == theirs.keys()
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == [], name
        assert len(traced[name].skipped) == len(tabled[name].skipped) == 30  # GQA: no v_proj -> o_proj per layer
