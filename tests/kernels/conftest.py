"""Run the Triton kernels on CPU under the Triton interpreter.

triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when calq_kernels (kernels/) is imported, so it is set here,
at conftest import, before any test module imports kernels. Two interpreter gaps of Triton 3.8 are patched below.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

if "calq_kernels.int4" in sys.modules and not isinstance(
    sys.modules["calq_kernels.int4"]._int4_matmul_kernel, interpreter.InterpretedFunction
):
    raise RuntimeError(
        "kernels was imported before TRITON_INTERPRET=1 was set, so its Triton kernels cannot run on CPU; "
        "set os.environ['TRITON_INTERPRET'] = '1' before that import (e.g. at the top of tests/conftest.py)"
    )


def _widen_bf16_dot_operands() -> None:
    """The interpreter of Triton 3.8 holds bfloat16 values as their uint16 bit patterns and tl.dot multiplies those
    integers. Widen bfloat16 operands to float32 first: exact, and what the GPU's bf16 MMA with fp32 accumulation
    computes."""
    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, *args):
        if a.dtype == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16


def _interpret_triton_language() -> None:
    """tests/conftest.py imports transformers, which imports triton before this file sets TRITON_INTERPRET, so
    triton.language's own @triton.jit functions (tl.zeros, tl.cdiv, ...) were built for compilation and an
    interpreted kernel cannot call them. Rebuild them as interpreted functions (no-op if triton came later)."""
    interpreted = {}
    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    if id(value) not in interpreted:  # not hash(value): that compiles a cache key
                        interpreted[id(value)] = interpreter.InterpretedFunction(value.fn)
                    setattr(module, attr, interpreted[id(value)])


_interpret_triton_language()
_widen_bf16_dot_operands()
