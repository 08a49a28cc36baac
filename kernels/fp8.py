"""FP8 W8A8: float8 e4m3 weights with one scale per output channel times per-token dynamic e4m3 activations.

On Hopper this, not int8, is the 8-bit path runtimes use (vLLM's FP8_DYNAMIC). Weights: qweight float8_e4m3fn (N, K)
and w_scale float32 (N,): w = qweight * w_scale[:, None]. Activations: each token (row) t gets the scale
max|x_t| / 448 (1 for an all-zero row) and q = x / scale cast to e4m3 (round to nearest even, saturating at 448).
The e4m3 x e4m3 products are exact in float32 (4 + 4 significant bits) and summed in float32, then scaled by the
token and channel scales.

fp8_linear runs torch._scaled_mm (cuBLAS FP8) on CUDA tensors and the torch reference fp8_linear_ref elsewhere.
"""

from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization of x (..., K): (q float8_e4m3fn (..., K), scale float32 (..., 1))."""
    if not x.is_floating_point():
        raise ValueError(f"quantize_fp8_per_token: x must be a floating-point tensor, got {x.dtype}")
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale == 0, 1.0, scale)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _check_fp8_args(x, qweight, w_scale, bias) -> tuple[int, int]:
    if not x.is_floating_point():
        raise ValueError(f"fp8_linear: x must be a floating-point tensor, got {x.dtype}; convert it (x.bfloat16())")
    k = x.shape[-1]
    if qweight.dim() != 2 or qweight.dtype != E4M3 or qweight.shape[1] != k:
        raise ValueError(f"fp8_linear: qweight must be float8_e4m3fn of shape (N, {k}), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[0]
    if tuple(w_scale.shape) != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear: w_scale must be float32 of shape ({n},), got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    return n, k


def fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference of fp8_linear: the same activation quantization, exact products, float32 sums."""
    n, k = _check_fp8_args(x, qweight, w_scale, bias)
    q, scale = quantize_fp8_per_token(x)
    out = (q.float() @ qweight.float().T) * scale * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _fp8_linear_cuda(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """cuBLAS FP8 with row-wise scales (torch._scaled_mm), activations quantized by the same formula."""
    n, k = _check_fp8_args(x, qweight, w_scale, bias)
    q, scale = quantize_fp8_per_token(x.reshape(-1, k))
    out = torch._scaled_mm(q, qweight.t(), scale_a=scale, scale_b=w_scale[None, :], out_dtype=torch.bfloat16,
                           bias=None if bias is None else bias.to(torch.bfloat16))  # row-wise scales: bf16 out
    return out.to(x.dtype).view(*x.shape[:-1], n)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 W8A8 linear: x (..., K) -> (..., N) in x's dtype (see the module docstring)."""
    if x.is_cuda:
        return _fp8_linear_cuda(x, qweight, w_scale, bias)
    return fp8_linear_ref(x, qweight, w_scale, bias)
