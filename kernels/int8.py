"""W8A8 and W8A16: int8 weights with per-output-channel scales times quantized or float activations.

Weights: qweight int8 (N, K), symmetric, and w_scale float (N,): w = qweight * w_scale[:, None].
Activations, by `act`:
    "dynamic"  each token (row) t is quantized with its own scale max|x_t| / 127 (1 for an all-zero row),
    "static"   one given per-tensor scale act_scale,
    "none"     x stays float (W8A16),
with q = clamp(round(x / scale), -127, 127), rounding half to even, and NaN quotients to 0 (a row holding NaN
or inf gets a non-finite dynamic scale, which makes its output row non-finite). The int8 x int8 products are
summed in int32, then scaled by the token and channel scales in float32.

int8_linear and quantize_per_token run Triton kernels on CUDA tensors. On CPU int8_linear takes the path that
kernels/cpu.py chose for this machine (torch._int_mm, exact float32 matmuls or native.c's fused decode kernel for
W8A8, each bit for bit the reference; the reference's weight (in bfloat16 for bfloat16 prefill), torch's bfloat16
int8 kernel or native.c for W8A16); quantize_per_token and other devices run the references.
"""

import functools
import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import cpu as _cpu
from . import native as _native
from ._common import autotune_configs, check_triton_inputs, device_context, launch, m_bucket, tile_ids

_ACTS = ("dynamic", "static", "none")


def _check_float(op: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}; convert it (x.half())")


