"""CPU dispatch tests (kernels/cpu.py): every path the dispatch can choose against the references on odd shapes,
the weight cache (bounded, invalidated, released), the counters, forcing and the measured decision."""

import gc
import time
import weakref

import pytest
import torch
import torch.nn.functional as F

import calq_kernels as kernels
from calq_kernels import (
    cpu_dispatch,
    force_cpu_paths,
    int4_linear,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
    pack_int4,
    reset_cpu_counters,
    reset_cpu_dispatch,
    unpack_int4,
    weight_cache,
)
from calq_kernels import cpu
from calq_kernels.int4 import _dequantize_cpu, _int4pack_group

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _fresh_counters():
    reset_cpu_counters()
    yield
    reset_cpu_counters()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_bitwise(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def random_int8(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)  # -128 too: |w| <= 128
    return qweight, torch.rand(n, generator=gen) * 0.01 + 0.001


def random_int4(n: int, k: int, group_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=gen)
    return pack_int4(q), scales, zeros


def calls(op: str, path: str) -> int:
    return cpu_dispatch(decide=False).calls.get(f"{op}/{path}", 0)


# ----------------------------------------------------------------------------------------------
# W8A8: both paths bit for bit the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["int_mm", "float_exact"])
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])  # float64 output shows the epilogue's rounding
@pytest.mark.parametrize("shape,n", [((1, 1), 3), ((3, 70), 33), ((2, 5, 40), 17), ((4, 1025), 9), ((3, 2100), 5)])
def test_w8a8_paths_equal_the_reference_bitwise(path, act, dtype, shape, n):
    k = shape[-1]
    qweight, w_scale = random_int8(n, k, seed=k)
    x = (torch.randn(shape) * 2).to(dtype)
    bias = torch.randn(n) if k % 2 == 0 else None
    act_scale = torch.tensor(0.02) if act == "static" else None
    with force_cpu_paths(w8a8=path):
        out = int8_linear(x, qweight, w_scale, bias, act, act_scale)
    assert_bitwise(out, int8_linear_ref(x, qweight, w_scale, bias, act, act_scale))
    assert calls("w8a8", path) == 1


@pytest.mark.parametrize("k", [1024, 2101, 4097])
def test_float_exact_split_k_is_exact_where_one_float32_sum_is_not(k):
    """Odd sums of k odd products above 2**24, which float32 cannot hold: a single float32 matmul gets them wrong,
    the K chunks do not. float64 x, so that the output shows a sum off by one."""
    n = 8
    gen = torch.Generator().manual_seed(k)
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    qweight[0] = 127
    qweight[1] = -128
    signs = torch.randint(0, 2, (1, k), generator=gen) * 2 - 1
    qweight[2] = (signs[0] * 127).to(torch.int8)
    x = torch.cat([torch.full((1, k), 3.0), signs * 3.0, torch.randn(2, k)]).double()  # rows quantize to +-127
    x[0, ::7] = -2.9  # codes 127 and -123: every product odd
    w_scale = torch.ones(n)
    with force_cpu_paths(w8a8="float_exact"):
        out = int8_linear(x, qweight, w_scale)
    ref = int8_linear_ref(x, qweight, w_scale)
    assert_bitwise(out, ref)
    exact = (torch.round(x / (x.abs().amax(-1, keepdim=True) / 127)).long() @ qweight.long().T).abs().max()
    assert exact > 2**24 or k == 1024


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", ["int_mm", "float_exact", "native"])
def test_w8a8_non_finite_rows_match_the_reference(path):
    qweight, w_scale = random_int8(33, 70)
    x = torch.randn(4, 70)
    x[0, 5] = float("nan")
    x[1, 50] = float("inf")
    x[2] = 0  # scale 1
    with force_cpu_paths(w8a8=path):
        out = int8_linear(x, qweight, w_scale)
        static = int8_linear(x, qweight, w_scale, act="static", act_scale=torch.tensor(0.02))
    assert_bitwise(out, int8_linear_ref(x, qweight, w_scale))
    assert out[0].isnan().all() and not out[1].isfinite().any() and (out[2] == 0).all()
    # a static scale quantizes NaN to 0 and inf to 127: the rows stay finite
    assert_bitwise(static, int8_linear_ref(x, qweight, w_scale, act="static", act_scale=torch.tensor(0.02)))
    assert static.isfinite().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", ["int_mm", "float_exact", "native"])
