import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.calibrate import collect_stats
from quant.errors import CalqError
from quant.methods import ActScheme, QuantLinear, QuantSpec, WeightScheme, quantize_variant
from quant.methods.schemes import dequantize_codes, fake_quantize, quantize_weight
from tests.conftest import dequantized



@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_error_is_at_most_half_a_step_including_ragged_group(group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(24, 576)  # 576 = 4.5 x 128: the last group of 128 is ragged
    scheme = WeightScheme(num_bits=4, group_size=group_size, symmetric=symmetric)
    q, scale, zero = quantize_weight(w, scheme)
    groups = 1 if group_size is None else -(-576 // group_size)
    assert scale.shape == zero.shape == (24, groups)
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round())
    err = (dequantize_codes(q, scale, zero, group_size) - w).abs()
    step = scale.repeat_interleave(group_size or 576, dim=1)[:, :576]
    assert (err <= step * 0.5 + 1e-6).all()  # symmetric too: +absmax is 7.5 steps, rounded to 7


def test_int8_per_channel_symmetric():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-2, 1, 16)[:, None]
    scheme = WeightScheme(num_bits=8)
    wq = fake_quantize(w, scheme)
    rel = (wq - w).abs().amax(1) / w.abs().amax(1)
    assert rel.max() <= 0.5 / 127 + 1e-6


def test_scheme_validation_messages():
    with pytest.raises(ValueError, match="per-channel symmetric"):
        WeightScheme(num_bits=8, group_size=128)
    with pytest.raises(ValueError, match="need 8-bit weights"):
        QuantSpec(name="x", weights=WeightScheme(num_bits=4, group_size=128), input_activations=ActScheme())
    with pytest.raises(ValueError, match="group strategy needs a group_size"):
        WeightScheme(num_bits=4, strategy="group")
    with pytest.raises(ValueError, match="dynamic per-token or static per-tensor"):
        ActScheme(dynamic=True, strategy="tensor")


@pytest.mark.parametrize("scheme,act", [(WeightScheme(num_bits=4, group_size=32, symmetric=False), None),
                                        (WeightScheme(num_bits=4, group_size=64, symmetric=True), None),
                                        (WeightScheme(num_bits=8), None),
                                        (WeightScheme(num_bits=8), ActScheme(dynamic=True))])
def test_quant_linear_matches_dequantized_weight(scheme, act):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = QuantLinear.from_linear(lin, scheme, act)
    x = torch.randn(3, 7, 96)
    ref = F.linear(x, dequantized(q), lin.bias)
    tol = 2e-2 if act else 1e-5  # int8 activation rounding on top of the weight error
    torch.testing.assert_close(q(x), ref, rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(dequantized(q), fake_quantize(lin.weight, scheme), rtol=0, atol=1e-6)


def test_quantize_model_is_close_and_leaves_input_untouched(tiny_model, family):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 32))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ref = tiny_model(input_ids=ids).logits
    stats = collect_stats(tiny_model, [ids[0]])
    errors = {}
    for name, scheme, act in [("w8a8", WeightScheme(num_bits=8), ActScheme()),
                              ("w8a8s", WeightScheme(num_bits=8), ActScheme(dynamic=False)),
                              ("w4", WeightScheme(num_bits=4, group_size=32, symmetric=False), None)]:
        result = quantize_variant(tiny_model, QuantSpec(name=name, weights=scheme, input_activations=act), stats)
        assert result.kept == {"lm_head": "ignored by recipe"}
        assert len(result.quantized) == 14  # 2 layers x (q, k, v, o, gate, up, down)
        out = result.model(input_ids=ids).logits
        errors[name] = ((out - ref).norm() / ref.norm()).item()
    # measured: w8a8 0.011-0.028, static 0.017-0.045, w4 g32 0.10-0.26 (relative logit error)
    assert errors["w8a8"] < 0.04 and errors["w8a8s"] < 0.07
    assert errors["w8a8"] < errors["w8a8s"] < errors["w4"] < 0.35
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_quantized_model_is_smaller(tiny_model):
    result = quantize_variant(tiny_model, QuantSpec(name="w4", scheme="W4A16_ASYM", weights={"group_size": 32}))
    fp = sum(p.numel() * 4 for p in {id(p): p for p in tiny_model.parameters()}.values())
    linear_fp = sum(m.weight.numel() * 4 for n, m in tiny_model.named_modules()
                    if isinstance(m, nn.Linear) and n in result.quantized)
    # every quantized weight shrinks ~8x (4 bits + one fp32 scale and one zero per 32 weights)
    assert fp - result.weight_bytes() > 0.8 * linear_fp


