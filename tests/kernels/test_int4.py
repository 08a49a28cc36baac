"""W4A16 kernel tests: packing, the Triton kernel (interpreted on CPU, see conftest.py) against a float64
reference, NaN/Inf propagation, errors, CPU dispatch and the torch.compile custom op."""

import pytest
import torch

from calq_kernels import int4_linear, int4_linear_ref, pack_int4, unpack_int4
from calq_kernels.int4 import TUNING, _int4_linear_op, _int4_linear_triton, split_k_counters

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_int4(n: int, k: int, group_size: int, seed: int = 0):
    """A random quantized weight of shape (n, k): (qweight, scales, zeros)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=gen)
    return pack_int4(q), scales, zeros


@pytest.mark.parametrize("k", [1, 8, 13, 40, 576])
def test_pack_unpack_round_trip(k):
    q = torch.randint(0, 16, (7, k), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-k // 8))
    assert torch.equal(unpack_int4(packed, k), q)


def test_pack_layout_low_nibble_first():
    q = torch.arange(16, dtype=torch.uint8)[None, :]
    words = pack_int4(q)[0].tolist()
    assert words == [0x76543210, 0xFEDCBA98 - 2**32]
    # K = 3 pads the word with zero nibbles.
    assert pack_int4(torch.tensor([[1, 2, 15]], dtype=torch.uint8)).tolist() == [[0xF21]]


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(2, 8))


def test_reference_matches_explicit_dequantization():
    n, k, group_size = 5, 40, 32  # 2 groups, the last of 8 columns
    qweight, scales, zeros = random_int4(n, k, group_size)
    x = torch.randn(3, k, dtype=torch.float64)
    q = unpack_int4(qweight, k).double()
    w = torch.empty(n, k, dtype=torch.float64)
    for col in range(k):
        g = col // group_size
        w[:, col] = (q[:, col] - zeros[:, g].double()) * scales[:, g].double()
    torch.testing.assert_close(int4_linear_ref(x, qweight, scales, zeros, group_size), x @ w.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,group_size", [(40, 32), (70, 16), (64, 64)])
@pytest.mark.parametrize("n", [5, 33])
@pytest.mark.parametrize("m", [1, 3, 16, 17])
def test_triton_matches_float64_reference(m, n, k, group_size, dtype):
    qweight, scales, zeros = random_int4(n, k, group_size, seed=m * n + k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    out = _int4_linear_triton(x, qweight, scales, zeros, group_size, bias)
    ref = int4_linear_ref(x.double(), qweight, scales, zeros, group_size, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < (1e-3 if dtype == torch.float32 else 1e-2)


def test_triton_batched_strided_input_and_half_scales():
    n, k, group_size = 33, 70, 32
    qweight, scales, zeros = random_int4(n, k, group_size)
    x = torch.randn(2, 3, 2 * k, dtype=torch.float16)[..., ::2]  # non-contiguous (2, 3, k)
    out = _int4_linear_triton(x, qweight, scales.half(), zeros, group_size)
    ref = int4_linear_ref(x.double(), qweight, scales.half(), zeros, group_size)
    assert out.shape == (2, 3, n)
    assert rel_err(out, ref) < 1e-2


def test_split_k_reduction_sets_its_counters_back_to_zero():
    """The decode path sums its split-K partials in one launch, counting finished programs per tile in counters
    that must be zero when the next launch starts: each launch leaves them so, also across shapes."""
    assert TUNING["int4_decode"][0].kwargs["SPLIT_K"] > 1  # the config the interpreter autotunes to
    for m, n, k in ((1, 33, 70), (16, 5, 256), (3, 70, 40)):
        qweight, scales, zeros = random_int4(n, k, 16, seed=n)
        x = torch.randn(m, k, dtype=torch.float16)
        for _ in range(2):
            out = _int4_linear_triton(x, qweight, scales, zeros, 16)
            assert rel_err(out, int4_linear_ref(x.double(), qweight, scales, zeros, 16)) < 1e-2
            assert split_k_counters(x.device, 1).count_nonzero() == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("m", [2, 17])  # split-K decode path and GEMM path
def test_triton_propagates_nan_and_inf(m):
    n, k, group_size = 33, 70, 16
    qweight, scales, zeros = random_int4(n, k, group_size)
    x = torch.randn(m, k, dtype=torch.float16)
    x[0, 5] = float("nan")
    x[1, 50] = float("inf")
    out = _int4_linear_triton(x, qweight, scales, zeros, group_size)
    ref = int4_linear_ref(x.double(), qweight, scales, zeros, group_size)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert out[0].isnan().all() and not out[1].isfinite().any()
    torch.testing.assert_close(out, ref.half(), equal_nan=True, rtol=1e-2, atol=1e-2)


def test_errors_are_one_line_value_errors(monkeypatch):
    qweight, scales, zeros = random_int4(5, 40, 32)
    x = torch.randn(3, 40)
    cases = [
        (lambda: _int4_linear_triton(x.double(), qweight, scales, zeros, 32), "float16, bfloat16 or float32"),
        (lambda: int4_linear(x.long(), qweight, scales, zeros, 32), "floating-point"),
        (lambda: int4_linear(x[:, :32], qweight, scales, zeros, 32), "qweight of shape"),
        (lambda: int4_linear(x, qweight, scales, zeros, 16), "scales must be"),
        (lambda: int4_linear(x, qweight, scales, zeros.int(), 32), "zeros must be uint8"),
        (lambda: _int4_linear_triton(x, qweight, scales[:, :1], zeros[:, :1], 40), "multiple of 16"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        _int4_linear_triton(x, qweight, scales, zeros, 32)


def test_cpu_dispatch_is_the_reference():
    qweight, scales, zeros = random_int4(33, 70, 32)
    x = torch.randn(2, 5, 70, dtype=torch.bfloat16)
    bias = torch.randn(33)
    out = int4_linear(x, qweight, scales, zeros, 32, bias)
    assert torch.equal(out, int4_linear_ref(x, qweight, scales, zeros, 32, bias))


def test_custom_op_opcheck():
    qweight, scales, zeros = random_int4(33, 40, 32)
    x = torch.randn(3, 40, dtype=torch.float16)
    torch.library.opcheck(_int4_linear_op, (x, qweight, scales, zeros, 32, torch.randn(33)))


@pytest.mark.parametrize("m", [3, 20])  # the split-K decode kernel, the GEMM kernel
def test_every_autotune_config_is_correct(m):
    """The interpreter autotunes over the first config only: force each in turn (every SPLIT_K value of the decode
    kernel), and each leaves the split-K counters at zero."""
    from calq_kernels import forced_config, tuning_configs

    n, k = 40, 128
    qweight, scales, zeros = random_int4(n, k, 32, seed=m)
    x = torch.randn(m, k, dtype=torch.float16)
    ref = int4_linear_ref(x.double(), qweight, scales, zeros, 32)
    (name, configs), = tuning_configs("int4", m).items()
    assert name == ("int4_decode" if m <= 16 else "int4_gemm")
    split_ks = set()
    for config in configs:
        with forced_config(name, config):
            out = _int4_linear_triton(x, qweight, scales, zeros, 32)
        assert rel_err(out, ref) < 1e-2, config
        assert split_k_counters(x.device, 1).count_nonzero() == 0, config
        split_ks.add(config.kwargs["SPLIT_K"])
    assert split_ks == ({1, 2, 4, 8, 16} if m <= 16 else {1})


def test_counters_are_per_stream_reserved_up_front_and_checked(monkeypatch):
    from calq_kernels import reserve_split_k
    from calq_kernels.int4 import DEBUG_ENV

    reserve_split_k("cpu", 100_000)
    assert split_k_counters(torch.device("cpu"), 1).numel() >= 100_000 // 32
    qweight, scales, zeros = random_int4(33, 64, 32, seed=1)
    x = torch.randn(2, 64, dtype=torch.float16)
    monkeypatch.setenv(DEBUG_ENV, "1")
    _int4_linear_triton(x, qweight, scales, zeros, 32)  # the debug check passes on a launch that resets them
    counters = split_k_counters(x.device, 1)
    counters[0] = 1  # a counter left non-zero (a crashed launch, another stream): the debug check says so
    try:
        with pytest.raises(RuntimeError, match="left its tile counters non-zero"):
            _int4_linear_triton(x, qweight, scales, zeros, 32)
    finally:
        counters.zero_()
