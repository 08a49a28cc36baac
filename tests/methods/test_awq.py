import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from quant.errors import CalqError
from quant.methods import QuantSpec, WeightScheme, quantize_variant, transformed
from quant.methods.awq import best_clip, best_scales, clip_weight, output_error
from quant.methods.mappings import ARCHITECTURES, smoothing_groups
from quant.methods.schemes import fake_quantize, quantize_weight
from quant.models import decoder_layers, fold_scales
from tests.conftest import tiny_config

G128 = WeightScheme(num_bits=4, group_size=128, symmetric=False)


def awq(model, samples, weights: WeightScheme, ignore=("lm_head",), **options):
    """AWQ's float model (scales folded, weights clipped), through the walk."""
    spec = QuantSpec(name="awq", method="awq", weights=weights, options=options, ignore=ignore)
    return transformed(model, spec, samples=samples)


def _ids(vocab: int, lengths, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("kv_heads", [2, 4])  # 4 = no GQA, so v_proj -> o_proj is folded too
def test_fold_scales_preserves_the_function(family, tokenizer, kv_heads):
    cfg = tiny_config(family, len(tokenizer))
    cfg.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    ids = _ids(cfg.vocab_size, (37,), seed=3)[0][None]
    ref = model(input_ids=ids).logits
    found = [smoothing_groups(layer, ARCHITECTURES[cfg.model_type]) for layer in decoder_layers(model)]
    groups = [g for g, _ in found]
    assert [len(g) for g in groups] == [4 if kv_heads == 4 else 3] * 2
    skipped = [s for _, s in found]  # under GQA v_proj -> o_proj cannot fold: said, not dropped silently
    if kv_heads == 4:
        assert skipped == [{}, {}]
    else:
        assert [list(s) for s in skipped] == [[f"model.layers.{i}.self_attn.v_proj -> self_attn.o_proj"] for i in (0, 1)]
        assert all("grouped-query attention" in reason for s in skipped for reason in s.values())
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    g = torch.Generator().manual_seed(0)
    for layer_groups in groups:
        for group in layer_groups:
            s = torch.exp(torch.randn(group.linears[0].in_features, generator=g) * 0.5)
            fold_scales(group.prev, group.linears, s)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)


def _outlier_inputs(tokens: int = 2048, k: int = 576) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g)
    x[:, [7, 130, 300, 570]] *= 100  # 570 is in the ragged last group (576 = 4.5 x 128)
    return x


def test_awq_scales_beat_minmax_on_outlier_channels():
    x = _outlier_inputs()
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(1)) * 0.05
    gram = x.T @ x
    s = best_scales(x.abs().mean(0), gram, w, G128, grid=20)
    awq_err = ((x / s) @ fake_quantize(w * s, G128).T - x @ w.T).pow(2).mean()
    minmax_err = (x @ fake_quantize(w, G128).T - x @ w.T).pow(2).mean()
    assert awq_err < 0.5 * minmax_err, (awq_err, minmax_err)  # measured 0.11
    # the Gram-matrix error the search minimises is the output error itself
    torch.testing.assert_close(output_error(fake_quantize(w, G128) - w, gram) / (len(x) * 64), minmax_err, rtol=1e-3, atol=0)


@pytest.mark.parametrize("scheme", [G128, WeightScheme(num_bits=4, group_size=64, symmetric=True)])
def test_clip_search_lowers_error_and_the_clamped_weight_keeps_the_range(scheme):
    x = torch.randn(1024, 576, generator=torch.Generator().manual_seed(2))
    w = torch.randn(48, 576, generator=torch.Generator().manual_seed(3))
    gram = x.T @ x
    clip = best_clip(w, gram, scheme, clip_grid=20, max_shrink=0.5)
    assert clip.shape == (48, 5 if scheme.group_size == 128 else 9) and clip.min() >= 0.525 and clip.max() <= 1
    clipped = clip_weight(w, scheme, clip)
    _, scale, zero = quantize_weight(clipped, scheme)
    _, chosen_scale, chosen_zero = quantize_weight(w, scheme, clip)
    torch.testing.assert_close(scale, chosen_scale, rtol=1e-6, atol=0)  # the clamped group spans the chosen range
    assert torch.equal(zero, chosen_zero)
    # re-rounding the clamped weight differs only at rounding ties (AWQ hands its codes over instead)
    assert (fake_quantize(clipped, scheme) != fake_quantize(w, scheme, clip)).float().mean() < 0.005
    err = output_error(fake_quantize(w, scheme, clip) - w, gram)
    assert err < 0.95 * output_error(fake_quantize(w, scheme) - w, gram)  # measured 0.89 (asym), 0.93 (sym)


def _logit_mse(model, reference, ids) -> float:
    return sum((model(input_ids=i[None]).logits - reference(input_ids=i[None]).logits).pow(2).mean().item() for i in ids)


def test_awq_on_each_family_beats_minmax(tiny_model):
    vocab = tiny_model.config.vocab_size
    with torch.no_grad():  # outlier channels, as real LLMs have, so there is something to protect
        tiny_model.get_input_embeddings().weight[:, [3, 40, 77]] *= 30
    calib, held_out = _ids(vocab, (48, 64, 30, 64), seed=4), _ids(vocab, (64, 40), seed=5)
    spec = QuantSpec(name="w4", scheme="W4A16_ASYM", weights={"group_size": 64})  # 96 columns: a ragged group
    before = tiny_model.model.layers[0].self_attn.q_proj.weight.clone()
    awq_model = quantize_variant(tiny_model, spec.model_copy(update={"method": "awq"}), samples=calib).model
    assert torch.equal(tiny_model.model.layers[0].self_attn.q_proj.weight, before)
    awq_err = _logit_mse(awq_model, tiny_model, held_out)
    minmax_err = _logit_mse(quantize_variant(tiny_model, spec).model, tiny_model, held_out)
    assert awq_err < 0.8 * minmax_err, (awq_err, minmax_err)  # measured 0.41-0.55


def test_awq_without_clipping_only_folds_scales(tiny_model):
    ids = _ids(tiny_model.config.vocab_size, (40,), seed=6)[0][None]
    smoothed = awq(tiny_model, _ids(tiny_model.config.vocab_size, (32, 32), seed=7), G128, clip=False)
    ref = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(smoothed(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_awq_never_clips_an_ignored_linear(tiny_model):
    """n_grid=1 tries only r = 0 (no scaling), so any weight change comes from the clip search."""
    calib = _ids(tiny_model.config.vocab_size, (48, 64), seed=8)
    smoothed = awq(tiny_model, calib, G128, ignore=("*.down_proj",), n_grid=1)
    for name, lin in tiny_model.named_modules():
        if name.endswith(("down_proj", "up_proj")):
            changed = not torch.equal(smoothed.get_submodule(name).weight, lin.weight)
            assert changed == name.endswith("up_proj"), name


def test_awq_folds_scales_on_an_architecture_outside_the_table():
    """GPT-2 (Conv1D projections, LayerNorms with bias) has no table entry: its groups are traced, and AWQ without
    clipping folds its scales exactly (the function is kept, ln_1 changed); without samples it says what it needs."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    ids = torch.arange(12, device="cpu")[None]
    ref = model(ids).logits
    folded = awq(model, _ids(64, (16, 16), seed=0), WeightScheme(num_bits=4, group_size=32, symmetric=False),
                 clip=False)
    torch.testing.assert_close(folded(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(folded.transformer.h[0].ln_1.weight, model.transformer.h[0].ln_1.weight)
    with pytest.raises(CalqError, match="need calibration samples"):
        awq(model, [], G128)
