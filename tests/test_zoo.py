"""Every architecture of issue 12, as tiny random models built from transformers' own config classes: statistics
for every matmul weight, min-max W4 and W8A8 with full coverage (or a named reason per weight kept), save/load,
and, marked slow (about 2-3 minutes for the 21 types on 2 cores), SmoothQuant, AWQ, GPTQ, re-calibration, the
logit lens, sequential calibration and every export the type supports (a refusal is one line with the fix)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quant.calibrate.walker import Resident, Streamed, collect_stats
from quant.confidence.lens import layer_calibration
from quant.confidence.recalibrate import RecalibrateConfig, apply_temperature, fit_temperature
from quant.errors import CalqError
from quant.formats import save_quantized
from quant.formats.checkpoint import load
from quant.formats.exporter import ExportConfig, export, export_problems
from quant.methods import QuantSpec, quantize_variants
from quant.methods.quantizer import IGNORED, ROUTER
from quant.models import ModelConfig

TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "gpt2", "opt",
         "gpt_neox", "falcon", "stablelm", "olmo2", "granite", "cohere", "mixtral", "qwen2_moe", "qwen3_moe",
         "deepseek_v3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=128, pad_token_id=0)
EXTRA = {
    "gpt2": dict(n_inner=96, n_positions=128),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "gemma2": dict(sliding_window=32, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=32, query_pre_attn_scalar=16),
    "falcon": dict(new_decoder_architecture=False, multi_query=True, head_dim=None),
    "phi": dict(partial_rotary_factor=0.5),
    "gpt_neox": dict(rotary_pct=0.5),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8),
    "cohere": dict(logit_scale=0.25),
    "granite": dict(logits_scaling=4.0),
}
G32 = {"num_bits": 4, "group_size": 32, "symmetric": False}


def tiny(model_type: str, vocab: int):
    torch.manual_seed(0)
    kw = {k: v for k, v in {**COMMON, **EXTRA.get(model_type, {})}.items() if v is not None}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=vocab, **kw),
                                             dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # transformers leaves fused experts at zero in from_config
                p.normal_(0, 0.05)
    return model.eval().requires_grad_(False)


def calibration_ids(vocab: int, n: int = 2, length: int = 16) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randint(0, vocab, (length,), generator=g, device="cpu") for _ in range(n)]


def _linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _check_coverage(result, model_type: str) -> None:
    """100% of matmul weights quantized but the ones kept, each named with its reason: lm_head (the recipe's
    ignore) and, in MoE models, the routers."""
    kept = result.coverage.kept
    assert "lm_head" in kept and kept["lm_head"] == IGNORED
    others = {n: r for n, r in kept.items() if n != "lm_head"}
    assert all(r == ROUTER for r in others.values()), others
    assert bool(others) == (model_type in MOE)
    kept_params = sum(p.numel() for n, m in result.model.named_modules() if n in kept
                      for p in m.parameters(recurse=False) if p.dim() >= 2)
    assert result.coverage.quantized + kept_params == result.coverage.total
    assert result.coverage.share > 0.5


@pytest.fixture(params=TYPES)
def zoo(request, tokenizer):
    model = tiny(request.param, len(tokenizer))
    return request.param, model, calibration_ids(len(tokenizer))


def test_statistics_min_max_w4_w8a8_and_save_load(zoo, tokenizer, tmp_path):
    model_type, model, samples = zoo
    ids = torch.randint(0, len(tokenizer), (1, 12), device="cpu")
    ref = model(ids).logits
    stats = collect_stats(model, samples)  # converts Conv1D / fused experts first (exactly)
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    assert set(stats.layers) == _linears(model)  # every matmul weight that is a linear has statistics
    assert all(s.tokens == 32 for s in stats.layers.values())  # every expert sees every token
    specs = [QuantSpec(name="w4", weights=G32), QuantSpec(name="w8a8", scheme="W8A8"),
             QuantSpec(name="w8a8-static", scheme="W8A8", input_activations={"dynamic": False})]
    _, results = quantize_variants(Resident(model), samples, specs, stats)
    errors = {}
    for name, result in results.items():
        _check_coverage(result, model_type)
        out = result.model(ids).logits
        assert torch.isfinite(out).all()
        errors[name] = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < errors["w8a8"] < errors["w4"] < 1.0, errors
    save_quantized(results["w4"], tokenizer, tmp_path / "w4")
    loaded, _ = load(tmp_path / "w4", device="cpu")
    torch.testing.assert_close(loaded(ids).logits, results["w4"].model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_methods_recalibration_lens_sequential_and_exports(zoo, tokenizer, tmp_path):
    model_type, model, samples = zoo
    ids = torch.randint(0, len(tokenizer), (1, 12), device="cpu")
    ref = model(ids).logits
    float_dir = tmp_path / "float"
    model.save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    specs = [QuantSpec(name="w4", weights=G32),
             QuantSpec(name="sq", scheme="W8A8", method="smoothquant"),
             QuantSpec(name="awq", weights=G32, method="awq", options={"max_tokens": 32, "n_grid": 4, "clip_grid": 4}),
             QuantSpec(name="gptq", weights=G32, method="gptq", options={"max_tokens": 32})]
    stats, results = quantize_variants(Resident(model), samples, specs)
    for name, result in results.items():
        _check_coverage(result, model_type)
        assert torch.isfinite(result.model(ids).logits).all(), name
    err = {n: float((r.model(ids).logits - ref).abs().max() / ref.abs().max()) for n, r in results.items()}
    assert err["sq"] < err["w4"] and err["awq"] < 1 and err["gptq"] < 1, err
    # sequential: the same variants, streamed layer by layer from the saved float checkpoint
    _, streamed = quantize_variants(Streamed(ModelConfig(source=str(float_dir), device="cpu", dtype="float32")),
                                    samples, specs[:2])
    for name in ("w4", "sq"):
        torch.testing.assert_close(streamed[name].model(ids).logits, results[name].model(ids).logits,
                                   atol=1e-4, rtol=0)
    # re-calibration: the fitted temperature folds exactly
    w4 = results["w4"].model
    fit = fit_temperature(w4, samples, RecalibrateConfig(method="labelled", positions=64))
    tempered = copy.deepcopy(w4)
    apply_temperature(tempered, fit.temperature)
    torch.testing.assert_close(tempered(ids).logits, w4(ids).logits / fit.temperature, atol=1e-5, rtol=1e-4)
    # the logit lens: its last layer is the model's own prediction
    rows = layer_calibration({"w4": w4}, samples).layers["w4"]
    own = torch.cat([w4(input_ids=s[None, :-1]).logits[0].softmax(-1).max(-1).values for s in samples])
    assert rows[-1]["mean_confidence"] == pytest.approx(float(own.double().mean()), abs=1e-5)
    # exports: each one the type supports is written; each one it does not is refused in one line
    save_quantized(results["w4"], tokenizer, tmp_path / "w4")
    shapes = {n: (m.in_features, m.out_features) for n, m in results["w4"].model.named_modules()
              if hasattr(m, "in_features") and n != "lm_head"}
    for fmt in ("compressed-tensors", "awq", "gguf"):
        found = export_problems(fmt, results["w4"].spec, shapes, results["w4"].model.config)
        if found:
            assert all("\n" not in p and "; " in p for p in found), found  # one line: the reason; the fix
            with pytest.raises(CalqError):
                export(tmp_path / "w4", ExportConfig(format=fmt), tmp_path / fmt)
        else:
            out = export(tmp_path / "w4", ExportConfig(format=fmt), tmp_path / fmt)
            assert out.weight_bytes > 0
