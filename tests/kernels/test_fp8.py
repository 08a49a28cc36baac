"""FP8 W8A8: the CPU reference is an exact emulation (e4m3 activations rounded as the GPU rounds them, exact products,
float32 sums), checked against a float64 computation on the same e4m3 values and against torch._scaled_mm on CPU."""

import pytest
import torch

from calq_kernels import fp8_linear, fp8_linear_ref, quantize_fp8_per_token

E4M3 = torch.float8_e4m3fn


def _weights(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w_scale = w.abs().amax(1) / 448
    return (w / w_scale[:, None]).to(E4M3), w_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (2, 3, 160)])
def test_reference_is_exact_products_in_float32(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    x[..., 0, :] = 0  # an all-zero token gets scale 1
    qweight, w_scale = _weights(24, shape[-1])
    bias = torch.randn(24)
    q, scale = quantize_fp8_per_token(x)
    assert q.dtype == E4M3 and torch.equal(scale[..., 0, :], torch.ones_like(scale[..., 0, :]))
    assert (q.float().abs().amax(-1) == 448)[..., 1:].all()  # each token's largest value lands on e4m3's max
    exact = (q.double() @ qweight.double().T) * scale.double() * w_scale.double() + bias.double()
    out = fp8_linear_ref(x, qweight, w_scale, bias)
    assert out.dtype == dtype and out.shape == (*shape[:-1], 24)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), exact.to(dtype).double(), rtol=tol, atol=tol * exact.abs().max().item())


def test_reference_matches_scaled_mm():
    x = torch.randn(7, 128, dtype=torch.bfloat16)
    qweight, w_scale = _weights(40, 128, seed=1)
    q, scale = quantize_fp8_per_token(x)
    theirs = torch._scaled_mm(q, qweight.t(), scale_a=scale, scale_b=w_scale[None, :], out_dtype=torch.bfloat16)
    torch.testing.assert_close(fp8_linear(x, qweight, w_scale), theirs, rtol=1e-2, atol=1e-2)


def test_bad_arguments_name_the_fix():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="float8_e4m3fn of shape"):
        fp8_linear(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="w_scale must be float32"):
        fp8_linear(x, torch.zeros(4, 8, dtype=E4M3), torch.ones(3))
