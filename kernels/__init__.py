"""Quantized matmul kernels: W4A16 (packed int4, per-group scales and zeros) and W8A8 / W8A16 (int8 weights).

Each op runs a Triton kernel when x is a CUDA tensor and its pure-torch reference (the *_ref function) otherwise.
On CPU the Triton kernels can run under the Triton interpreter: set TRITON_INTERPRET=1 before importing kernels.
"""

from .int4 import int4_linear, int4_linear_ref, pack_int4, unpack_int4
from .int8 import int8_linear, int8_linear_ref, quantize_per_token, quantize_per_token_ref

__all__ = [
    "int4_linear",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
    "pack_int4",
    "quantize_per_token",
    "quantize_per_token_ref",
    "unpack_int4",
]