@pytest.mark.parametrize("edge", [None, "nan", "inf", "subnormal", "zero"])
@pytest.mark.parametrize("rows", [3, 80])
def test_w8a8_rows_with_and_without_an_edge_row(path, edge, rows):
    """Up to 16 rows (checked on the host) and from 64 rows (on the tensor) the quantization skips the zero fix,
    clamp and nan_to_num when every scale is finite and normal: a row that breaks that (a subnormal scale rounds a
    code to 128) must bring them back."""
    qweight, w_scale = random_int8(24, 96)
    x = torch.randn(rows, 96)
    r = rows - 2
    if edge == "nan":
        x[r, 4] = float("nan")
    elif edge == "inf":
        x[r, 6] = float("inf")
    elif edge == "subnormal":  # max |x| = 128 subnormal steps: scale rounds to 1 step, the code to 128
        x[r] = 0
        x[r, 0] = 128 * 2.0**-149
    elif edge == "zero":
        x[r] = 0
    with force_cpu_paths(w8a8=path):
        out = int8_linear(x, qweight, w_scale)
    assert_bitwise(out, int8_linear_ref(x, qweight, w_scale))


# ----------------------------------------------------------------------------------------------
# native.c: W8A8 bit for bit, W8A16 / W4A16 within float32 rounding; its build and its fallbacks
# ----------------------------------------------------------------------------------------------

needs_native = pytest.mark.skipif(kernels.native.build().lib is None, reason=kernels.native.build().note)
NATIVE_SHAPES = [(1, 3), (70, 33), (64, 17), (129, 5), (1025, 9), (2100, 6)]  # (K, N): every vector loop and tail


@needs_native
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5), (16,)])
@pytest.mark.parametrize("k,n", NATIVE_SHAPES)
def test_native_w8a8_is_the_reference_bitwise(act, rows, k, n):
    qweight, w_scale = random_int8(n, k, seed=k)
    x = torch.round(torch.randn(*rows, k) * 8) / 4  # quarter steps: with the static scale 0.5, many codes are ties
    bias = torch.randn(n) if k % 2 else None
    act_scale = torch.tensor(0.5) if act == "static" else None
    with force_cpu_paths(w8a8="native"):
        out = int8_linear(x, qweight, w_scale.half(), bias, act, act_scale)  # half scales convert exactly
    assert_bitwise(out, int8_linear_ref(x, qweight, w_scale.half(), bias, act, act_scale))
    assert calls("w8a8", "native") == 1


@needs_native
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5), (16,)])
@pytest.mark.parametrize("k,n", NATIVE_SHAPES)
def test_native_w8a16_is_the_reference_within_float32_rounding(rows, k, n):
    qweight, w_scale = random_int8(n, k, seed=k)
    x = torch.randn(*rows, k)
    bias = torch.randn(n) if k % 2 else None
    with force_cpu_paths(w8a16="native"):
        out = int8_linear(x, qweight, w_scale, bias, act="none")
    assert rel_err(out, int8_linear_ref(x.double(), qweight, w_scale, bias, act="none")) < 1e-6
    assert calls("w8a16", "native") == 1


@needs_native
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5), (16,)])
@pytest.mark.parametrize("k,n,group_size", [(1, 3, 1), (70, 33, 32), (64, 17, 64), (129, 5, 48), (576, 9, 128),
                                            (2100, 6, 2100)])  # fmt: skip
def test_native_w4a16_is_the_reference_within_float32_rounding(rows, k, n, group_size):
    qweight, scales, zeros = random_int4(n, k, group_size, seed=k)
    x = torch.randn(*rows, k)
    bias = torch.randn(n) if k % 2 else None
    with force_cpu_paths(w4a16="native"), weight_cache():
        out = int4_linear(x, qweight, scales, zeros, group_size, bias)
    assert rel_err(out, int4_linear_ref(x.double(), qweight, scales, zeros, group_size, bias)) < 1e-6
    assert calls("w4a16", "native") == 1


@needs_native
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_native_propagates_nan_and_inf_as_the_reference():
    qweight, w_scale = random_int8(33, 70)
    q4, scales, zeros = random_int4(33, 70, 32)
    x = torch.randn(3, 70)
    x[0, 5], x[1, 50] = float("nan"), float("inf")
    with force_cpu_paths(w8a16="native", w4a16="native"):
        for out in (int8_linear(x, qweight, w_scale, act="none"), int4_linear(x, q4, scales, zeros, 32)):
            assert out[0].isnan().all() and not out[1].isfinite().any() and out[2].isfinite().all()


