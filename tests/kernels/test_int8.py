"""W8A8 / W8A16 kernel tests: the fused per-token quantization and the int32 accumulation exactly, the Triton path
(interpreted on CPU, see conftest.py) against a float64 reference, NaN/Inf, errors, CPU dispatch and custom ops."""

import pytest
import torch

from calq_kernels import int8_linear, int8_linear_ref, quantize_per_token, quantize_per_token_ref
from calq_kernels.int8 import (
    _int8_linear_op,
    _int8_linear_triton,
    _int8_matmul,
    _quantize_per_token_op,
    _quantize_per_token_triton,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACTS = ["dynamic", "static", "none"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_int8(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    return qweight, w_scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (17, 70), (2, 3, 33)])
def test_fused_quantization_equals_reference(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    x[..., 0, :] = 0  # an all-zero row gets scale 1
    q, scale = _quantize_per_token_triton(x)
    q_ref, scale_ref = quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_quantization_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0]])  # scale 1: every quotient is exact
    expected = torch.tensor([[127, 0, 2, 2, 0, -2, 126, -127]], dtype=torch.int8)
    assert torch.equal(quantize_per_token_ref(x)[0], expected)
    assert torch.equal(_quantize_per_token_triton(x)[0], expected)


def test_int32_accumulation_is_exact():
    m, n, k = 17, 33, 70
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    a[0] = 127  # extreme sums: +-70 * 127 * 127
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    qweight[0], qweight[1] = 127, -127
    out = _int8_matmul(a, torch.ones(m), qweight, torch.ones(n), None, torch.float32)  # |sums| < 2**24: exact
    assert torch.equal(out, (a.long() @ qweight.long().T).float())


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [40, 70])
@pytest.mark.parametrize("n", [5, 33])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_triton_matches_float64_reference(m, n, k, dtype, act):
    qweight, w_scale = random_int8(n, k, seed=m * n + k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    act_scale = torch.tensor(3.0 / 127) if act == "static" else None
    out = _int8_linear_triton(x, qweight, w_scale, bias, act, act_scale)
    ref = int8_linear_ref(x.double(), qweight, w_scale, bias, act, act_scale)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < (1e-3 if dtype == torch.float32 else 1e-2)


def test_triton_batched_strided_input():
    qweight, w_scale = random_int8(33, 70)
    x = torch.randn(2, 3, 140, dtype=torch.float16)[..., ::2]
    out = _int8_linear_triton(x, qweight, w_scale.half())
    ref = int8_linear_ref(x.double(), qweight, w_scale.half())
    assert out.shape == (2, 3, 33) and rel_err(out, ref) < 1e-2


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("act", ["dynamic", "none"])
def test_triton_propagates_nan_and_inf(act):
    qweight, w_scale = random_int8(33, 70)
    x = torch.randn(4, 70, dtype=torch.float16)
    x[0, 5] = float("nan")
    x[1, 50] = float("inf")
    out = _int8_linear_triton(x, qweight, w_scale, act=act)
    ref = int8_linear_ref(x.double(), qweight, w_scale, act=act)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[0].isnan().all() and not out[1].isfinite().any() and out[2:].isfinite().all()
    torch.testing.assert_close(out, ref.half(), equal_nan=True, rtol=1e-2, atol=1e-2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_quantization_of_non_finite_rows():
    x = torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 1.0, -1.0], [1.0, 2.0, 3.0]])
    q, scale = _quantize_per_token_triton(x)
    q_ref, scale_ref = quantize_per_token_ref(x)
    assert torch.equal(q, q_ref)
    assert scale[0].isnan().all() and scale[1].isinf().all() and torch.equal(scale[2], scale_ref[2])
    assert (q[:2] == 0).all()


def test_errors_are_one_line_value_errors(monkeypatch):
    qweight, w_scale = random_int8(5, 40)
    x = torch.randn(3, 40)
    cases = [
        (lambda: _int8_linear_triton(x.double(), qweight, w_scale), "float16, bfloat16 or float32"),
        (lambda: _quantize_per_token_triton(x.double()), "float16, bfloat16 or float32"),
        (lambda: int8_linear(x.long(), qweight, w_scale), "floating-point"),
        (lambda: quantize_per_token(x.int()), "floating-point"),
        (lambda: int8_linear(x, qweight.int(), w_scale), "qweight must be 2-D int8"),
        (lambda: int8_linear(x[:, :32], qweight, w_scale), "expected"),
        (lambda: int8_linear(x, qweight, w_scale[:4]), "w_scale must be"),
        (lambda: int8_linear(x, qweight, w_scale, act="token"), "act must be one of"),
        (lambda: int8_linear(x, qweight, w_scale, act="static"), "needs act_scale"),
        (lambda: int8_linear(x, qweight, w_scale, act_scale=torch.tensor(1.0)), "only used with act='static'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        _int8_linear_triton(x, qweight, w_scale)


@pytest.mark.parametrize("act", ACTS)
def test_cpu_dispatch_is_the_reference(act):
    qweight, w_scale = random_int8(33, 70)
    x = torch.randn(2, 5, 70, dtype=torch.bfloat16)
    bias = torch.randn(33)
    act_scale = torch.tensor(0.03) if act == "static" else None
    out = int8_linear(x, qweight, w_scale, bias, act, act_scale)
    assert torch.equal(out, int8_linear_ref(x, qweight, w_scale, bias, act, act_scale))
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_custom_ops_opcheck():
    qweight, w_scale = random_int8(33, 40)
    x = torch.randn(3, 40, dtype=torch.float16)
    torch.library.opcheck(_quantize_per_token_op, (x,))
    torch.library.opcheck(_int8_linear_op, (x, qweight, w_scale, torch.randn(33), "dynamic", None))
    torch.library.opcheck(_int8_linear_op, (x, qweight, w_scale, None, "static", torch.tensor(0.02)))


@pytest.mark.parametrize("act", ACTS)
def test_every_autotune_config_is_correct(act):
    """The interpreter autotunes over the first config only: force each in turn."""
    from calq_kernels import forced_config, tuning_configs

    m, n, k = 19, 40, 160
    qweight, w_scale = random_int8(n, k)
    x = torch.randn(m, k, dtype=torch.float16)
    scale = torch.tensor(0.02) if act == "static" else None
    ref = int8_linear_ref(x, qweight, w_scale, act=act, act_scale=scale)
    (name, configs), = tuning_configs("int8", m).items()
    for config in configs:
        with forced_config(name, config):
            out = _int8_linear_triton(x, qweight, w_scale, act=act, act_scale=scale)
        assert rel_err(out, ref) < 1e-3, config
    assert len(configs) == 10