def _quantize_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / scale).clamp(-127, 127).nan_to_num(0.0).to(torch.int8)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quantize_per_token, computed in float32."""
    _check_float("quantize_per_token", x)
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, 1.0, scale)
    return _quantize_ref(x, scale), scale


def _check_int8_args(x, qweight, w_scale, bias, act, act_scale) -> tuple[int, int]:
    """Check the arguments of int8_linear (any device, any float x); return (N, K)."""
    _check_float("int8_linear", x)
    k = x.shape[-1]
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"int8_linear: qweight must be 2-D int8, got {qweight.dim()}-D {qweight.dtype}")
    n = qweight.shape[0]
    if qweight.shape[1] != k:
        raise ValueError(f"int8_linear: x has K={k} but qweight has shape {tuple(qweight.shape)}; expected ({n}, {k})")
    if tuple(w_scale.shape) != (n,) or not w_scale.is_floating_point():
        raise ValueError(
            f"int8_linear: w_scale must be float of shape ({n},), got {w_scale.dtype} {tuple(w_scale.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise ValueError(f"int8_linear: bias must be float of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if act not in _ACTS:
        raise ValueError(f"int8_linear: act must be one of {_ACTS}, got {act!r}")
    if act == "static" and (act_scale is None or act_scale.numel() != 1 or not act_scale.is_floating_point()):
        raise ValueError("int8_linear: act='static' needs act_scale, a float tensor holding one scale")
    if act != "static" and act_scale is not None:
        raise ValueError(f"int8_linear: act_scale is only used with act='static', got act={act!r}; drop act_scale")
    return n, k


def int8_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: Literal["dynamic", "static", "none"] = "dynamic",
    act_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference of int8_linear: the exact int32 matmul, then the scales (in float64)."""
    _check_int8_args(x, qweight, w_scale, bias, act, act_scale)
    if act == "none":
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = qweight.to(dtype) * w_scale.to(dtype)[:, None]
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype)).to(x.dtype)
    if act == "dynamic":
        q, scale = quantize_per_token_ref(x)
    else:
        scale = act_scale.float()
        q = _quantize_ref(x.float(), scale)
    out = _int_matmul(q, qweight).double() * scale.double() * w_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def _int_matmul(q: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact int32 (..., K) x (N, K)^T. On CPU torch._int_mm where it is exact (int_mm_exact), except for K = 1, where
    torch 2.13's oneDNN path returns uninitialized memory; elsewhere (and for K = 1) float64 is exact for
    |sums| < 2**53 and takes any shape."""
    if q.device.type == "cpu" and q.shape[-1] > 1 and int_mm_exact():
        return torch._int_mm(q.reshape(-1, q.shape[-1]), qweight.T).reshape(*q.shape[:-1], -1)
    return (q.double() @ qweight.double().T).to(torch.int32)


@functools.cache
def int_mm_exact() -> bool:
    """Whether torch._int_mm sums int8 products exactly on this CPU (checked once, on extreme codes). oneDNN's int8
    kernels without VNNI add pairs of u8 x s8 products in saturating int16 (vpmaddubsw): where torch still routes
    _int_mm to them (oneDNN capped with ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI CPU) sums are off by up to 1.3e5 at K=576."""
    gen = torch.Generator().manual_seed(0)
    q = torch.where(torch.rand(17, 512, generator=gen) < 0.5, 127, -127).to(torch.int8)
    w = torch.randint(-128, 128, (64, 512), dtype=torch.int8, generator=gen)
    return torch.equal(torch._int_mm(q, w.T).double(), q.double() @ w.double().T)


_INT_MM_INEXACT = "torch._int_mm is not exact on this CPU (oneDNN's int8 kernels without VNNI saturate)"


# ----------------------------------------------------------------------------------------------
# CPU paths (see kernels/cpu.py)
# ----------------------------------------------------------------------------------------------

_MIN_NORMAL = torch.finfo(torch.float32).tiny
_HOST_CHECK_ROWS = 16
"""Up to this many rows (decode), the per-token scales are checked on the host (see _quantize_float)."""
_EXACT_CHUNK_K = 1024
"""float32 sums of int8 x int8 products over at most this many terms are exact: 127 * 128 * 1024 < 2**24."""


def _quantize_float(x2: torch.Tensor, act_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's quantization of x2 (M, K), codes kept as float32: (q float32 (M, K), scale float32).

    The same float32 operations as quantize_per_token_ref / _quantize_ref (in place), so q holds the reference's
    codes exactly. scale: (M, 1) per token when act_scale is None, else act_scale as float32.
    """
    xf = x2.float()
    normal = False
    if act_scale is None:
        scale = xf.abs().amax(-1, keepdim=True).div_(127)
        # Where every per-token scale is finite and normal, none is zero, |x / scale| <= 127 * (1 + 2**-23) rounds
        # to at most 127 and no row holds NaN or inf: the zero fix, clamp and nan_to_num would change nothing.
        # Checked on the host for a few rows (one read; the ops it saves cost more at decode), on the tensor from
        # 64 rows on, and not at all in between (the ops are cheaper than the check).
        if scale.shape[0] <= _HOST_CHECK_ROWS:
            normal = all(_MIN_NORMAL <= v < math.inf for v in scale.view(-1).tolist())
        elif scale.shape[0] >= 64:
            normal = bool(((scale >= _MIN_NORMAL) & (scale < math.inf)).all())
        if not normal:
            scale.masked_fill_(scale == 0, 1.0)
    else:
        scale = act_scale.float()
    q = torch.div(xf, scale)
    q.round_()
    if not normal:
        q.clamp_(-127, 127).nan_to_num_(0.0)
    return q, scale


def _scale_sums(sums, scale, w_scale, bias, dtype) -> torch.Tensor:
    """The reference's epilogue on exact integer sums (int32, float32 or float64): sums * scale * w_scale (+ bias),
    in float64 and in the reference's order, then cast to dtype. Bit for bit int8_linear_ref. Float64 sums are
    scaled in place (the caller's temporary)."""
    out = sums.double()  # not torch.mul(sums, scale.double()): a 0-d static scale would not promote to float64
    out.mul_(scale).mul_(w_scale)  # in place on float64: the float operands are converted to float64 exactly
    if bias is not None:
        out.add_(bias)
    return out.to(dtype)


def _float_exact_matmul(q: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
    """Exact q (M, K) @ wf (N, K).T of integer-valued float32 codes |q| <= 127, |wf| <= 128.

    One float32 matmul is exact when every partial sum is an integer below 2**24 in magnitude, in whatever order
    the BLAS adds: so when K <= 1024, or when each row's sum of |q| times 128 stays below 2**24 (real activations,
    whose per-token scale is set by a few large values, mostly do). Otherwise float32 matmuls over K chunks of at
    most 1024 (each exact), summed in float64 (exact)."""
    k = q.shape[1]
    chunks = -(-k // _EXACT_CHUNK_K)
    if chunks <= 1 or float(q.abs().sum(-1).max()) * 128 < 2**24:
        return torch.mm(q, wf.T)
    step = -(-k // chunks)
    sums = torch.mm(q[:, :step], wf[:, :step].T).double()
    for start in range(step, k, step):
        sums.add_(torch.mm(q[:, start : start + step], wf[:, start : start + step].T))
    return sums


def _float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().contiguous()


def _int8_linear_cpu(x, qweight, w_scale, bias, act, act_scale) -> torch.Tensor:
    """int8_linear on the CPU path kernels/cpu.py planned for this op, row count and x dtype; counted there."""
    n, k = _check_int8_args(x, qweight, w_scale, bias, act, act_scale)
    if torch.compiler.is_compiling():
        return int8_linear_ref(x, qweight, w_scale, bias, act, act_scale)
    op = "w8a16" if act == "none" else "w8a8"
    m = x.numel() // k if k else 0
    planned = path = _cpu.plan(op, m, x.dtype)
    why = ""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_scale, bias, act_scale))
    if grad and path != "ref":
        path, why = "ref", "autograd needs the reference"
    if path == "ref":
        _cpu.record(op, path, planned, why)
        return int8_linear_ref(x, qweight, w_scale, bias, act, act_scale)
    if path == "native":
        # W8A8's float64 epilogue would see float64 scales rounded to float32; W8A16's reference rounds them too
        wide = op == "w8a8" and any(t is not None and t.dtype == torch.float64 for t in (w_scale, bias, act_scale))
        if m > _native.MAX_ROWS or wide:
            path = _cpu.general(op, m)
            why = "native takes no float64 scales or bias" if wide else f"native takes at most {_native.MAX_ROWS} rows"
        else:
            _cpu.record(op, path)
            qweight, ws, b = qweight.contiguous(), _float32(w_scale), _float32(bias)
            if op == "w8a8":
                return _native.w8a8(x, qweight, ws, b, _float32(act_scale))
            return _native.wxa16(x, qweight, ws[:, None], max(k, 1), b)
    if op == "w8a16":
        if path == "int8pack" and (k % 16 or not m or not n):
            path, why = "dequant", "int8pack needs K % 16 == 0 and a non-empty output"
        _cpu.record(op, path, planned, why)
        if path == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, k).contiguous(), qweight.contiguous(),
                                                     w_scale.bfloat16())
            if bias is not None:
                out.add_(bias)
            return out.view(*x.shape[:-1], n)
        dtype = _cpu.dequant_dtype(path, x.dtype)
        wide = torch.promote_types(dtype, torch.float32)
        w = _cpu.prepared(op, path, (qweight, w_scale), lambda: (qweight.to(wide) * w_scale.to(wide)[:, None]).to(dtype),
                          str(dtype))  # fmt: skip
        out = F.linear(x if x.dtype == dtype else x.to(dtype), w, None if bias is None else bias.to(dtype))
        return out if out.dtype == x.dtype else out.to(x.dtype)
    if path == "int_mm" and not int_mm_exact():
        path, why = "float_exact", _INT_MM_INEXACT
    _cpu.record(op, path, planned, why)
    q, scale = _quantize_float(x.reshape(-1, k), act_scale if act == "static" else None)
    if path == "int_mm":
        q = q.to(torch.int8)
        sums = torch._int_mm(q, qweight.T) if k > 1 else _int_matmul(q, qweight)  # as the reference
    else:
        sums = _float_exact_matmul(q, _cpu.prepared(op, path, (qweight,), qweight.float))
    return _scale_sums(sums, scale, w_scale, bias, x.dtype).view(*x.shape[:-1], n)


