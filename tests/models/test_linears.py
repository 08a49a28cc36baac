"""Conv1D and fused MoE experts become nn.Linear exactly, every expert gets statistics, and a checkpoint on disk
(original layout) loads into the converted skeleton."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen3MoeConfig

from quant.calibrate.walker import Resident, collect_stats
from quant.models import Experts, checkpoint_tensors, linearize, route_all_experts


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def _moe():
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    for p in model.parameters():  # transformers leaves fused experts at zero in from_config: give them values
        if p.dim() == 3:
            p.normal_(0, 0.1)
    return model


def test_conv1d_becomes_an_exact_linear_and_gets_statistics():
    model = _gpt2()
    ids = torch.randint(0, 128, (1, 20), device="cpu")
    before = model(ids).logits
    converted = linearize(model)
    assert len(converted) == 8 and all("Conv1D" in v for v in converted.values())
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_attn"), torch.nn.Linear)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    assert linearize(model) == converted  # a second call converts nothing and still answers
    stats = collect_stats(model, [torch.randint(0, 128, (12,), device="cpu") for _ in range(2)])
    assert {n for n in stats.layers if n.startswith("transformer.h.0.")} == {
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert stats.layers["transformer.h.1.mlp.c_proj"].tokens == 24


def test_fused_experts_become_per_expert_linears_with_the_same_output():
    model = _moe()
    ids = torch.randint(0, 128, (1, 16), device="cpu")
    before = model(ids).logits
    converted = linearize(model)
    assert list(converted) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, Experts) and len(experts) == 8
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    with route_all_experts():  # every expert runs, the output stays as routed
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)


def test_every_expert_gets_every_calibration_token():
    model = _moe()
    samples = [torch.randint(0, 128, (6,), device="cpu") for _ in range(2)]
    stats = collect_stats(model, samples)
    names = [n for n in stats.layers if ".experts." in n]
    assert len(names) == 2 * 8 * 3
    assert {stats.layers[n].tokens for n in names} == {12}
    assert all(float(stats.layers[n].absmax.max()) > 0 for n in names)


def test_original_checkpoint_tensors_load_into_the_converted_skeleton():
    for make in (_gpt2, _moe):
        model = make()
        original = {k: v.clone() for k, v in model.state_dict().items()}
        ids = torch.randint(0, 128, (1, 10), device="cpu")
        before = model(ids).logits
        converted = Resident(model).converted
        fresh = make()
        for p in fresh.parameters():
            p.zero_()
        linearize(fresh)
        fresh.load_state_dict(checkpoint_tensors(converted, fresh, "", original), strict=False)
        torch.testing.assert_close(fresh(ids).logits, before, atol=1e-5, rtol=0)
