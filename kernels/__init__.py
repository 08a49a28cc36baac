"""Quantized matmul kernels: W4A16 (packed int4, per-group scales and zeros), W8A8 / W8A16 (int8 weights) and FP8
W8A8 (e4m3 weights and per-token activations; cuBLAS through torch._scaled_mm).

Each op runs a Triton kernel when x is a CUDA tensor. On CPU it takes the path kernels/cpu.py chose for the machine
(decided once per process, counted; cpu_dispatch() says which and why), inside `with weight_cache(max_bytes):`
keeping each prepared weight instead of preparing it on every call; other devices run the pure-torch references
(the *_ref functions). On CPU the Triton kernels can run under the Triton interpreter: set TRITON_INTERPRET=1 before
importing kernels.
"""

from .cpu import (
    CpuDispatch,
    WeightCache,
    cpu_dispatch,
    force_cpu_paths,
    reset_cpu_counters,
    reset_cpu_dispatch,
    weight_cache,
)
from . import int4 as _int4
from . import int8 as _int8
from ._common import forced_config
from .fp8 import fp8_linear, fp8_linear_ref, quantize_fp8_per_token
from .int4 import int4_linear, int4_linear_ref, pack_int4, reserve_split_k, unpack_int4
from .int8 import int8_linear, int8_linear_ref, quantize_per_token, quantize_per_token_ref


def tuning_configs(op: str, m: int) -> dict:
    """{kernel name: its autotune configs} that a call of `op` ("int4" or "int8") with m rows launches: run each
    under forced_config(name, config) to check every config."""
    if op not in ("int4", "int8"):
        raise ValueError(f"tuning_configs: op is int4 or int8, got {op!r}")
    return (_int4 if op == "int4" else _int8).tuning(m)

__all__ = [
    "CpuDispatch",
    "WeightCache",
    "cpu_dispatch",
    "force_cpu_paths",
    "forced_config",
    "fp8_linear",
    "fp8_linear_ref",
    "int4_linear",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
    "pack_int4",
    "quantize_fp8_per_token",
    "quantize_per_token",
    "quantize_per_token_ref",
    "reserve_split_k",
    "reset_cpu_counters",
    "reset_cpu_dispatch",
    "tuning_configs",
    "unpack_int4",
    "weight_cache",
]
