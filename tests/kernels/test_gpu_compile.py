"""The kernels compile for an NVIDIA GPU (sm_90, down to a cubin), checked without one: the interpreter runs the
kernel code as Python, which misses what only the Triton compiler rejects. Runs in a subprocess, since this
session interprets the kernels (conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend")

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from calq_kernels import int4, int8


def compile_kernel(fn, pointers, constexprs, num_warps, num_stages=3):
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


for x, configs in (("*fp16", int4.TUNING["int4_decode"]), ("*bf16", int4.TUNING["int4_gemm"])):
    config = configs[-1]  # decode: SPLIT_K 8, the serial split-K reduction; GEMM: SPLIT_K 1
    pointers = {"x_ptr": x, "w_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8", "bias_ptr": "*fp16",
                "out_ptr": x, "partial_ptr": "*fp32", "counter_ptr": "*i32"}
    constexprs = {**config.kwargs, "BLOCK_K": 128, "GROUP_M": 8}
    compile_kernel(int4._int4_matmul_kernel, pointers, constexprs, config.num_warps, config.num_stages)

config = int8.TUNING["int8_matmul"][-1]
for a, a_scale in (("*i8", {}), ("*bf16", {"a_scale_ptr": None})):
    pointers = {"a_ptr": a, "a_scale_ptr": "*fp32", "b_ptr": "*i8", "b_scale_ptr": "*fp32", "c_ptr": "*bf16"}
    constexprs = {**config.kwargs, **a_scale, "bias_ptr": None, "GROUP_M": 8}
    compile_kernel(int8._int8_matmul_kernel.fn, pointers, constexprs, config.num_warps, config.num_stages)

for dynamic in (True, False):
    pointers = {"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32"}
    compile_kernel(int8._quantize_rows_kernel, pointers, {"BLOCK_K": 4096, "DYNAMIC": dynamic}, num_warps=8)
"""


def test_kernels_compile_for_sm90():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
