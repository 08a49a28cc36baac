"""calq's C decode kernels (native.c), compiled once per machine for its CPU and called through ctypes.

torch's CPU kernels pay a fixed cost per op that a decode step (one to a few rows) feels more than the matmul: W8A8's
per-token quantization alone is some 8 small ops. native.c does a whole quantized linear in one call, for at most
MAX_ROWS rows of float32 x. It is built with the C compiler found ($CC, else cc / gcc / clang) into
$CALQ_NATIVE_CACHE (default ~/.cache/calq/native), named by a hash of the source, the flags, the compiler and the
CPU, written to a temporary name and renamed, so a rebuild happens only when one of those changes and concurrent
processes never load a half-written library. Without a compiler (or when the build fails) the path is unavailable
and kernels/cpu.py says why; nothing else changes.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

MAX_ROWS = 16
"""The most rows (tokens) one call takes (CALQ_MAX_ROWS in native.c)."""

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-std=c11", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "calq_w8a8": [_P, _I, _I, _P, _P, _I, _P, _P, _P],
    "calq_wxa16": [_P, _I, _I, _P, _I, _P, _I, _P, _P],
}


@dataclass(frozen=True)
class Build:
    """The outcome of loading the library: lib is None when it is unavailable, and note says why (or what was
    built or reused, where, and how long it took)."""

    lib: Optional[ctypes.CDLL]
    note: str


_lock = threading.Lock()
_build: Optional[Build] = None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC", "").strip(), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else what platform knows."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def compile_library(cache_dir: Path) -> Build:
    """Build native.c for this CPU into cache_dir (or reuse the library built there before) and load it."""
    compiler = _compiler()
    if compiler is None:
        return Build(None, "no C compiler (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_id().encode()]))
    path = cache_dir / f"calq_native-{key.hexdigest()[:16]}.so"
    note = f"reused {path}"
    if not path.exists():
        start = time.perf_counter()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)
            os.close(fd)
        except OSError as error:
            return Build(None, f"cannot write the library to {path.parent}: {error} (set CALQ_NATIVE_CACHE)")
        try:
            run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if run.returncode != 0:
                last = (run.stderr.strip().splitlines() or ["no message"])[-1]
                return Build(None, f"{compiler} failed on {SOURCE.name}: {last}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        note = f"built {path} in {time.perf_counter() - start:.1f} s"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return Build(None, f"cannot load {path}: {error}")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return Build(lib, note)


def build() -> Build:
    """The library of this process: built (about a second) or reused from $CALQ_NATIVE_CACHE on the first call."""
    global _build
    if _build is None:
        with _lock:
            if _build is None:
                configured = os.environ.get("CALQ_NATIVE_CACHE", "").strip()
                _build = compile_library(Path(configured) if configured else Path.home() / ".cache" / "calq" / "native")
    return _build


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(x contiguous, its rows, the float32 output (..., n))."""
    return x.contiguous(), math.prod(x.shape[:-1]), torch.empty(*x.shape[:-1], n)


def w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
         act_scale: Optional[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """int8_linear_ref of float32 x (..., K) of at most MAX_ROWS rows, contiguous int8 qweight (N, K) and float32
    w_scale, bias and act_scale (static; None: per token): float32 (..., N), bit for bit."""
    n, k = qweight.shape
    x, m, out = _rows(x, n)
    rc = build().lib.calq_w8a8(x.data_ptr(), m, k, _ptr(act_scale), qweight.data_ptr(), n, w_scale.data_ptr(),
                               _ptr(bias), out.data_ptr())  # fmt: skip
    if rc:
        raise RuntimeError(f"calq_w8a8 returned {rc} for {m} rows (at most {MAX_ROWS}; 2: out of memory)")
    return out


def wxa16(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
          bias: Optional[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """x @ (codes * scales per group).T (+ bias) for float32 x (..., K) of at most MAX_ROWS rows, contiguous int8
    codes (N, K), float32 scales (N, ceil(K / group_size)) and bias: float32 (..., N)."""
    n, k = codes.shape
    x, m, out = _rows(x, n)
    rc = build().lib.calq_wxa16(x.data_ptr(), m, k, codes.data_ptr(), n, scales.data_ptr(), group_size, _ptr(bias),
                                out.data_ptr())  # fmt: skip
    if rc:
        raise RuntimeError(f"calq_wxa16 returned {rc} for {m} rows (at most {MAX_ROWS}) and group size {group_size}")
    return out
