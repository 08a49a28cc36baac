"""Helpers shared by the int4 and int8 kernels: input checks, launch context, autotuning and Triton helpers."""

import contextlib

import torch
import triton
import triton.language as tl

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether the Triton interpreter runs the kernels (TRITON_INTERPRET=1), read now.

    triton.jit reads the same variable once, when a kernel is decorated, i.e. when kernels/ is imported: set it
    before that import (tests/kernels/conftest.py does).
    """
    return triton.knobs.runtime.interpret


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first under the interpreter, where benchmarking each would take minutes (the
    tests force the others one by one, with forced_config)."""
    return configs[:1] if interpreting() else configs


_FORCED: dict[str, triton.Config] = {}


@contextlib.contextmanager
def forced_config(kernel: str, config: triton.Config):
    """Launch `kernel` (a name of kernels.tuning_configs) with `config` instead of its autotuned choice while the block
    runs: every config's correctness can be checked, on a GPU (benchmarks/gpu_check.py) and in the interpreter."""
    previous = _FORCED.get(kernel)
    _FORCED[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            del _FORCED[kernel]
        else:
            _FORCED[kernel] = previous


def launch(name: str, autotuned, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel, or its plain JIT function with the config forced_config set for `name`."""
    config = _FORCED.get(name)
    if config is None:
        autotuned[grid](*args, **kwargs)
    else:
        autotuned.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the autotuning key, so that each new prompt length does not re-tune."""
    return triton.next_power_of_2(m)


def check_triton_inputs(op: str, x: torch.Tensor, others: dict[str, torch.Tensor | None]) -> None:
    """Raise a one-line ValueError unless x and the other tensors can go to the Triton kernels of op."""
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{op}: the Triton kernels take float16, bfloat16 or float32 x, got {x.dtype}; "
            f"cast x (e.g. x.half()) or call {op}_ref"
        )
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors, got x on {x.device}; move the tensors to a GPU, "
            f"call {op}_ref, or set TRITON_INTERPRET=1 before importing kernels to interpret them on CPU"
        )
    for name, tensor in others.items():
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}; move {name} to {x.device}")


def device_context(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make x's GPU current while launching (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid, walking GROUP_M row tiles per column so that neighbours share L2 data."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n