def test_static_activations_need_stats(tiny_model):
    spec = QuantSpec(name="s", scheme="W8A8", input_activations={"dynamic": False})
    with pytest.raises(CalqError, match="s need calibration samples"):
        quantize_variant(tiny_model, spec)


def test_presets_are_compressed_tensors_schemes_and_old_keys_are_refused():
    from compressed_tensors.quantization import preset_name_to_scheme

    for name in ("W4A16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC"):
        ours, theirs = QuantSpec(name="v", scheme=name), preset_name_to_scheme(name, ["Linear"])
        for key, args in (("weights", theirs.weights), ("input_activations", theirs.input_activations)):
            mine = getattr(ours, key if key == "weights" else "input_activations")
            assert (mine is None) == (args is None), (name, key)
            if mine is not None:
                assert (mine.num_bits, mine.type, mine.symmetric, mine.strategy) == \
                    (args.num_bits, str(getattr(args.type, "value", args.type)), args.symmetric,
                     str(getattr(args.strategy, "value", args.strategy))), (name, key)
                assert getattr(mine, "group_size", None) == args.group_size
                assert getattr(mine, "dynamic", False) == bool(args.dynamic)
    override = QuantSpec(name="v", scheme="W4A16_ASYM", weights={"group_size": 64})
    assert (override.weights.group_size, override.weights.symmetric, override.weights.strategy) == (64, False, "group")
    for old, new in (({"weights": {"bits": 4}}, "num_bits"), ({"activations": {"mode": "dynamic"}}, "input_activations"),
                     ({"scheme": "W8A8", "awq": {}}, "options"), ({"scheme": "W8A8", "smoothquant": {}}, "options")):
        with pytest.raises(ValueError, match=f"renamed: use {new}"):
            QuantSpec.model_validate({"name": "v", **old})
    with pytest.raises(ValueError, match="unknown method 'rtn'"):
        QuantSpec(name="v", scheme="W4A16", method="rtn")
    with pytest.raises(ValueError, match="options of awq.*n_grid"):
        QuantSpec(name="v", scheme="W4A16", method="awq", options={"n_grid": 0})
    with pytest.raises(ValueError, match="renamed: use n_grid"):
        QuantSpec(name="v", scheme="W4A16", method="awq", options={"grid": 4})


def _gptq_reference_sym(w: torch.Tensor, group: int) -> torch.Tensor:
    """GPTQ's own symmetric quantizer (Frantar et al., quant.py `Quantizer.find_params` with sym=True), per group:
    xmax = max(|xmin|, xmax), scale = 2 xmax / maxq, zero = (maxq + 1) / 2, q = clamp(round(x / scale) + zero)."""
    g = w.reshape(w.shape[0], -1, group)
    xmax = torch.maximum(g.amin(-1).abs(), g.amax(-1))
    scale = (2 * xmax / 15)[..., None]
    q = torch.clamp(torch.round(g / scale) + 8, 0, 15)
    return ((q - 8) * scale).reshape(w.shape)


