import copy

import pytest
import torch
import torch.nn.functional as F

from quant.methods import QuantLinear, QuantSpec, WeightScheme, quantize_variant, transformed
from quant.methods.awq import output_error
from quant.methods.gptq import gptq_weight
from quant.methods.schemes import fake_quantize, quantize_weight
from tests.conftest import dequantized

SCHEMES = [WeightScheme(num_bits=4, group_size=32, symmetric=False), WeightScheme(num_bits=4, group_size=64),
           WeightScheme(num_bits=4, symmetric=False), WeightScheme(num_bits=8)]


def _correlated_inputs(tokens: int = 4096, k: int = 200) -> torch.Tensor:
    """Inputs with low-rank structure plus noise, one loud channel: what error feedback exploits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, k, generator=g)
    x += 0.3 * torch.randn(tokens, k, generator=g)
    x[:, 3] *= 10
    return x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_cuts_the_output_error_of_round_to_nearest(scheme, act_order):
    x = _correlated_inputs()
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(1)) * 0.05
    gram = x.T @ x
    codes = gptq_weight(w, gram, scheme, act_order=act_order)
    groups = 1 if scheme.group_size is None else -(-200 // scheme.group_size)  # 200 = 6 x 32 + 8: ragged
    assert codes.q.shape == (64, 200) and codes.scale.shape == codes.zero.shape == (64, groups)
    lo, hi = (0, 15) if scheme.num_bits == 4 else (-127, 127)
    assert codes.q.min() >= lo and codes.q.max() <= hi and torch.equal(codes.q, codes.q.round())
    gptq_error = output_error(codes.dequantize(scheme.group_size) - w, gram)
    rtn_error = output_error(fake_quantize(w, scheme) - w, gram)
    assert gptq_error < 0.1 * rtn_error, (gptq_error, rtn_error)  # measured 0.03-0.04, act order 0.02-0.03


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_without_correlation_is_round_to_nearest(act_order):
    """With H a multiple of the identity no error is fed forward, so GPTQ is min-max rounding, code for code."""
    w = torch.randn(48, 100, generator=torch.Generator().manual_seed(2))
    scheme = WeightScheme(num_bits=4, group_size=32, symmetric=False)
    codes = gptq_weight(w, 7.0 * torch.eye(100), scheme, act_order=act_order)
    q, scale, zero = quantize_weight(w, scheme)
    assert torch.equal(codes.q, q)
    torch.testing.assert_close(codes.scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(codes.zero, zero, rtol=0, atol=0)


def test_gptq_tolerates_channels_that_never_fire():
    x = _correlated_inputs()
    x[:, 50:60] = 0
    codes = gptq_weight(torch.randn(16, 200) * 0.05, x.T @ x, WeightScheme(num_bits=4, group_size=32))
    assert torch.isfinite(codes.scale).all() and torch.isfinite(codes.dequantize(32)).all()


def test_gptq_variant_stores_its_codes_and_beats_minmax(tiny_model, tokenizer):
    """The quantized model holds exactly GPTQ's codes (its forward equals GPTQ's dequantized float model),
    and on the calibration text its logits sit closer to full precision than min-max rounding's."""
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, len(tokenizer), (64,), generator=g) for _ in range(16)]
    spec = QuantSpec(name="g", method="gptq", weights=WeightScheme(num_bits=4, group_size=32, symmetric=False))
    gptq_variant = quantize_variant(tiny_model, spec, samples=samples)
    minmax = quantize_variant(tiny_model, spec.model_copy(update={"method": "minmax"}))
    float_model = transformed(tiny_model, spec, samples=samples)  # GPTQ's codes, dequantized, as float weights
    assert len(gptq_variant.quantized) == 14  # 7 linears x 2 layers; lm_head ignored
    for name in gptq_variant.quantized:
        q = gptq_variant.model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        torch.testing.assert_close(dequantized(q), float_model.get_submodule(name).weight, rtol=0, atol=1e-6)
    ids = torch.stack(samples)
    with torch.no_grad():
        ref = F.log_softmax(tiny_model(input_ids=ids).logits, -1)
        torch.testing.assert_close(gptq_variant.model(input_ids=ids).logits, float_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
        kl = {name: F.kl_div(F.log_softmax(m.model(input_ids=ids).logits, -1), ref, log_target=True,
                             reduction="batchmean").item() for name, m in (("gptq", gptq_variant), ("minmax", minmax))}
    assert kl["gptq"] < 0.8 * kl["minmax"], kl  # measured ratio: llama 0.53, qwen2 0.48, gemma3 0.65


def test_gptq_leaves_the_input_model_alone(tiny_model, tokenizer):
    before = copy.deepcopy(tiny_model.state_dict())
    quantize_variant(tiny_model, QuantSpec(name="g", method="gptq", scheme="W4A16"),
                     samples=[torch.arange(20) % len(tokenizer)])
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_a_linear_no_token_reaches_is_rounded_min_max_and_counted(tokenizer):
    """A linear the layer's forward never runs (as an expert no token reaches would be without all-expert
    calibration): GPTQ and AWQ leave it to min-max rounding from its weights, and say so; never NaN."""
    from transformers import AutoModelForCausalLM

    from quant.methods import QuantLinear, QuantSpec, quantize_variant
    from quant.methods.quantizer import UNREACHED
    from quant.methods.schemes import quantize_weight
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    model.model.layers[0].mlp.spare = torch.nn.Linear(96, 32, bias=False)  # never called by the forward
    samples = [torch.randint(0, len(tokenizer), (16,), device="cpu") for _ in range(2)]
    weights = {"num_bits": 4, "group_size": 32, "symmetric": False}
    for method in ("gptq", "awq"):
        spec = QuantSpec(name=method, weights=weights, method=method, options={"max_tokens": 32})
        result = quantize_variant(model, spec, samples=samples)
        assert result.skipped.get("model.layers.0.mlp.spare") == UNREACHED
        q = result.model.model.layers[0].mlp.spare
        assert isinstance(q, QuantLinear) and torch.isfinite(q.scales).all()
        _, scale, _ = quantize_weight(model.model.layers[0].mlp.spare.weight, spec.weights)
        torch.testing.assert_close(q.scales.float(), scale.float())