@needs_native
def test_native_gives_way_where_it_does_not_serve_a_call():
    """bfloat16 x takes a general path by design (not a fallback); 17 rows and float64 W8A8 scales are fallbacks,
    named and counted; the results are the reference's either way."""
    qweight, w_scale = random_int8(16, 64)
    x = torch.randn(17, 64)
    with force_cpu_paths(w8a8="native", w4a16="native"):
        assert_bitwise(int8_linear(x[:2].bfloat16(), qweight, w_scale), int8_linear_ref(x[:2].bfloat16(), qweight, w_scale))
        assert_bitwise(int8_linear(x, qweight, w_scale), int8_linear_ref(x, qweight, w_scale))
        assert_bitwise(int8_linear(x[:1], qweight, w_scale.double()), int8_linear_ref(x[:1], qweight, w_scale.double()))
        q4, scales, zeros = random_int4(16, 64, 32)
        assert_bitwise(int4_linear(x, q4, scales, zeros, 32), int4_linear_ref(x, q4, scales, zeros, 32))
    info = cpu_dispatch(decide=False)
    general = cpu.general("w8a8", 17)
    assert info.fallbacks == {
        f"w8a8/native -> {general}: native takes at most 16 rows": 1,
        f"w8a8/native -> {cpu.general('w8a8', 1)}: native takes no float64 scales or bias": 1,
        "w4a16/native -> dequant: native takes at most 16 rows": 1,
    }
    assert info.calls.get("w8a8/native", 0) == 0 and sum(info.calls.values()) == 4


def test_native_builds_once_and_says_why_it_cannot(tmp_path, monkeypatch):
    first = kernels.native.compile_library(tmp_path)
    if first.lib is None:
        pytest.skip(first.note)
    assert first.note.startswith("built ") and len(list(tmp_path.glob("*.so"))) == 1
    again = kernels.native.compile_library(tmp_path)
    assert again.lib is not None and again.note.startswith("reused ")
    assert not list(tmp_path.glob("*.tmp")), "no half-written library is left behind"
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setattr(kernels.native, "FLAGS", (*kernels.native.FLAGS, "-DREBUILD"))  # a new key: it must build
    failed = kernels.native.compile_library(tmp_path / "other")
    assert failed.lib is None and "false failed on native.c" in failed.note
    assert not list((tmp_path / "other").glob("*"))


def test_an_unavailable_native_library_is_left_out_of_the_decision(monkeypatch):
    try:
        monkeypatch.setattr(kernels.native, "build", lambda: kernels.native.Build(None, "no C compiler (set CC)"))
        reset_cpu_dispatch()
        info = cpu_dispatch()
        for op in ("w8a8", "w8a16", "w4a16"):
            assert "native" not in info.order[op]["decode"] and "no C compiler" in info.reasons[op]
    finally:
        monkeypatch.undo()
        reset_cpu_dispatch()


# ----------------------------------------------------------------------------------------------
# W8A16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n", [((1, 1), 3), ((3, 70), 33), ((2, 5, 64), 16)])
def test_w8a16_dequant_equals_the_reference_bitwise(dtype, shape, n):
    qweight, w_scale = random_int8(n, shape[-1])
    x = torch.randn(shape).to(dtype)
    bias = torch.randn(n)
    with force_cpu_paths(w8a16="dequant"), weight_cache():
        outs = [int8_linear(x, qweight, w_scale, bias, act="none") for _ in range(2)]  # prepared, then cached
    for out in outs:
        assert_bitwise(out, int8_linear_ref(x, qweight, w_scale, bias, act="none"))


@pytest.mark.parametrize("shape,n", [((1, 64), 16), ((17, 96), 33), ((2, 3, 576), 5)])
def test_w8a16_int8pack_matches_the_reference_in_bfloat16_tolerance(shape, n):
    qweight, w_scale = random_int8(n, shape[-1], seed=n)
    x = torch.randn(shape).bfloat16()
    bias = torch.randn(n)
    with force_cpu_paths(w8a16="int8pack"):
        out = int8_linear(x, qweight, w_scale, bias, act="none")
    assert calls("w8a16", "int8pack") == 1
    assert out.dtype == torch.bfloat16 and out.shape == (*shape[:-1], n)
    assert rel_err(out, int8_linear_ref(x.double(), qweight, w_scale, bias, act="none")) < 1e-2


