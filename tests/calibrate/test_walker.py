import pytest
import torch

from quant import sequential
from quant.awq import AWQConfig
from quant.cache import CalqError
from quant.checkpoint import load, save_quantized
from quant.methods import QuantSpec, quantize_variant
from quant.models import ModelConfig
from quant.quantize import ActScheme, WeightScheme
from quant.recipe import Recipe
from quant.sequential import SequentialConfig, calibrate_sequential
from quant.stats import FIELDS, collect_stats
from tests.conftest import tiny_config

W4 = WeightScheme(bits=4, group_size=64)  # 96 columns: a ragged group
W8 = WeightScheme(bits=8, group_size=None, symmetric=True)
FAST_AWQ = AWQConfig(grid=6, clip_grid=6)
SPECS = (
    QuantSpec(name="minmax", weights=W4),
    QuantSpec(name="sq-static", method="smoothquant", weights=W8, activations=ActScheme(mode="static")),
    QuantSpec(name="awq", method="awq", weights=W4, awq=FAST_AWQ),
    QuantSpec(name="gptq", method="gptq", weights=W4),
)


def _samples(vocab: int, lengths=(40, 64, 30, 50), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.fixture
def saved(tiny_model, tmp_path):
    """The tiny model with outlier channels (so smoothing has work to do), saved as a checkpoint."""
    with torch.no_grad():
        tiny_model.get_input_embeddings().weight[:, [3, 40, 77]] *= 30
    tiny_model.save_pretrained(tmp_path / "fp")
    return tiny_model, ModelConfig(source=str(tmp_path / "fp"))


def test_sequential_equals_the_whole_model_path(saved):
    model, source = saved
    samples = _samples(model.config.vocab_size)
    result = calibrate_sequential(source, samples, SPECS)
    stats = collect_stats(model, samples)
    assert list(result.stats.layers) == list(stats.layers)  # every linear, lm_head included
    for name, s in stats.layers.items():
        assert result.stats.layers[name].tokens == s.tokens == 184
        for f in FIELDS:
            torch.testing.assert_close(getattr(result.stats.layers[name], f), getattr(s, f), rtol=1e-5, atol=1e-6)
    ids = samples[0][None]
    for spec in SPECS:
        whole, seq = quantize_variant(model, spec, stats, samples), result.variants[spec.name]
        assert seq.quantized == whole.quantized and seq.kept == whole.kept == {"lm_head": "ignored by recipe"}
        ws, ss = whole.model.state_dict(), seq.model.state_dict()
        assert ss.keys() == ws.keys()
        for k in ws:  # int codes identical, float scales and norms to float rounding (measured: bitwise equal)
            torch.testing.assert_close(ss[k], ws[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seq.model(input_ids=ids).logits, whole.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama"])
def test_at_most_one_float_layer_is_in_memory(saved, monkeypatch):
    model, source = saved
    seen = []
    load_layer = sequential._Model.load_layer

    def spy(self, layer):
        load_layer(self, layer)
        real = [not all(p.is_meta for p in lay.module.parameters()) for lay in self.layers]
        rest = [n for n, p in self.model.named_parameters() if not p.is_meta and not n.startswith(self.prefix)]
        seen.append((sum(real), rest))

    monkeypatch.setattr(sequential._Model, "load_layer", spy)
    calibrate_sequential(source, _samples(model.config.vocab_size), SPECS[2:])
    assert seen == [(1, [])] * model.config.num_hidden_layers  # embeddings and head are off during the pass


@pytest.mark.parametrize("family", ["llama"])
def test_quantized_propagation_calibrates_on_quantized_inputs(saved):
    model, source = saved
    samples = _samples(model.config.vocab_size)
    specs = (SPECS[0], SPECS[2])
    fl = calibrate_sequential(source, samples, specs, SequentialConfig(propagate="float"))
    qu = calibrate_sequential(source, samples, specs, SequentialConfig(propagate="quantized"), stats=fl.stats)
    f_sd, q_sd = fl.variants["minmax"].model.state_dict(), qu.variants["minmax"].model.state_dict()
    assert all(torch.equal(f_sd[k], q_sd[k]) for k in f_sd)  # min-max W4 uses no activations
    f_awq, q_awq = fl.variants["awq"].model.model.layers, qu.variants["awq"].model.model.layers
    # layer 0 sees the same (float) inputs either way; layer 1 sees layer 0's quantized outputs
    assert torch.equal(f_awq[0].mlp.down_proj.qweight, q_awq[0].mlp.down_proj.qweight)
    assert not torch.equal(f_awq[1].mlp.down_proj.scales, q_awq[1].mlp.down_proj.scales)
    held_out = _samples(model.config.vocab_size, (64, 48), seed=1)
    ref = [model(input_ids=i[None]).logits for i in held_out]
    err = {name: sum((r.variants["awq"].model(input_ids=i[None]).logits - y).pow(2).mean().item()
                     for i, y in zip(held_out, ref)) for name, r in (("float", fl), ("quantized", qu))}
    assert err["quantized"] < 1.5 * err["float"], err  # both calibrations are sound


@pytest.mark.parametrize("family", ["llama"])
def test_sequential_variant_saves_and_reloads(saved, tokenizer, tmp_path):
    model, source = saved
    samples = _samples(model.config.vocab_size)
    result = calibrate_sequential(source, samples, SPECS[:1])
    save_quantized(result.variants["minmax"], tokenizer, tmp_path / "q")
    reloaded, _ = load(tmp_path / "q")
    ids = samples[1][None]
    torch.testing.assert_close(reloaded(input_ids=ids).logits, result.variants["minmax"].model(input_ids=ids).logits)


def test_recipe_switch_and_bad_sources(tmp_path):
    recipe = Recipe.model_validate({"name": "r", "quantize": [{"name": "w4"}], "sequential": {"propagate": "quantized"}})
    assert recipe.sequential == SequentialConfig(propagate="quantized")
    assert Recipe.model_validate({"name": "r", "quantize": [{"name": "w4"}]}).sequential is None
    (tmp_path / "config.json").write_text(tiny_config("llama", 64).to_json_string())
    with pytest.raises(CalqError, match="no model.safetensors"):
        calibrate_sequential(ModelConfig(source=str(tmp_path)), [torch.arange(8)], SPECS[:1])
    with pytest.raises(CalqError, match="no calibration samples"):
        calibrate_sequential(ModelConfig(source=str(tmp_path)), [], SPECS[:1])
