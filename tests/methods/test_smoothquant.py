import copy

import pytest
import torch

from quant.calibrate import ActivationStats, collect_stats
from quant.methods import QuantSpec, quantize_variant, transformed
from quant.methods.smoothquant import SmoothQuantConfig, smooth_layer
from quant.methods.step import LayerCall
from quant.models import decoder_layers

Q = "model.layers.0.self_attn.q_proj"


def smooth(model, stats: ActivationStats, cfg: SmoothQuantConfig):
    """SmoothQuant's float model and the statistics of its smoothed linears' inputs, layer by layer as the walk
    calls the method."""
    spec = QuantSpec(name="sq", scheme="W8A8", method="smoothquant", options=cfg.model_dump())
    smoothed, adjusted = copy.deepcopy(model), dict(stats.layers)
    for layer in decoder_layers(smoothed):
        call = LayerCall(layer, model.config.model_type, spec.weights, spec.input_activations, spec.ignore, cfg,
                         stats.layers, None)
        adjusted.update(smooth_layer(call).stats)
    return smoothed, ActivationStats(adjusted, {})


def _samples(vocab: int, lengths=(24, 40, 9), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _with_outliers(model):
    """Real LLMs carry a few hidden channels far larger than the rest; plant some in the embeddings."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, [3, 40, 77]] *= 30
    return model


def test_smoothing_preserves_logits_changes_weights_and_leaves_input_alone(tiny_model):
    model = _with_outliers(tiny_model)
    ids = _samples(model.config.vocab_size, (33,), seed=2)[0][None]
    ref = model(input_ids=ids).logits
    before = model.get_submodule(Q).weight.clone()
    stats = collect_stats(model, _samples(model.config.vocab_size))
    smoothed, _ = smooth(model, stats, SmoothQuantConfig(smoothing_strength=0.5))
    torch.testing.assert_close(smoothed(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (smoothed.get_submodule(Q).weight - before).abs().max() > 0.1 * before.abs().max()
    assert torch.equal(model.get_submodule(Q).weight, before)


def test_smoothing_flattens_outliers_and_returns_the_smoothed_stats(tiny_model):
    model = _with_outliers(tiny_model)
    samples = _samples(model.config.vocab_size)
    stats = collect_stats(model, samples)
    smoothed, adjusted = smooth(model, stats, SmoothQuantConfig(smoothing_strength=0.5))
    recomputed = collect_stats(smoothed, samples)
    before = stats.summary()[Q]["outlier_ratio"]
    after = recomputed.summary()[Q]["outlier_ratio"]
    assert before > 5 and after < before / 2, (before, after)
    for name, s in recomputed.layers.items():  # static activation scales must see the smoothed inputs
        torch.testing.assert_close(adjusted.layers[name].absmax, s.absmax, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(adjusted.layers[name].mean_abs, s.mean_abs, rtol=1e-4, atol=1e-6)


def test_alpha_zero_moves_all_range_into_activations(tiny_model):
    stats = collect_stats(tiny_model, _samples(tiny_model.config.vocab_size))
    smoothed, _ = smooth(tiny_model, stats, SmoothQuantConfig(smoothing_strength=0.0))
    # s = 1 / max|W_j| over q, k and v: every input column's largest weight becomes exactly 1
    qkv = [smoothed.get_submodule(Q.replace("q_proj", p)).weight for p in ("q_proj", "k_proj", "v_proj")]
    torch.testing.assert_close(torch.cat(qkv).abs().amax(0), torch.ones(qkv[0].shape[1]))


def test_linear_groups_switch_smooths_down_proj_only_when_on(tiny_model):
    stats = collect_stats(tiny_model, _samples(tiny_model.config.vocab_size))
    down = "model.layers.0.mlp.down_proj"
    norms_only, _ = smooth(tiny_model, stats, SmoothQuantConfig(linear_groups=False))
    both, adjusted = smooth(tiny_model, stats, SmoothQuantConfig())
    assert torch.equal(norms_only.get_submodule(down).weight, tiny_model.get_submodule(down).weight)
    assert not torch.equal(both.get_submodule(down).weight, tiny_model.get_submodule(down).weight)
    assert set(adjusted.layers) == set(stats.layers)


def test_the_walk_makes_the_same_smoothed_model(tiny_model):
    """transformed() runs the method through the walk: the same float model as folding layer by layer here."""
    stats = collect_stats(tiny_model, _samples(tiny_model.config.vocab_size))
    spec = QuantSpec(name="sq", scheme="W8A8", method="smoothquant", options={"smoothing_strength": 0.8})
    by_hand, _ = smooth(tiny_model, stats, SmoothQuantConfig(smoothing_strength=0.8))
    walked = transformed(tiny_model, spec, stats)
    for k, v in by_hand.state_dict().items():
        assert torch.equal(walked.state_dict()[k], v), k


def test_folding_in_bfloat16_keeps_the_function_or_is_refused(tiny_model, family):
    """bfloat16 models: Llama and Qwen2 norms (y = x * w) fold to bfloat16 rounding; Gemma's (1 + w) norms cannot
    hold (1 + w) / s - 1 exactly and are refused before any work, with the fix."""
    from quant.errors import CalqError

    model = _with_outliers(tiny_model).to(torch.bfloat16)
    samples = _samples(model.config.vocab_size)
    spec = QuantSpec(name="sq", scheme="W8A8", method="smoothquant", options={"smoothing_strength": 0.8})
    if family == "gemma3":
        with pytest.raises(CalqError, match="Gemma3RMSNorm.*cannot hold exactly; load the model with dtype: float32"):
            transformed(model, spec, samples=samples)
        return
    ids = _samples(model.config.vocab_size, (33,), seed=2)[0][None]
    ref = model(input_ids=ids).logits.float()
    smoothed = transformed(model, spec, samples=samples)
    err = (smoothed(input_ids=ids).logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err  # bfloat16 rounding of the folded weights


def test_groups_it_cannot_fold_are_reported(tiny_model):
    """The tiny models use 2 kv heads for 4 query heads: v_proj -> o_proj is skipped in every layer, and said."""
    stats = collect_stats(tiny_model, _samples(tiny_model.config.vocab_size))
    spec = QuantSpec(name="sq", scheme="W8A8", method="smoothquant")
    result = quantize_variant(tiny_model, spec, stats)
    assert sorted(result.skipped) == [f"model.layers.{i}.self_attn.v_proj -> self_attn.o_proj" for i in (0, 1)]