def test_symmetric_int4_is_compressed_tensors_and_gptq_value_for_value():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    w = torch.randn(32, 256)
    w[3, 5], w[4, 200] = 9.0, -9.0  # a group whose extreme is positive, one whose extreme is negative
    scheme = WeightScheme(num_bits=4, group_size=64)
    ours = fake_quantize(w, scheme)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    g = w.reshape(32, -1, 64)
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    theirs = ct_fake_quantize(w, scale, zero, args)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, _gptq_reference_sym(w, 64))
    assert ours[3, 5] == pytest.approx(9.0 * 7 / 7.5)  # +absmax loses half a step, not a whole one


def test_bfloat16_models_quantize_save_and_reload(family, tokenizer, tmp_path):
    """A bfloat16 model end to end: W4 and W8A8 variants in bfloat16 (scales in the model's dtype), close to the
    float model, and the checkpoint reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from quant.formats import load, save_quantized
    from tests.conftest import tiny_config

    torch.manual_seed(0)  # built in bfloat16, as from_pretrained(dtype=bfloat16) does (rotary frequencies stay fp32)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.bfloat16).eval()
    model.requires_grad_(False)  # as load_model leaves it: with grad on, the kernels take their reference path, and
    # the reloaded model (grad off) the CPU path the dispatch chose; int4pack rounds bf16 differently from it
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits.float()
    for spec in (QuantSpec(name="w4", scheme="W4A16_ASYM", weights={"group_size": 32}),
                 QuantSpec(name="w8", scheme="W8A8")):
        result = quantize_variant(model, spec)
        q = result.model.get_submodule("model.layers.0.mlp.down_proj")
        assert q.scales.dtype == (torch.bfloat16 if spec.weights.num_bits == 4 else torch.float32)
        out = result.model(input_ids=ids).logits
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref).norm() / ref.norm()) < 0.4
        save_quantized(result, tokenizer, tmp_path / spec.name)
        back, _ = load(tmp_path / spec.name, device="cpu")
        assert torch.equal(back(input_ids=ids).logits, out)


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_kernel_paths_name_what_runs_for_the_models_dtype(tiny_model):
    """The report's CPU paths are those of the model's x dtype: int4pack serves bfloat16 x only, so a float32 model
    runs dequant under the same forced path, and the counts say so."""
    import calq_kernels as kernels

    from quant.methods import kernel_paths

    result = quantize_variant(tiny_model, QuantSpec(name="w4", scheme="W4A16_ASYM", weights={"group_size": 32}))
    with kernels.force_cpu_paths(w4a16="int4pack"):
        fp32 = kernel_paths(result.model)
        bf16 = kernel_paths(result.model.to(torch.bfloat16))
    assert fp32 == {"w4a16: CPU dequant (prefill), dequant (decode), float32 x": 14}
    assert bf16 == {"w4a16: CPU int4pack (prefill), int4pack (decode), bfloat16 x": 14}


def test_fp8_schemes_are_validated_when_the_recipe_loads():
    spec = QuantSpec(name="f", scheme="FP8_DYNAMIC", method="smoothquant")
    assert (spec.weights.type, spec.input_activations.type, spec.input_activations.dynamic) == ("float", "float", True)
    with pytest.raises(ValueError, match="gptq picks integer codes"):
        QuantSpec(name="f", scheme="FP8_DYNAMIC", method="gptq")
    with pytest.raises(ValueError, match="FP8 weights run with FP8 activations"):
        QuantSpec(name="f", weights={"num_bits": 8, "type": "float"})
    with pytest.raises(ValueError, match="FP8 weights run with FP8 activations"):
        QuantSpec(name="f", weights={"num_bits": 8, "type": "float"}, input_activations={"dynamic": True})
    with pytest.raises(ValueError, match="float activations with int weights"):
        QuantSpec(name="f", scheme="W8A8", input_activations={"type": "float"})
    with pytest.raises(ValueError, match="FP8 e4m3 with one scale per output channel"):
        WeightScheme(num_bits=4, type="float", group_size=32)
    with pytest.raises(ValueError, match="FP8 activations are dynamic per token"):
        ActScheme(type="float", dynamic=False)
