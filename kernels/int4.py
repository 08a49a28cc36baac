"""W4A16: float16/bfloat16/float32 activations times packed int4 weights with per-group scales and zero points.

Weight layout (what the quantized linear module stores):
    qweight  int32 (N, ceil(K / 8)): nibble i (bits 4i..4i+3) of word j holds column k = 8 * j + i; K is padded
             with zeros to a multiple of 8.
    scales   float (N, G) and zeros uint8 (N, G) in 0..15, G = ceil(K / group_size); the last group may be shorter.
    w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

int4_linear runs the Triton kernel on CUDA tensors; on CPU the path kernels/cpu.py chose for this machine (the
reference's dequantized weight, prepared once inside kernels.weight_cache (in bfloat16 for bfloat16 prefill), torch's
bfloat16 int4 kernel, or native.c's decode kernel on int8 codes); on other devices the torch reference int4_linear_ref.
"""

import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import cpu as _cpu
from . import native as _native
from ._common import autotune_configs, check_triton_inputs, device_context, launch, m_bucket, tile_ids

_NIBBLE_SHIFTS = tuple(range(0, 32, 4))
# At most this many rows take the split-K decode path; more take the GEMM path.
_DECODE_MAX_M = 16


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes q (N, K), integers in 0..15 (uint8), into int32 (N, ceil(K / 8)), low nibble first."""
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"pack_int4: q must be a 2-D integer (uint8) tensor, got {q.dim()}-D {q.dtype}")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError("pack_int4: q holds values outside 0..15; clamp the codes to 0..15 before packing")
    n, k = q.shape
    padded = F.pad(q.to(torch.int64), (0, -k % 8))
    shifts = torch.tensor(_NIBBLE_SHIFTS, device=q.device)
    words = (padded.view(n, -1, 8) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack int32 (N, ceil(k / 8)) words from pack_int4 into uint8 codes (N, k)."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4: packed must be a 2-D int32 tensor, got {packed.dim()}-D {packed.dtype}")
    if packed.shape[1] != triton.cdiv(k, 8):
        raise ValueError(f"unpack_int4: k={k} needs {triton.cdiv(k, 8)} words per row, packed has {packed.shape[1]}")
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 15
    return nibbles.flatten(1)[:, :k].to(torch.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv costs microseconds per call, which the CPU decode path feels


def _check_int4_args(x, qweight, scales, zeros, group_size, bias) -> tuple[int, int]:
    """Check the arguments of int4_linear (any device, any float x); return (N, K)."""
    if not x.is_floating_point():
        raise ValueError(f"int4_linear: x must be a floating-point tensor, got {x.dtype}; convert it (x.half())")
    k = x.shape[-1]
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"int4_linear: qweight must be 2-D int32 (pack_int4), got {qweight.dim()}-D {qweight.dtype}")
    n = qweight.shape[0]
    if qweight.shape[1] != _cdiv(k, 8):
        raise ValueError(
            f"int4_linear: x has K={k}, which needs qweight of shape ({n}, {_cdiv(k, 8)}), "
            f"got {tuple(qweight.shape)}"
        )
    if group_size <= 0:
        raise ValueError(f"int4_linear: group_size must be positive, got {group_size}")
    groups = (n, _cdiv(k, group_size))
    if tuple(scales.shape) != groups or not scales.is_floating_point():
        raise ValueError(
            f"int4_linear: scales must be float of shape {groups}, got {scales.dtype} {tuple(scales.shape)}"
        )
    if tuple(zeros.shape) != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"int4_linear: zeros must be uint8 of shape {groups}, got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise ValueError(f"int4_linear: bias must be float of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    return n, k


def int4_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference of int4_linear: unpack, dequantize and F.linear in float32 (float64 for float64 x)."""
    n, k = _check_int4_args(x, qweight, scales, zeros, group_size, bias)
    dtype = torch.promote_types(x.dtype, torch.float32)
    group = torch.arange(k, device=x.device) // group_size
    q = unpack_int4(qweight, k).to(dtype)
    w = (q - zeros.to(dtype)[:, group]) * scales.to(dtype)[:, group]
    out = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# CPU paths (see kernels/cpu.py)
# ----------------------------------------------------------------------------------------------


