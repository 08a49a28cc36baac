"""Quantized matmul kernels: W4A16 (packed int4, per-group scales and zeros), W8A8 / W8A16 (int8 weights) and FP8
W8A8 (e4m3 weights and per-token activations; cuBLAS through torch._scaled_mm).

Each op runs a Triton kernel when x is a CUDA tensor and its pure-torch reference (the *_ref function) otherwise.
On CPU the Triton kernels can run under the Triton interpreter: set TRITON_INTERPRET=1 before importing kernels.
"""

from .fp8 import fp8_linear, fp8_linear_ref, quantize_fp8_per_token
from .int4 import int4_linear, int4_linear_ref, pack_int4, unpack_int4
from .int8 import int8_linear, int8_linear_ref, quantize_per_token, quantize_per_token_ref

__all__ = [
    "fp8_linear",
    "fp8_linear_ref",
    "quantize_fp8_per_token",
    "int4_linear",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
    "pack_int4",
    "quantize_per_token",
    "quantize_per_token_ref",
    "unpack_int4",
]