def _timed_call(act: str, path: str, m: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """int8_linear (act) forced onto CPU path for m rows of x in dtype on a synthetic 512 x 512 weight: what
    kernels/cpu.py times."""
    gen = torch.Generator().manual_seed(0)
    qweight = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(512, generator=gen) * 0.01
    x = torch.randn(m, 512, generator=gen).to(dtype)
    forced = {"w8a16" if act == "none" else "w8a8": path}

    def call() -> torch.Tensor:
        with _cpu.force_cpu_paths(**forced):
            return _int8_linear_cpu(x, qweight, w_scale, None, act, None)

    return call


_cpu.CALLS["w8a8"] = functools.partial(_timed_call, "dynamic")
_cpu.UNAVAILABLE["w8a8/int_mm"] = lambda: None if int_mm_exact() else _INT_MM_INEXACT
_cpu.CALLS["w8a16"] = functools.partial(_timed_call, "none")


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_half_to_even(v):
    """Round fp32 v with |v| <= 2**22 to an integer, ties to even like torch.round: adding 1.5 * 2**23 leaves no
    fraction bits, so the fp32 addition itself rounds."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr,
                          DYNAMIC: tl.constexpr):  # fmt: skip
    """q (M, K) int8, contiguous = clamp(round(x (M, K) / scale), -127, 127); one program per row, in one pass.

    DYNAMIC: the row's scale max|x| / 127 (1 for an all-zero row) is computed from the row held in registers
    (BLOCK_K >= K) and stored to scale_ptr (M,) float32; otherwise scale_ptr holds one float32 scale for all rows.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if DYNAMIC:
        scale = tl.math.div_rn(tl.reduce(tl.abs(x), 0, _max_propagating_nan), 127.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    v = tl.math.div_rn(x, scale)
    v = tl.where(v == v, v, 0.0)
    v = _round_half_to_even(tl.minimum(tl.maximum(v, -127.0), 127.0))
    tl.store(q_ptr + row * K + offs, v.to(tl.int8), mask=mask)


def _quantize_rows(x: torch.Tensor, act_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x (M, K) with the fused kernel: per-row scales when act_scale is None, else the one act_scale.

    Returns q (M, K) int8 and the scales as float32 (M,) (for static, act_scale broadcast with stride 0).
    """
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    dynamic = act_scale is None
    scale = torch.empty(m, device=x.device) if dynamic else act_scale.to(torch.float32).reshape(1).expand(m)
    if q.numel():
        block_k = triton.next_power_of_2(k)
        num_warps = max(1, min(16, block_k // 512))
        _quantize_rows_kernel[(m,)](x, q, scale, k, *x.stride(), BLOCK_K=block_k, DYNAMIC=dynamic, num_warps=num_warps)
    return q, scale


_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]


TUNING = {"int8_matmul": _MATMUL_CONFIGS}
"""The configs the int8 matmul autotunes over."""


def tuning(m: int) -> dict[str, list[triton.Config]]:
    """The kernel a call with m rows launches (the same for any m) and the configs it autotunes over."""
    return dict(TUNING)


@triton.autotune(autotune_configs(_MATMUL_CONFIGS), key=["M_BUCKET", "N", "K"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def _int8_matmul_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_as, stride_bn, stride_bk, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """c (M, N) = (a (M, K) @ b (N, K).T) * a_scale[:, None] * b_scale[None, :] (+ bias (N,)), in c's dtype.

    a int8 (W8A8): int32 accumulation, with a_scale (M,) float32 read with stride stride_as (0: one scale).
    a float16/bfloat16/float32 (W8A16): b converted exactly to a's dtype, fp32 accumulation, a_scale None.
    b int8, b_scale (N,) float, bias (N,) float or None. Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N).
    M_BUCKET is only the autotuning key.
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    integer: tl.constexpr = a_ptr.dtype.element_ty == tl.int8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if integer else tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )
        if not integer:  # exact; via float32, the only bfloat16 cast the Triton interpreter gets right
            b = b.to(tl.float32).to(a.dtype)
        acc = tl.dot(a, b, acc)

    c = acc.to(tl.float32)
    if a_scale_ptr is not None:
        c *= tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0)[:, None]
    c *= tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if bias_ptr is not None:
        c += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _int8_matmul(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch _int8_matmul_kernel: a (M, K) int8 with a_scale float32 (M,), or a float with a_scale None -> (M, N)."""
    m, k = a.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if out.numel():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        launch(
            "int8_matmul", _int8_matmul_kernel, grid,
            a, a_scale, qweight, w_scale, bias, out,
            m, n, k, m_bucket(m),
            *a.stride(), 0 if a_scale is None else a_scale.stride(0), *qweight.stride(), *out.stride(),
            GROUP_M=8,
        )  # fmt: skip
    return out


def _quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token on the fused Triton kernel."""
    _check_float("quantize_per_token", x)
    check_triton_inputs("quantize_per_token", x, {})
    with device_context(x):
        q, scale = _quantize_rows(x.reshape(-1, x.shape[-1]), None)
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def _int8_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: str = "dynamic",
    act_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int8_linear on the Triton kernels: fused activation quantization, then the int8 matmul."""
    n, k = _check_int8_args(x, qweight, w_scale, bias, act, act_scale)
    tensors = {"qweight": qweight, "w_scale": w_scale, "bias": bias, "act_scale": act_scale}
    check_triton_inputs("int8_linear", x, tensors)
    x2 = x.reshape(-1, k)
    with device_context(x):
        if act == "none":
            out = _int8_matmul(x2, None, qweight, w_scale, bias, x.dtype)
        else:
            q, scale = _quantize_rows(x2, act_scale if act == "static" else None)
            out = _int8_matmul(q, scale, qweight, w_scale, bias, x.dtype)
    return out.view(*x.shape[:-1], n)


_quantize_per_token_op = torch.library.custom_op(
    "calq::quantize_per_token", _quantize_per_token_triton, mutates_args=()
)
_int8_linear_op = torch.library.custom_op("calq::int8_linear", _int8_linear_triton, mutates_args=())


@_quantize_per_token_op.register_fake
def _quantize_per_token_fake(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@_int8_linear_op.register_fake
def _int8_linear_fake(x, qweight, w_scale, bias=None, act="dynamic", act_scale=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization of x (..., K): (q int8 (..., K), scale float32 (..., 1)).

    scale = max|x_t| / 127 per row (1 for an all-zero row), q = clamp(round(x / scale), -127, 127).
    CUDA x runs the fused Triton kernel (through the custom op calq::quantize_per_token under torch.compile);
    other devices run quantize_per_token_ref.
    """
    if x.is_cuda:
        quantize = _quantize_per_token_op if torch.compiler.is_compiling() else _quantize_per_token_triton
        return quantize(x)
    return quantize_per_token_ref(x)


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: Literal["dynamic", "static", "none"] = "dynamic",
    act_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """W8A8 (act "dynamic" or "static") or W8A16 (act "none") linear: x (..., K) -> (..., N) in x's dtype.

    See the module docstring for the quantization. CUDA x runs the Triton kernels, through the custom op
    calq::int8_linear under torch.compile (in eager mode the op's dispatch is skipped); float32 x in W8A16 uses TF32
    tensor cores. CPU x takes the path of kernels/cpu.py (W8A8 bit for bit int8_linear_ref; see cpu_dispatch());
    other devices run int8_linear_ref.
    """
    if x.is_cuda:
        linear = _int8_linear_op if torch.compiler.is_compiling() else _int8_linear_triton
        return linear(x, qweight, w_scale, bias, act, act_scale)
    if x.device.type == "cpu":
        return _int8_linear_cpu(x, qweight, w_scale, bias, act, act_scale)
    return int8_linear_ref(x, qweight, w_scale, bias, act, act_scale)