def _unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, 8 * words) of pack_int4 words (N, words), padding columns included: on a little-endian
    machine byte j of a row holds columns 2j (low nibble) and 2j + 1, so two byte ops split them."""
    n, words = qweight.shape
    if sys.byteorder != "little":
        return unpack_int4(qweight, 8 * words)
    b = qweight.contiguous().view(torch.uint8)
    return torch.stack((b & 15, b >> 4), -1).view(n, 8 * words)


def _dequantize_cpu(qweight, scales, zeros, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight (N, k) in dtype, bit for bit int4_linear_ref's: the same (q - zero) * scale in dtype,
    each group broadcast over its columns instead of gathered per column."""
    n = qweight.shape[0]
    q = _unpack_codes(qweight)
    full = k // group_size
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    zeros, scales = zeros.to(dtype), scales.to(dtype)
    if full:
        kf = full * group_size
        body = w[:, :kf].view(n, full, group_size)
        torch.sub(q[:, :kf].view(n, full, group_size), zeros[:, :full, None], out=body)
        body.mul_(scales[:, :full, None])
    if k % group_size:  # the ragged last group
        tail = w[:, full * group_size :]
        torch.sub(q[:, full * group_size : k], zeros[:, full:], out=tail)
        tail.mul_(scales[:, full:])
    return w


def _int4pack_group(n: int, k: int, group_size: int) -> Optional[int]:
    """The group size torch's int4 CPU kernel runs this weight with: the largest of 256/128/64/32 dividing both
    group_size (each torch group lies in one of ours) and K; None when none does or N % 16 != 0."""
    if n % 16:
        return None
    return next((g for g in (256, 128, 64, 32) if group_size % g == 0 and k % g == 0), None)


def _int4pack_weight(qweight, scales, zeros, group_size: int, k: int, torch_group: int):
    """(torch's packing of the codes, scales_and_zeros (K / torch_group, N, 2) bfloat16) for
    _weight_int4pack_mm_for_cpu, which computes w = (q - 8) * scale + zero: zero = (8 - zeros) * scale."""
    codes = _unpack_codes(qweight)[:, :k].to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    group = torch.arange(0, k, torch_group, device=qweight.device) // group_size
    s, z = scales[:, group].float(), zeros[:, group].float()
    scales_zeros = torch.stack((s, (8 - z) * s), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_zeros


def _native_weight(qweight, scales, zeros, group_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the codes q - zero as int8 (N, K), the scales as float32 (N, G)) for native.c's calq_wxa16: a byte per
    weight, and its products with the scales are the reference's float32 weight."""
    q = _unpack_codes(qweight)[:, :k].to(torch.int16)
    zero = zeros.to(torch.int16).repeat_interleave(group_size, 1)[:, :k]
    return (q - zero).to(torch.int8).contiguous(), scales.float().contiguous()


def _int4_linear_cpu(x, qweight, scales, zeros, group_size, bias) -> torch.Tensor:
    """int4_linear on the CPU path kernels/cpu.py planned for this row count and x dtype; counted there."""
    n, k = _check_int4_args(x, qweight, scales, zeros, group_size, bias)
    if torch.compiler.is_compiling():
        return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)
    op = "w4a16"
    m = x.numel() // k if k else 0
    planned = path = _cpu.plan(op, m, x.dtype)
    why = ""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, bias)):
        if path != "ref":
            path, why = "ref", "autograd needs the reference"
    if path == "ref":
        _cpu.record(op, path, planned, why)
        return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)
    tensors = (qweight, scales, zeros)
    if path == "native":
        if m > _native.MAX_ROWS:
            path, why = "dequant", f"native takes at most {_native.MAX_ROWS} rows"
        else:
            _cpu.record(op, path)
            codes, scales32 = _cpu.prepared(
                op, path, tensors, lambda: _native_weight(qweight, scales, zeros, group_size, k), f"g{group_size}"
            )  # fmt: skip
            return _native.wxa16(x, codes, scales32, group_size, None if bias is None else bias.float().contiguous())
    if path == "int4pack":
        torch_group = _int4pack_group(n, k, group_size)
        if torch_group is None or not m:
            path = "dequant"
            why = "int4pack needs N % 16 == 0, a group size of 32/64/128/256 dividing group_size and K, and rows"
    _cpu.record(op, path, planned, why)
    if path == "int4pack":
        packed, scales_zeros = _cpu.prepared(
            op, path, tensors, lambda: _int4pack_weight(qweight, scales, zeros, group_size, k, torch_group),
            f"g{group_size}",
        )  # fmt: skip
        x2 = x.reshape(-1, k).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, torch_group, scales_zeros)
        if bias is not None:
            out.add_(bias)
        return out.view(*x.shape[:-1], n)
    dtype = _cpu.dequant_dtype(path, x.dtype)
    wide = torch.promote_types(dtype, torch.float32)
    w = _cpu.prepared(op, path, tensors, lambda: _dequantize_cpu(qweight, scales, zeros, group_size, k, wide).to(dtype),
                      f"g{group_size}/{dtype}")  # fmt: skip
    out = F.linear(x if x.dtype == dtype else x.to(dtype), w, None if bias is None else bias.to(dtype))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _timed_call(path: str, m: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """int4_linear (group size 64) forced onto CPU path for m rows of x in dtype on a synthetic 512 x 512 weight:
    what kernels/cpu.py times."""
    gen = torch.Generator().manual_seed(0)
    qweight = pack_int4(torch.randint(0, 16, (512, 512), dtype=torch.uint8, generator=gen))
    scales = torch.rand(512, 8, generator=gen) * 0.01
    zeros = torch.randint(0, 16, (512, 8), dtype=torch.uint8, generator=gen)
    x = torch.randn(m, 512, generator=gen).to(dtype)

    def call() -> torch.Tensor:
        with _cpu.force_cpu_paths(w4a16=path):
            return _int4_linear_cpu(x, qweight, scales, zeros, 64, None)

    return call


_cpu.CALLS["w4a16"] = _timed_call


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT_K": 1}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "SPLIT_K": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "SPLIT_K": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_K": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "SPLIT_K": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "SPLIT_K": 1}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "SPLIT_K": 1}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "SPLIT_K": 1}, num_warps=8, num_stages=3),
]
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 8}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 16}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 4}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 256, "SPLIT_K": 8}, num_warps=8, num_stages=3),
]