def test_w8a16_int8pack_falls_back_where_it_does_not_apply():
    qweight, w_scale = random_int8(33, 70)  # K % 16 != 0: torch's kernel crashes or miscomputes
    x = torch.randn(3, 70)
    q64, scale64 = random_int8(16, 64)
    x64 = torch.randn(3, 64)
    with force_cpu_paths(w8a16="int8pack"):
        out_bf16 = int8_linear(x.bfloat16(), qweight, w_scale, act="none")
        out_fp32 = int8_linear(x64, q64, scale64, act="none")  # float32 x takes dequant by design, no fallback
    assert_bitwise(out_bf16, int8_linear_ref(x.bfloat16(), qweight, w_scale, act="none"))
    assert_bitwise(out_fp32, int8_linear_ref(x64, q64, scale64, act="none"))
    info = cpu_dispatch(decide=False)
    assert info.calls == {"w8a16/dequant": 2}
    assert info.fallbacks == {"w8a16/int8pack -> dequant: int8pack needs K % 16 == 0 and a non-empty output": 1}


# ----------------------------------------------------------------------------------------------
# W4A16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,group_size", [(5, 40, 32), (7, 13, 5), (33, 70, 32), (3, 20, 64), (16, 576, 128)])
def test_dequantize_cpu_is_the_reference_weight(n, k, group_size):
    qweight, scales, zeros = random_int4(n, k, group_size, seed=k)
    group = torch.arange(k) // group_size
    for dtype in (torch.float32, torch.float64):
        q = unpack_int4(qweight, k).to(dtype)
        ref = (q - zeros.to(dtype)[:, group]) * scales.to(dtype)[:, group]
        assert torch.equal(_dequantize_cpu(qweight, scales, zeros, group_size, k, dtype), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,group_size", [((1, 40), 5, 32), ((3, 70), 33, 32), ((2, 5, 576), 16, 128)])
def test_w4a16_dequant_equals_the_reference_bitwise(dtype, shape, n, group_size):
    qweight, scales, zeros = random_int4(n, shape[-1], group_size)
    x = torch.randn(shape).to(dtype)
    bias = torch.randn(n)
    with force_cpu_paths(w4a16="dequant"), weight_cache():
        outs = [int4_linear(x, qweight, scales, zeros, group_size, bias) for _ in range(2)]
    for out in outs:
        assert_bitwise(out, int4_linear_ref(x, qweight, scales, zeros, group_size, bias))


@pytest.mark.parametrize(
    "shape,n,group_size,torch_group",
    [((1, 576), 16, 128, 64), ((3, 640), 48, 128, 128), ((2, 3, 256), 32, 64, 64), ((17, 96), 16, 32, 32),
     ((5, 512), 64, 512, 256)],
)  # fmt: skip
def test_w4a16_int4pack_matches_the_reference_in_bfloat16_tolerance(shape, n, group_size, torch_group):
    k = shape[-1]
    assert _int4pack_group(n, k, group_size) == torch_group  # K = 576, group 128: the ragged last group as g64
    qweight, scales, zeros = random_int4(n, k, group_size, seed=n)
    x = torch.randn(shape).bfloat16()
    bias = torch.randn(n)
    with force_cpu_paths(w4a16="int4pack"), weight_cache() as cache:
        outs = [int4_linear(x, qweight, scales, zeros, group_size, bias) for _ in range(2)]
        assert cache.stats()["hits"] == 1
    assert calls("w4a16", "int4pack") == 2
    ref = int4_linear_ref(x.double(), qweight, scales, zeros, group_size, bias)
    for out in outs:
        assert out.dtype == torch.bfloat16 and out.shape == (*shape[:-1], n)
        assert rel_err(out, ref) < 1e-2


def test_w4a16_int4pack_propagates_nan():
    qweight, scales, zeros = random_int4(16, 128, 64)
    x = torch.randn(3, 128).bfloat16()
    x[1, 7] = float("nan")
    with force_cpu_paths(w4a16="int4pack"):
        out = int4_linear(x, qweight, scales, zeros, 64)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()


@pytest.mark.parametrize("n,k,group_size", [(33, 128, 64), (16, 70, 32), (16, 96, 16)])
def test_w4a16_int4pack_falls_back_where_it_does_not_apply(n, k, group_size):
    assert _int4pack_group(n, k, group_size) is None
    qweight, scales, zeros = random_int4(n, k, group_size)
    x = torch.randn(2, k).bfloat16()
    with force_cpu_paths(w4a16="int4pack"):
        out = int4_linear(x, qweight, scales, zeros, group_size)
    assert_bitwise(out, int4_linear_ref(x, qweight, scales, zeros, group_size))
    info = cpu_dispatch(decide=False)
    assert info.calls == {"w4a16/dequant": 1} and len(info.fallbacks) == 1


# ----------------------------------------------------------------------------------------------
# dequant_bf16: bfloat16 prefill on a bfloat16 weight (W8A16 and W4A16)
# ----------------------------------------------------------------------------------------------


def bf16_case(op: str, n: int, k: int, group_size: int):
    """(call(x), reference(x), the reference's float32 weight) of a random op weight."""
    if op == "w8a16":
        qweight, w_scale = random_int8(n, k, seed=k)
        weight = qweight.float() * w_scale[:, None]
        return (lambda x, b: int8_linear(x, qweight, w_scale, b, act="none"),
                lambda x, b: int8_linear_ref(x, qweight, w_scale, b, act="none"), weight)  # fmt: skip
    qweight, scales, zeros = random_int4(n, k, group_size, seed=k)
    weight = _dequantize_cpu(qweight, scales, zeros, group_size, k, torch.float32)
    return (lambda x, b: int4_linear(x, qweight, scales, zeros, group_size, b),
            lambda x, b: int4_linear_ref(x, qweight, scales, zeros, group_size, b), weight)  # fmt: skip


@pytest.mark.parametrize("op", ["w8a16", "w4a16"])
@pytest.mark.parametrize("shape,n,group_size", [((1, 40), 5, 32), ((17, 70), 33, 32), ((2, 130, 576), 16, 128)])
def test_dequant_bf16_is_the_bfloat16_matmul_of_the_reference_weight(op, shape, n, group_size):
    """Bit for bit F.linear in bfloat16 on the reference's float32 weight rounded to bfloat16, and within the
    bfloat16 tolerance of the float64 reference; the bfloat16 weight is prepared once, then reused."""
    call, ref, weight = bf16_case(op, n, shape[-1], group_size)
    x = torch.randn(shape).bfloat16()
    bias = torch.randn(n)
    with force_cpu_paths(**{op: "dequant_bf16"}), weight_cache() as cache:
        outs = [call(x, bias) for _ in range(2)]
        assert cache.stats()["hits"] == 1 and cache.stats()["bytes"] == weight.numel() * 2
    assert calls(op, "dequant_bf16") == 2
    expected = F.linear(x, weight.bfloat16(), bias.bfloat16())
    for out in outs:
        assert_bitwise(out, expected)
        assert rel_err(out, ref(x.double(), bias)) < 1e-2


@pytest.mark.parametrize("op", ["w8a16", "w4a16"])
def test_dequant_bf16_serves_bfloat16_only(op):
    """Other x dtypes take the general path by design: bit for bit the reference, and no fallback counted."""
    call, ref, _ = bf16_case(op, 16, 64, 32)
    with force_cpu_paths(**{op: "dequant_bf16"}):
        outs = {dtype: call(torch.randn(3, 64).to(dtype), None) for dtype in (torch.float32, torch.float16)}
    for out in outs.values():
        assert out.dtype in (torch.float32, torch.float16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with force_cpu_paths(**{op: "dequant_bf16"}):
        assert_bitwise(call(x, None), ref(x, None))
        assert cpu.plan(op, 512, torch.bfloat16) == "dequant_bf16" and cpu.plan(op, 512, torch.float32) == "dequant"
    info = cpu_dispatch(decide=False)
    assert info.calls == {f"{op}/dequant": 3} and info.fallbacks == {}


# ----------------------------------------------------------------------------------------------
# Weight cache
# ----------------------------------------------------------------------------------------------


def test_weight_cache_is_bounded_lru_and_released():
    weights = [random_int4(16, 64, 32, seed=i) for i in range(3)]
    x = torch.randn(1, 64)
    each = 16 * 64 * 4  # a float32 (16, 64) dequantized weight
    with force_cpu_paths(w4a16="dequant"), weight_cache(max_bytes=2 * each + each // 2) as cache:
        for qweight, scales, zeros in weights:
            int4_linear(x, qweight, scales, zeros, 32)
        stats = cache.stats()
        assert stats["entries"] == 2 and stats["bytes"] == 2 * each and stats["evictions"] == 1
        int4_linear(x, *weights[1], 32)  # the oldest entry: a hit, which makes it the most recently used
        int4_linear(x, *weights[0], 32)  # evicted first: a miss, which evicts the least recently used, weights[2]
        int4_linear(x, *weights[1], 32)  # still held: a hit
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["evictions"]) == (2, 4, 2)
        value = next(iter(cache._entries.values()))[2]
        alive = weakref.ref(value)
        del value
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
    gc.collect()
    assert alive() is None  # released when the block ended
    assert cpu_dispatch(decide=False).cache is None
    assert cpu_dispatch(decide=False).uncached == {}


def test_nothing_is_cached_outside_a_weight_cache_and_too_large_weights_are_not_kept():
    qweight, scales, zeros = random_int4(16, 64, 32)
    x = torch.randn(1, 64)
    with force_cpu_paths(w4a16="dequant"):
        for _ in range(2):
            int4_linear(x, qweight, scales, zeros, 32)
        assert cpu_dispatch(decide=False).uncached == {"w4a16/dequant": 2}
        with weight_cache(max_bytes=100) as cache:
            int4_linear(x, qweight, scales, zeros, 32)
        assert cache.stats()["too_large"] == 1 and cache.stats()["entries"] == 0
    assert cpu_dispatch(decide=False).uncached == {"w4a16/dequant": 3}


def test_weight_cache_sees_in_place_changes_and_dropped_weights():
    qweight, scales, zeros = random_int4(16, 64, 32)
    x = torch.randn(2, 64)
    with force_cpu_paths(w4a16="dequant", w8a8="float_exact"), weight_cache() as cache:
        int4_linear(x, qweight, scales, zeros, 32)
        scales.mul_(2)  # a recalibrated scale: the cached weight is stale
        out = int4_linear(x, qweight, scales, zeros, 32)
        assert_bitwise(out, int4_linear_ref(x, qweight, scales, zeros, 32))
        assert cache.stats()["stale"] == 1 and cache.stats()["hits"] == 0
        q8, w_scale = random_int8(8, 64)
        int8_linear(x, q8, w_scale)
        q8[0, 0] = -q8[0, 0]
        assert_bitwise(int8_linear(x, q8, w_scale), int8_linear_ref(x, q8, w_scale))
        assert cache.stats()["stale"] == 2
        del qweight, q8
        gc.collect()
        assert cache.stats()["entries"] == 0  # each entry went with its weight


def test_inference_tensors_are_not_cached_but_still_correct():
    with torch.inference_mode():
        qweight, scales, zeros = random_int4(16, 64, 32)
        x = torch.randn(2, 64)
        with force_cpu_paths(w4a16="dequant"), weight_cache() as cache:
            out = int4_linear(x, qweight, scales, zeros, 32)
        assert_bitwise(out, int4_linear_ref(x, qweight, scales, zeros, 32))
    assert cache.stats()["misses"] == 0 and cpu_dispatch(decide=False).uncached == {"w4a16/dequant": 1}


def test_weight_cache_rejects_negative_max_bytes():
    with pytest.raises(ValueError, match="max_bytes"):
        with weight_cache(max_bytes=-1):
            pass


# ----------------------------------------------------------------------------------------------
# Dispatch: counters, forcing, the decision, autograd
# ----------------------------------------------------------------------------------------------


def test_counters_count_each_path_and_reset():
    qweight, w_scale = random_int8(16, 64)
    x = torch.randn(3, 64)
    with force_cpu_paths(w8a8="int_mm"):
        for _ in range(3):
            int8_linear(x, qweight, w_scale)
    with force_cpu_paths(w8a8="ref"):
        int8_linear(x, qweight, w_scale)
    assert cpu_dispatch(decide=False).calls == {"w8a8/int_mm": 3, "w8a8/ref": 1}
    reset_cpu_counters()
    assert cpu_dispatch(decide=False).calls == {}


def test_force_cpu_paths_nests_and_restores():
    assert cpu.plan("w8a8", 1) == cpu_dispatch().paths["w8a8"]["decode"]
    decided = cpu.plan("w8a8", 1)
    with force_cpu_paths(w8a8="float_exact"):
        with force_cpu_paths(w8a8="ref"):
            assert cpu.plan("w8a8", 1) == "ref" and cpu_dispatch().paths["w8a8"]["prefill"] == "ref"
        assert cpu.plan("w8a8", 1000) == "float_exact"
    assert cpu.plan("w8a8", 1) == decided
    with pytest.raises(ValueError, match="int_mm, float_exact, native, ref"):
        with force_cpu_paths(w8a8="int4pack"):
            pass
    with pytest.raises(ValueError, match="ops are"):
        with force_cpu_paths(w2a2="ref"):
            pass


def test_environment_variable_forces_a_path(monkeypatch):
    try:
        monkeypatch.setenv("CALQ_CPU_W8A8", "float_exact")
        reset_cpu_dispatch()
        info = cpu_dispatch()
        assert info.paths["w8a8"] == dict.fromkeys(cpu.REGIMES, "float_exact")
        assert "CALQ_CPU_W8A8" in info.reasons["w8a8"]
        monkeypatch.setenv("CALQ_CPU_W4A16", "fastest")
        reset_cpu_dispatch()
        with pytest.raises(ValueError, match="CALQ_CPU_W4A16"):
            cpu_dispatch()
    finally:
        monkeypatch.delenv("CALQ_CPU_W8A8", raising=False)
        monkeypatch.delenv("CALQ_CPU_W4A16", raising=False)
        reset_cpu_dispatch()


def test_measured_decision_picks_the_faster_path(monkeypatch):
    """A slow torch._int_mm (as where torch runs its naive loop) makes W8A8 take float_exact, and back; native, where
    it is built, is ranked by the same timing (for decode only)."""
    int_mm = torch._int_mm

    def slow_int_mm(a, b):
        time.sleep(0.02)
        return int_mm(a, b)

    def torch_paths(info):
        return {regime: [p for p in order if p != "native"][0] for regime, order in info.order["w8a8"].items()}

    try:
        monkeypatch.setattr(torch, "_int_mm", slow_int_mm)
        reset_cpu_dispatch()
        info = cpu_dispatch()
        assert torch_paths(info) == dict.fromkeys(cpu.REGIMES, "float_exact"), info.reasons["w8a8"]
        assert cpu.general("w8a8", 1) == "float_exact" and "native" not in info.order["w8a8"]["prefill"]
        mm = torch.mm
        monkeypatch.setattr(torch, "_int_mm", int_mm)
        monkeypatch.setattr(torch, "mm", lambda a, b: (time.sleep(0.02), mm(a, b))[1])
        reset_cpu_dispatch()
        info = cpu_dispatch()
        assert torch_paths(info) == dict.fromkeys(cpu.REGIMES, "int_mm"), info.reasons["w8a8"]
        assert cpu.general("w8a8", 1000) == "int_mm"
        if kernels.native.build().lib is not None:  # one sleeping op of three: native is ranked first for decode
            assert info.order["w8a8"]["decode"][0] == "native", info.reasons["w8a8"]
    finally:
        monkeypatch.undo()
        reset_cpu_dispatch()


def test_the_decision_inside_inference_mode_times_cached_weights(monkeypatch):
    """A first call inside inference_mode (as in an evaluation) still times each path on its cached prepared weight,
    not on a weight prepared again in every call (which measured W4A16 decode 5-20x slow in a calq run)."""
    seen = []
    best_times = cpu._best_times

    def spy(fns, reps):
        cache = cpu._caches[-1]
        before = cache.stats()["hits"]
        out = best_times(fns, reps)
        seen.append((len(fns), cache.stats()["hits"] - before))
        return out

    monkeypatch.setattr(cpu, "_best_times", spy)
    try:
        reset_cpu_dispatch()
        qweight, scales, zeros = random_int4(16, 64, 32)
        with torch.inference_mode():
            x = torch.randn(2, 64)
            out = int4_linear(x, qweight, scales, zeros, 32)
        assert out.is_inference()
    finally:
        monkeypatch.undo()
        reset_cpu_dispatch()
    assert len(seen) == 3  # the regimes with more than one path: decode, decode bf16, prefill bf16
    for paths, hits in seen:  # every W4A16 path prepares a weight: >= 2 warm-up + 3 timed calls, hits but the first
        assert paths >= 2 and hits >= 4 * paths


def test_bfloat16_x_is_ranked_on_bfloat16_timings(monkeypatch):
    """bfloat16 x has its own regimes, timed with bfloat16 x over the paths that serve it (dequant then pays its casts
    to float32 and back): on an AVX2 machine one float32 ranking sent bfloat16 decode to dequant at 1.25x fp32 while
    int8pack and dequant_bf16 took 0.6-0.75x. A regime with a single path is not timed."""
    made = []
    for op, make in dict(cpu.CALLS).items():
        monkeypatch.setitem(cpu.CALLS, op, lambda path, m, dtype, op=op, make=make: (made.append((op, path, m, dtype)),
                                                                                  make(path, m, dtype))[1])  # fmt: skip
    try:
        reset_cpu_dispatch()
        info = cpu_dispatch()
        timed = {(op, m, dtype): {p for o, p, rows, d in made if (o, rows, d) == (op, m, dtype)}
                 for op in cpu.PATHS for m, dtype in cpu.REGIMES.values()}  # fmt: skip
        native = {"native"} if kernels.native.build().lib is not None else set()
        assert timed["w4a16", 1, torch.bfloat16] == timed["w4a16", 128, torch.bfloat16] == {
            "dequant", "int4pack", "dequant_bf16"}
        assert timed["w8a16", 1, torch.float32] == {"dequant"} | native
        assert "prefill M=128: dequant, the only path" in info.reasons["w8a16"]
        assert timed["w8a8", 1, torch.bfloat16] == {"int_mm", "float_exact"}
        cpu._decided["w4a16"] = ({"decode": ("native", "dequant"), "prefill": ("dequant",),
                                  "decode bf16": ("int4pack", "dequant", "dequant_bf16"),
                                  "prefill bf16": ("dequant_bf16", "dequant", "int4pack")}, "set by the test")  # fmt: skip
        assert [cpu.plan("w4a16", 1, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)] == [
            "native", "int4pack", "dequant"]
        assert cpu.plan("w4a16", 512, torch.bfloat16) == "dequant_bf16" and cpu.plan("w4a16", 512) == "dequant"
    finally:
        monkeypatch.undo()
        reset_cpu_dispatch()


def test_autograd_takes_the_reference():
    qweight, scales, zeros = random_int4(16, 64, 32)
    x = torch.randn(2, 64, requires_grad=True)
    with force_cpu_paths(w4a16="dequant"):
        int4_linear(x, qweight, scales, zeros, 32).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert cpu_dispatch(decide=False).calls == {"w4a16/ref": 1}
    assert list(cpu_dispatch(decide=False).fallbacks) == ["w4a16/dequant -> ref: autograd needs the reference"]


def test_cpu_dispatch_reports_everything():
    qweight, w_scale = random_int8(16, 64)
    with weight_cache():
        int8_linear(torch.randn(2, 64), qweight, w_scale)
        info = cpu_dispatch()
        assert info.cache is not None and info.cache["misses"] + info.cache["hits"] <= 1
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert set(info.paths) == {"w8a8", "w8a16", "w4a16"}
    for op, regimes in info.paths.items():
        assert set(regimes.values()) <= set(kernels.cpu.PATHS[op]) and info.reasons[op]
    assert sum(info.calls.values()) == 1
    text = info.summary()
    assert info.capability in text and "w4a16: decode" in text and "calls: w8a8/" in text


def test_an_inexact_int_mm_is_left_out_and_the_reference_stays_exact(monkeypatch):
    """Where torch._int_mm does not sum exactly (oneDNN capped below VNNI saturates int16 pair sums: off by up to
    1.3e5), the reference computes in float64, the decision leaves int_mm out, and a forced int_mm runs float_exact,
    counted."""
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: int_mm(a, b).clamp(-2**15, 2**15 - 1))  # saturating sums
    kernels.int8.int_mm_exact.cache_clear()
    try:
        reset_cpu_dispatch()
        assert not kernels.int8.int_mm_exact()
        qweight = torch.full((8, 576), 127, dtype=torch.int8)
        x = torch.ones(3, 576)  # every sum 127 * 127 * 576 = 9290304: int16 pairs saturate
        ref = int8_linear_ref(x, qweight, torch.ones(8))
        torch.testing.assert_close(ref, torch.full((3, 8), 127.0 * 576), rtol=1e-6, atol=0)  # saturated: 258
        info = cpu_dispatch()
        assert all("int_mm" not in order for order in info.order["w8a8"].values())
        assert "left out int_mm: torch._int_mm is not exact" in info.reasons["w8a8"]
        with force_cpu_paths(w8a8="int_mm"):
            assert_bitwise(int8_linear(x, qweight, torch.ones(8)), ref)
        assert list(cpu_dispatch(decide=False).fallbacks) == [
            "w8a8/int_mm -> float_exact: torch._int_mm is not exact on this CPU (oneDNN's int8 kernels without VNNI "
            "saturate)"]
    finally:
        monkeypatch.undo()
        kernels.int8.int_mm_exact.cache_clear()
        reset_cpu_dispatch()
    assert kernels.int8.int_mm_exact()


def test_reference_int32_matmul_is_exact_for_k_1():
    """torch._int_mm on CPU returns uninitialized memory for K = 1 (torch 2.13, oneDNN): the reference avoids it."""
    qweight, w_scale = random_int8(5, 1)
    x = torch.randn(3, 1)
    q, scale = kernels.quantize_per_token_ref(x)
    expected = (q.double() @ qweight.double().T) * scale.double() * w_scale.double()
    for path in ("ref", "int_mm", "float_exact"):
        with force_cpu_paths(w8a8=path):
            assert_bitwise(int8_linear(x, qweight, w_scale), expected.float())
