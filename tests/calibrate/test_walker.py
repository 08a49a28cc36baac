import pytest
import torch

from transformers import AutoModelForCausalLM

from quant.calibrate import Resident, SequentialConfig, Streamed, collect_stats
from quant.calibrate.stats import FIELDS
from quant.errors import CalqError
from quant.formats import load, save_quantized
from quant.methods import QuantSpec, quantize_variant, quantize_variants
from quant.models import ModelConfig
from quant.recipe import Recipe
from tests.conftest import tiny_config

W4 = {"num_bits": 4, "group_size": 64, "symmetric": False}  # 96 columns: a ragged group
FAST_AWQ = {"n_grid": 6, "clip_grid": 6}
SPECS = (
    QuantSpec(name="minmax", weights=W4),
    QuantSpec(name="sq-static", method="smoothquant", scheme="W8A8", input_activations={"dynamic": False}),
    QuantSpec(name="awq", method="awq", weights=W4, options=FAST_AWQ),
    QuantSpec(name="gptq", method="gptq", weights=W4),
)


def calibrate_sequential(source: ModelConfig, samples, specs, cfg=SequentialConfig(), stats=None):
    return quantize_variants(Streamed(source, cfg.device), samples, specs, stats, cfg.propagate)


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
    streamed_stats, variants = calibrate_sequential(source, samples, SPECS)
    stats = collect_stats(model, samples)
    assert list(streamed_stats.layers) == list(stats.layers)  # every linear, lm_head included
    for name, s in stats.layers.items():
        assert streamed_stats.layers[name].tokens == s.tokens == 184
        for f in FIELDS:  # the same walk on the same inputs: bitwise equal
            assert torch.equal(getattr(streamed_stats.layers[name], f), getattr(s, f)), (name, f)
    ids = samples[0][None]
    for spec in SPECS:
        whole, seq = quantize_variant(model, spec, stats, samples), variants[spec.name]
        assert seq.quantized == whole.quantized and seq.kept == whole.kept == {"lm_head": "ignored by recipe"}
        ws, ss = whole.model.state_dict(), seq.model.state_dict()
        assert ss.keys() == ws.keys()
        for k in ws:
            assert torch.equal(ss[k], ws[k]), (spec.name, k)
        torch.testing.assert_close(seq.model(input_ids=ids).logits, whole.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama"])
def test_at_most_one_float_layer_is_in_memory(saved, monkeypatch):
    model, source = saved
    seen = []
    load_layer = Streamed.load

    def spy(self, i):
        module = load_layer(self, i)
        real = [not all(p.is_meta for p in lay.module.parameters()) for lay in self.layers]
        rest = [n for n, p in self.model.named_parameters() if not p.is_meta and not n.startswith(self.prefix)]
        seen.append((sum(real), rest))
        return module

    monkeypatch.setattr(Streamed, "load", spy)
    calibrate_sequential(source, _samples(model.config.vocab_size), SPECS[2:])
    assert seen == [(1, [])] * model.config.num_hidden_layers  # embeddings and head are off during the pass


@pytest.mark.parametrize("family", ["llama"])
def test_quantized_propagation_calibrates_on_quantized_inputs(saved):
    model, source = saved
    samples = _samples(model.config.vocab_size)
    specs = (SPECS[0], SPECS[2])
    fl_stats, fl = calibrate_sequential(source, samples, specs, SequentialConfig(propagate="float"))
    _, qu = calibrate_sequential(source, samples, specs, SequentialConfig(propagate="quantized"), stats=fl_stats)
    f_sd, q_sd = fl["minmax"].model.state_dict(), qu["minmax"].model.state_dict()
    assert all(torch.equal(f_sd[k], q_sd[k]) for k in f_sd)  # min-max W4 uses no activations
    f_awq, q_awq = fl["awq"].model.model.layers, qu["awq"].model.model.layers
    # layer 0 sees the same (float) inputs either way; layer 1 sees layer 0's quantized outputs
    assert torch.equal(f_awq[0].mlp.down_proj.qweight, q_awq[0].mlp.down_proj.qweight)
    assert not torch.equal(f_awq[1].mlp.down_proj.scales, q_awq[1].mlp.down_proj.scales)
    held_out = _samples(model.config.vocab_size, (64, 48), seed=1)
    ref = [model(input_ids=i[None]).logits for i in held_out]
    err = {name: sum((r["awq"].model(input_ids=i[None]).logits - y).pow(2).mean().item()
                     for i, y in zip(held_out, ref)) for name, r in (("float", fl), ("quantized", qu))}
    assert err["quantized"] < 1.5 * err["float"], err  # both calibrations are sound


@pytest.mark.parametrize("family", ["llama"])
def test_sequential_variant_saves_and_reloads(saved, tokenizer, tmp_path):
    model, source = saved
    samples = _samples(model.config.vocab_size)
    _, variants = calibrate_sequential(source, samples, SPECS[:1])
    save_quantized(variants["minmax"], tokenizer, tmp_path / "q")
    reloaded, _ = load(tmp_path / "q")
    ids = samples[1][None]
    torch.testing.assert_close(reloaded(input_ids=ids).logits, variants["minmax"].model(input_ids=ids).logits)


def test_recipe_switch_and_bad_sources(tmp_path):
    w4 = [{"name": "w4", "scheme": "W4A16"}]
    recipe = Recipe.model_validate({"name": "r", "quantize": w4, "sequential": {"propagate": "quantized"}})
    assert recipe.sequential == SequentialConfig(propagate="quantized")
    assert Recipe.model_validate({"name": "r", "quantize": w4}).sequential is None
    (tmp_path / "config.json").write_text(tiny_config("llama", 64).to_json_string())
    with pytest.raises(CalqError, match="no model.safetensors"):
        calibrate_sequential(ModelConfig(source=str(tmp_path)), [torch.arange(8)], SPECS[:1])
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    with pytest.raises(CalqError, match="awq, gptq need calibration samples"):
        quantize_variants(Resident(model), [], SPECS)