@triton.jit(do_not_specialize=["M_BUCKET"])
def _int4_matmul_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, M_BUCKET, group_size,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    """out (M, N) = x (M, K) @ w.T (+ bias (N,)), w (N, K) dequantized from int4 in registers.

    w_ptr: int32 (N, ceil(K / 8)) packed as pack_int4; scales (N, G) float, zeros (N, G) uint8, bias (N,) float or
    None. group_size is a multiple of BLOCK_K, so each K tile lies in one group: the tile dot runs on the exact
    integers q - zero (in x's dtype) and the group scale multiplies its fp32 result.
    Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K): program (tile, s) sums K tiles s, s + SPLIT_K, ...
    With SPLIT_K > 1 (serial split-K, as in Marlin) each program stores its float32 sum to partial (SPLIT_K, M, N)
    and counts itself in counter_ptr[tile], int32 zeros on entry; the tile's last program adds the SPLIT_K sums in
    split order (deterministic), adds the bias, stores out and sets the counter back to 0, all in this one launch.
    M_BUCKET is only the autotuning key.
    """
    tile = tl.program_id(0)
    pid_m, pid_n = tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    shifts = tl.arange(0, 8) * 4
    num_words = tl.cdiv(K, 8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        words = kt * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(
            w_ptr + words[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=(words[:, None] < num_words) & mask_n[None, :],
            other=0,
        )
        # (words, 8, BLOCK_N) nibbles -> (BLOCK_K, BLOCK_N): row 8 * word + i is column k of the weight.
        q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        group = kt * BLOCK_K // group_size
        zero = tl.load(zeros_ptr + offs_n * stride_zn + group * stride_zg, mask=mask_n, other=0)
        scale = tl.load(scales_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0)
        w = (q.to(tl.float32) - zero.to(tl.float32)[None, :]).to(x.dtype)
        acc += tl.dot(x, w) * scale.to(tl.float32)[None, :]

    last = True
    if SPLIT_K > 1:
        mn = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + mn, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial store comes before the release below
        last = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # .cg: read from L2, where the other programs' stores are
                acc += tl.load(partial_ptr + s * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + tile, 0)
    if last:
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "group_size"]
_int4_gemm = triton.autotune(autotune_configs(_GEMM_CONFIGS), key=_AUTOTUNE_KEY)(_int4_matmul_kernel)
_int4_decode = triton.autotune(autotune_configs(_DECODE_CONFIGS), key=_AUTOTUNE_KEY)(_int4_matmul_kernel)
_MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _DECODE_CONFIGS)
_MIN_TILE = (min(c.kwargs["BLOCK_M"] for c in _DECODE_CONFIGS), min(c.kwargs["BLOCK_N"] for c in _DECODE_CONFIGS))
TUNING = {"int4_gemm": _GEMM_CONFIGS, "int4_decode": _DECODE_CONFIGS}
"""The configs each int4 kernel autotunes over (decode: at most 16 rows, split-K)."""
DEBUG_ENV = "CALQ_KERNEL_DEBUG"
"""Set to 1: after every split-K launch, wait for it and check that it left its tile counters at zero."""
_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def _stream_key(device: torch.device) -> tuple[torch.device, int]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return device, stream


def split_k_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The int32 tile counters of the split-K reduction for the current stream of `device`: zeros, and left zero by
    every launch, so they are allocated (and zeroed) once, not per call; one set per stream, as two streams'
    launches would corrupt each other's counts. They grow only outside a CUDA graph capture (a captured graph keeps
    the pointer): call reserve_split_k(device, n) for the widest layer before capturing."""
    key = _stream_key(device)
    counters = _counters.get(key)
    if counters is None or counters.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"int4_linear: the split-K counters need {tiles} tiles during a CUDA graph capture; "
                               "call calq_kernels.reserve_split_k(device, widest N) before capturing")
        counters = _counters[key] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


def _decode_tiles(m: int, n: int) -> int:
    return triton.cdiv(m, _MIN_TILE[0]) * triton.cdiv(n, _MIN_TILE[1])


def tuning(m: int) -> dict[str, list[triton.Config]]:
    """The kernel a call with m rows launches and the configs it autotunes over."""
    name = "int4_decode" if m <= _DECODE_MAX_M else "int4_gemm"
    return {name: TUNING[name]}


def reserve_split_k(device: torch.device | str, n: int) -> None:
    """Allocate the current stream's split-K counters for output width n (the widest int4 layer) up front."""
    split_k_counters(torch.device(device), _decode_tiles(_DECODE_MAX_M, n))


def _int4_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int4_linear on the Triton kernel, one launch: split-K for at most 16 rows (decode), tiled GEMM above."""
    n, k = _check_int4_args(x, qweight, scales, zeros, group_size, bias)
    check_triton_inputs("int4_linear", x, {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias})
    if group_size % 16:
        raise ValueError(
            f"int4_linear: the Triton kernel needs group_size a multiple of 16, got {group_size}; use int4_linear_ref"
        )
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = x.new_empty((m, n))
    if out.numel():
        partial = counters = None
        if m <= _DECODE_MAX_M:  # split-K: sized for the config autotuning may pick
            kernel = _int4_decode
            partial = torch.empty((_MAX_SPLIT_K, m, n), device=x.device, dtype=torch.float32)
            counters = split_k_counters(x.device, _decode_tiles(m, n))
        else:
            kernel = _int4_gemm
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        name = "int4_decode" if kernel is _int4_decode else "int4_gemm"
        with device_context(x):
            launch(
                name, kernel, grid,
                x2, qweight, scales, zeros, bias, out, partial, counters,
                m, n, k, m_bucket(m), group_size,
                *x2.stride(), *qweight.stride(), *scales.stride(), *zeros.stride(), *out.stride(),
                BLOCK_K=min(group_size & -group_size, 128),  # largest power of two dividing group_size
                GROUP_M=8,
            )  # fmt: skip
        if counters is not None and os.environ.get(DEBUG_ENV) == "1" and counters.count_nonzero().item():
            raise RuntimeError("int4_linear: a split-K launch left its tile counters non-zero; every later decode "
                               "call would read unfinished sums")
    return out.view(*x.shape[:-1], n)


_int4_linear_op = torch.library.custom_op("calq::int4_linear", _int4_linear_triton, mutates_args=())


@_int4_linear_op.register_fake
def _int4_linear_fake(x, qweight, scales, zeros, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """W4A16 linear: x (..., K) float16/bfloat16/float32 -> (..., N) in x's dtype; layout in the module docstring.

    CUDA x runs the Triton kernel, through the custom op calq::int4_linear under torch.compile (in eager mode the
    op's dispatch, some microseconds, is skipped); float32 x uses TF32. CPU x takes the path of kernels/cpu.py (see
    cpu_dispatch(); wrap repeated calls in kernels.weight_cache so the weight is not prepared on every call); other
    devices run int4_linear_ref.
    """
    if x.is_cuda:
        linear = _int4_linear_op if torch.compiler.is_compiling() else _int4_linear_triton
        return linear(x, qweight, scales, zeros, group_size, bias)
    if x.device.type == "cpu":
        return _int4_linear_cpu(x, qweight, scales, zeros, group_size, bias)
    return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)
