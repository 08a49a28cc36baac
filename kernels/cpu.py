"""CPU paths of int8_linear and int4_linear: which path each op takes on this machine, counted, and a bounded cache
of prepared weights.

Ops and their CPU paths ("ref" is the op's *_ref function itself, taken only when forced or for autograd):

    w8a8   int8_linear, act "dynamic" / "static"
        int_mm       torch._int_mm: the exact int32 matmul of the reference (fast where oneDNN has int8 kernels;
                     a naive loop, 15-30x slower than float32, where torch does not use oneDNN for it)
        float_exact  the int8 codes as float32 through float32 matmuls over K chunks of at most 1024: every partial
                     sum is an integer below 127 * 128 * 1024 < 2**24, so exact; chunks are summed in float64.
                     Bit for bit the reference. Prepared weight: qweight as float32.
        native       native.c's calq_w8a8 (float32 x, at most 16 rows): quantization, exact int32 sums and the
                     float64 epilogue in one call. Bit for bit the reference.
    w8a16  int8_linear, act "none"
        dequant      the reference's float weight qweight * w_scale and F.linear: bit for bit the reference.
                     Prepared weight: that float weight.
        int8pack     torch's _weight_int8pack_mm: bfloat16 x only (its float32 and float16 kernels are scalar
                     loops), K a multiple of 16 (other K crash or give wrong sums in torch 2.13); w_scale rounded to
                     bfloat16. Within the bfloat16 tolerance of the kernel tests, not bit for bit.
        dequant_bf16 the reference's float32 weight rounded to bfloat16 and F.linear in bfloat16 (oneDNN's bfloat16
                     GEMM, float32 sums): bfloat16 x only, for prefill, where a CPU with bfloat16 instructions runs
                     it about twice as fast as float32. Within the bfloat16 tolerance of the kernel tests.
                     Prepared weight: that bfloat16 weight (half the bytes of dequant's).
        native       native.c's calq_wxa16 (float32 x, at most 16 rows): the reference's products, summed in
                     another order (float32 rounding). No prepared weight.
    w4a16  int4_linear
        dequant      the reference's float weight (q - zero) * scale and F.linear: bit for bit the reference.
                     Prepared weight: that float weight (unpacked with byte ops, several times faster than
                     unpack_int4 and bit for bit the same).
        int4pack     torch's _weight_int4pack_mm_for_cpu: bfloat16 x only (its float32 / float16 kernels are scalar
                     loops, 50-100x slower), N a multiple of 16, and a torch group size g in 256/128/64/32 dividing
                     both group_size and K (a group_size of 128 with a ragged last group, K = 576, runs as g = 64
                     with each scale repeated). torch computes w = (q - 8) * scale + zero: zero = (8 - zeros) * scale,
                     both in bfloat16. Prepared weight: torch's packing and the scales and zeros.
        dequant_bf16 as for w8a16: dequant's float32 weight rounded to bfloat16, bfloat16 x only.
        native       native.c's calq_wxa16 (float32 x, at most 16 rows), as for w8a16. Prepared weight: the codes
                     q - zero as int8 (a byte per weight) and the scales as float32.

Decision, once per process and op (on the op's first CPU call, or at cpu_dispatch()): for each regime (REGIMES:
decode, at most DECODE_MAX_M rows, or prefill; float32 x, or bfloat16 x, whose paths and costs differ), time the paths
that serve its x on a small synthetic weight (whole calls, interleaved, fastest of 9; some tens of milliseconds) and
rank them, fastest first; a tie keeps the order listed. int8pack, int4pack and dequant_bf16 serve bfloat16 x only,
native float32 x only (and is a candidate for decode only, where native.py could build it: its build note is in the
reasons). A call takes the first path of its regime's ranking that serves its x (float16 and float64 x: the float32
ranking); other dtypes skipping a path is by design, not a fallback. The environment variables CALQ_CPU_W8A8,
CALQ_CPU_W8A16 and CALQ_CPU_W4A16 (a path name) force an op's path for the process; force_cpu_paths() forces it inside
a with block (tests, benchmarks); a forced path that does not serve x's dtype gives way to the op's general paths.
Where the planned path cannot run a call (a shape torch's kernel does not take, more rows than native takes, or
autograd, which only the reference supports), the call runs a general path (or ref) and is counted as a fallback.

Prepared weights are kept only inside `with weight_cache(max_bytes):` (an LRU bounded by max_bytes, keyed by the
weight tensors, their versions and storage, emptied when the block ends); outside one, each call prepares its weight
again and is counted in `uncached`. Nothing is silent: cpu_dispatch() returns the paths, why, and the counters.
The state (decisions, counters, forced paths, active caches) is per process, shared by its threads.

For a report:   info = kernels.cpu_dispatch(); print(info.summary())   (or read info.paths / calls / fallbacks)
For evaluation: with kernels.weight_cache(max_bytes=...): ...           (prepared weights kept, then released)
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import native

DECODE_MAX_M = native.MAX_ROWS
"""Calls with at most this many rows (tokens) take the decode path of their op; more take the prefill path."""

PATHS: dict[str, tuple[str, ...]] = {
    "w8a8": ("int_mm", "float_exact", "native", "ref"),
    "w8a16": ("dequant", "int8pack", "dequant_bf16", "native", "ref"),
    "w4a16": ("dequant", "int4pack", "dequant_bf16", "native", "ref"),
}
"""The CPU paths of each op, the first the default where timing ties."""

GENERAL: dict[str, tuple[str, ...]] = {"w8a8": ("int_mm", "float_exact"), "w8a16": ("dequant",), "w4a16": ("dequant",)}
"""The paths of each op that serve any x (any float dtype, any rows): what a call falls back to."""

SERVES: dict[str, torch.dtype] = {"int8pack": torch.bfloat16, "int4pack": torch.bfloat16, "dequant_bf16": torch.bfloat16,
                                  "native": torch.float32}
"""The one x dtype a path serves, for the paths that do not serve every dtype."""

ENV_VARS = {op: f"CALQ_CPU_{op.upper()}" for op in PATHS}
REGIMES: dict[str, tuple[int, torch.dtype]] = {"decode": (1, torch.float32), "prefill": (128, torch.float32),
                                               "decode bf16": (1, torch.bfloat16), "prefill bf16": (128, torch.bfloat16)}
"""The regimes each op's paths are ranked for, and the rows and x dtype they are timed with."""


def dequant_dtype(path: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the weight and matmul of a dequant path for x in dtype: dequant the reference's,
    promote_types(x, float32); dequant_bf16 bfloat16 (the float32 weight, rounded)."""
    return torch.bfloat16 if path == "dequant_bf16" else torch.promote_types(dtype, torch.float32)


def regime(m: int, dtype: Optional[torch.dtype] = None) -> str:
    """The regime of a call of m rows of x in dtype."""
    name = "decode" if m <= DECODE_MAX_M else "prefill"
    return f"{name} bf16" if dtype == torch.bfloat16 else name


@dataclass(frozen=True)
class CpuDispatch:
    """What the CPU paths of the kernels do in this process (a snapshot; see the module docstring).

    capability: torch.backends.cpu.get_cpu_capability(), the vector ISA ATen's own kernels use (ATEN_CPU_CAPABILITY
    lowers it). features: what the hardware has (cpuinfo), which oneDNN and MKL use whatever the capability.
    order[op][regime]: op's paths for each of REGIMES (decode or prefill, float32 or bfloat16 x), fastest first: a
    call takes the first that serves its x (int8pack, int4pack and dequant_bf16 bfloat16 only, native float32 only).
    paths[op][regime]: the first of order.
    reasons[op]: why (the timings and native.py's build note, or what forced it). calls["op/path"]: calls that ran path.
    fallbacks["op/path -> other: why"]: calls whose planned path could not run. uncached["op/path"]: calls that
    prepared their weight because no weight_cache was active (or it could not hold the weight).
    cache: the innermost active weight_cache's stats, None outside one.
    """

    capability: str
    features: dict[str, bool]
    order: dict[str, dict[str, tuple[str, ...]]]
    reasons: dict[str, str]
    calls: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    uncached: dict[str, int] = field(default_factory=dict)
    cache: Optional[dict[str, int]] = None

    @property
    def paths(self) -> dict[str, dict[str, str]]:
        return {op: {regime: order[0] for regime, order in regimes.items()} for op, regimes in self.order.items()}

    def summary(self) -> str:
        """A few lines for a report."""
        features = ", ".join(name for name, on in self.features.items() if on) or "none"
        lines = [f"CPU kernels: capability {self.capability} ({features})"]
        for op, regimes in self.order.items():
            order = ", ".join(f"{regime} {' > '.join(paths)}" for regime, paths in regimes.items())
            lines.append(f"  {op}: {order} ({self.reasons[op]})")
        for title, counts in (("calls", self.calls), ("fallbacks", self.fallbacks), ("uncached", self.uncached)):
            if counts:
                lines.append(f"  {title}: " + ", ".join(f"{key} {n}" for key, n in sorted(counts.items())))
        if self.cache is not None:
            lines.append("  weight cache: " + ", ".join(f"{key} {n}" for key, n in self.cache.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Decision
# ----------------------------------------------------------------------------------------------

_lock = threading.RLock()
_decided: dict[str, tuple[dict[str, tuple[str, ...]], str]] = {}
_forced: list[dict[str, str]] = []
_calls: collections.Counter = collections.Counter()
_fallbacks: collections.Counter = collections.Counter()
_uncached: collections.Counter = collections.Counter()


def _features() -> dict[str, bool]:
    names = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
             "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}  # fmt: skip
    return {name: bool(getattr(torch.cpu, fn, lambda: False)()) for name, fn in names.items()}


def _check_path(op: str, path: str, source: str) -> str:
    if path not in PATHS[op]:
        raise ValueError(f"{source}: {op} has CPU paths {', '.join(PATHS[op])}, got {path!r}")
    return path


def _best_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Fastest seconds of each fn over up to reps interleaved rounds, after two warm-up calls each (oneDNN builds
    its kernels on the first). The minimum, not the median: other load on the machine only adds time (a thread
    descheduled mid-matmul costs a whole time slice), and the decision is about the paths. Stops after 3 rounds
    when one fn is over 8x slower than another."""
    for fn in fns.values():
        fn()
        fn()
    best = {name: float("inf") for name in fns}
    for round_ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
        if round_ >= 2 and max(best.values()) > 8 * min(best.values()):
            break
    return best


CALLS: dict[str, Callable[[str, int, torch.dtype], Callable[[], object]]] = {}
"""op -> make(path, m, dtype): a whole call of op forced onto path, for m rows of x in dtype on a synthetic 512 x 512
weight. Registered by int8.py and int4.py; what the decision times, so that each path pays what a call pays (W8A8's
quantization, the casts, the cache lookup)."""


UNAVAILABLE: dict[str, Callable[[], Optional[str]]] = {
    f"{op}/native": lambda: None if native.build().lib is not None else "not built (see native: below)" for op in PATHS
}
"""'op/path' -> a check of this machine: why the path cannot serve here, None when it can. native's is its build;
int8.py registers torch._int_mm's exactness. A path left out is not timed, and the reasons say why."""


def _left_out(op: str) -> dict[str, str]:
    """op's paths that cannot serve on this machine (UNAVAILABLE), and why."""
    checks = {path: UNAVAILABLE.get(f"{op}/{path}") for path in PATHS[op]}
    return {path: why for path, check in checks.items() if check is not None and (why := check()) is not None}


def _candidates(op: str, m: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The timed call of each non-reference path of op that serves m rows of x in dtype here (native: decode only)."""
    left_out = _left_out(op)
    paths = [p for p in PATHS[op] if p != "ref" and p not in left_out and SERVES.get(p, dtype) == dtype
             and (p != "native" or m <= DECODE_MAX_M)]  # fmt: skip
    return {path: CALLS[op](path, m, dtype) for path in paths}


def _measure(op: str) -> tuple[dict[str, tuple[str, ...]], str]:
    """Time op's candidate paths for each of REGIMES; rank them per regime, fastest first."""
    order, notes = {}, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on one thread: a parallel region waiting on a descheduled thread would decide it
    try:
        measured = _measure_regimes(op)
    finally:
        torch.set_num_threads(threads)
    for regime, (m, times) in measured.items():
        listed = list(times)
        order[regime] = tuple(sorted(times, key=lambda name: (times[name], listed.index(name))))
        timing = " vs ".join(f"{name} {t * 1e3:.3f} ms" for name, t in times.items())
        notes.append(f"{regime} M={m}: {timing if len(times) > 1 else f'{listed[0]}, the only path'}")
    notes += [f"left out {path}: {why}" for path, why in _left_out(op).items()]
    return order, f"measured on one thread, a 512x512 weight: {'; '.join(notes)}; native: {native.build().note}"


def _measure_regimes(op: str) -> dict[str, tuple[int, dict[str, float]]]:
    """The timings, in a weight cache of their own; the calls they make are not counted. Outside inference mode
    (the first call is often inside an evaluation's): its synthetic weights would be inference tensors, which the
    cache does not keep, and every timed call would prepare its weight again."""
    out = {}
    counters = [(counter, counter.copy()) for counter in (_calls, _fallbacks, _uncached)]
    try:
        with torch.inference_mode(False), torch.no_grad(), weight_cache(2**28):
            for name, (m, dtype) in REGIMES.items():
                fns = _candidates(op, m, dtype)
                out[name] = (m, _best_times(fns, 9) if len(fns) > 1 else dict.fromkeys(fns, 0.0))
    finally:
        for counter, saved in counters:
            counter.clear()
            counter.update(saved)
    return out


def _decide(op: str) -> tuple[dict[str, str], str]:
    with _lock:
        if op not in _decided:
            env = os.environ.get(ENV_VARS[op], "").strip()
            if env:
                order = _forced_order(op, _check_path(op, env, ENV_VARS[op]))
                _decided[op] = ({name: order for name in REGIMES}, f"forced by {ENV_VARS[op]}={env}")
            else:
                _decided[op] = _measure(op)
        return _decided[op]


def _forced_order(op: str, path: str) -> tuple[str, ...]:
    """A forced path, then the op's general paths for the x dtypes it does not serve."""
    return (path, *(p for p in GENERAL[op] if p != path))


def plan(op: str, m: int, dtype: Optional[torch.dtype] = None) -> str:
    """The path op takes for a call of m rows of x in dtype (forced, else decided once per process): the first of
    the regime's order that serves dtype (any dtype when None)."""
    for forced in reversed(_forced):
        if op in forced:
            order = _forced_order(op, forced[op])
            break
    else:
        decided = _decided.get(op) or _decide(op)
        order = decided[0][regime(m, dtype)]
    if dtype is None:
        return order[0]
    return next(p for p in order if SERVES.get(p, dtype) == dtype)


def general(op: str, m: int) -> str:
    """The fastest of op's general paths for m rows of float32 x (serving any x): where a planned path cannot run a
    call."""
    order = (_decided.get(op) or _decide(op))[0][regime(m)]
    return next((p for p in order if p in GENERAL[op]), GENERAL[op][0])


def record(op: str, path: str, planned: Optional[str] = None, why: str = "") -> None:
    """Count a call of op that ran path; planned (with why) when that was another path, which could not run it."""
    _calls[op, path] += 1
    if planned is not None and planned != path:
        _fallbacks[op, planned, path, why] += 1


def cpu_dispatch(decide: bool = True) -> CpuDispatch:
    """The CPU paths of this process and the counters since the last reset_cpu_counters().

    decide: decide the ops not used yet (timing them, some tens of milliseconds each); else they show "undecided".
    """
    orders, reasons = {}, {}
    for op in PATHS:
        if decide or op in _decided:
            regimes, reason = _decide(op)
        else:
            regimes, reason = {name: ("undecided",) for name in REGIMES}, "not used yet"
        for forced in _forced:
            if op in forced:
                regimes = {name: _forced_order(op, forced[op]) for name in REGIMES}
                reason = "forced by force_cpu_paths"
        orders[op], reasons[op] = dict(regimes), reason
    cache = _caches[-1].stats() if _caches else None
    calls = {f"{op}/{path}": n for (op, path), n in _calls.items()}
    fallbacks = {f"{op}/{planned} -> {path}: {why}": n for (op, planned, path, why), n in _fallbacks.items()}
    uncached = {f"{op}/{path}": n for (op, path), n in _uncached.items()}
    return CpuDispatch(torch.backends.cpu.get_cpu_capability(), _features(), orders, reasons, calls, fallbacks,
                       uncached, cache)  # fmt: skip


def reset_cpu_counters() -> None:
    """Zero the calls, fallbacks and uncached counters."""
    _calls.clear()
    _fallbacks.clear()
    _uncached.clear()


def reset_cpu_dispatch() -> None:
    """Forget the decisions (the next call decides again, re-reading the environment) and zero the counters."""
    with _lock:
        _decided.clear()
    reset_cpu_counters()


@contextlib.contextmanager
def force_cpu_paths(**paths: str) -> Iterator[None]:
    """Inside the block, op (w8a8, w8a16, w4a16) takes the given path, e.g. force_cpu_paths(w8a8="float_exact")."""
    for op, path in paths.items():
        if op not in PATHS:
            raise ValueError(f"force_cpu_paths: ops are {', '.join(PATHS)}, got {op!r}")
        _check_path(op, path, "force_cpu_paths")
    entry = dict(paths)
    _forced.append(entry)
    try:
        yield
    finally:
        for i in range(len(_forced) - 1, -1, -1):
            if _forced[i] is entry:
                del _forced[i]
                break


# ----------------------------------------------------------------------------------------------
# Weight cache
# ----------------------------------------------------------------------------------------------


def _value_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, (tuple, list)):
        return sum(_value_bytes(v) for v in value)
    return 0


def _signature(tensors: tuple[torch.Tensor, ...]) -> Optional[tuple]:
    """(version, data_ptr, shape) of the tensors; None when one does not track versions (inference tensors)."""
    try:
        return tuple([(t._version, t.data_ptr(), t.shape) for t in tensors])
    except RuntimeError:
        return None


class WeightCache:
    """Prepared weights (see weight_cache), least recently used first out beyond max_bytes."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"weight_cache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._counts = collections.Counter(hits=0, misses=0, evictions=0, stale=0, too_large=0)

    def stats(self) -> dict[str, int]:
        """entries, bytes, max_bytes, hits, misses, evictions, stale (a weight changed since), too_large."""
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes, **self._counts}

    def get(self, kind: str, tensors: tuple[torch.Tensor, ...], make: Callable[[], object]) -> tuple[object, bool]:
        """(the prepared value of kind for tensors, whether the cache holds it): made on a miss, and kept if it fits
        and the tensors track versions (inference tensors do not)."""
        signature = _signature(tensors)
        if signature is None:
            return make(), False
        # ids name the live tensors: an entry goes (forget) when one of its tensors dies, before its id can be reused
        key = (kind, *map(id, tensors))
        with _lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry[1] == signature:
                    self._entries.move_to_end(key)
                    self._counts["hits"] += 1
                    return entry[2], True
                self._counts["stale"] += 1
                self._drop(key)
        value = make()
        nbytes = _value_bytes(value)
        with _lock:
            self._counts["misses"] += 1
            if nbytes > self.max_bytes:
                self._counts["too_large"] += 1
                return value, False
            while self._entries and self.bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self._counts["evictions"] += 1
            self_ref = weakref.ref(self)

            def forget(_, key=key):  # a weight tensor died: its entry goes with it
                cache = self_ref()
                if cache is not None:
                    with _lock:
                        cache._drop(key)

            refs = tuple(weakref.ref(t, forget) for t in tensors)
            self._entries[key] = (refs, signature, value, nbytes)
            self.bytes += nbytes
        return value, True

    def _drop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[3]

    def clear(self) -> None:
        """Release every entry."""
        with _lock:
            self._entries.clear()
            self.bytes = 0


_caches: list[WeightCache] = []


@contextlib.contextmanager
def weight_cache(max_bytes: int = 2**30) -> Iterator[WeightCache]:
    """Keep the CPU paths' prepared weights (float copies, torch's int4 packing) inside the block, at most max_bytes
    (least recently used evicted first), released when the block ends; yields the cache (see WeightCache.stats).

    Wrap an evaluation in it: without it each CPU call prepares its weight again (a full dequantization for
    W4A16). A weight changed in place is prepared again (the key holds its version); an entry goes when its weight
    tensor is freed. Size max_bytes to hold the model's prepared weights (W4A16 / W8A16 dequant and W8A8
    float_exact: 4 bytes per weight for float32 x; int4pack: about half a byte): a layer-by-layer pass over more than
    fits evicts every entry before its next use (stats() shows it). Blocks nest: calls use the innermost cache.
    """
    cache = WeightCache(max_bytes)
    _caches.append(cache)
    try:
        yield cache
    finally:
        _caches.remove(cache)
        cache.clear()


def prepared(op: str, path: str, tensors: tuple[torch.Tensor, ...], make: Callable[[], object], extra: str = "") -> object:
    """The prepared weight of op's path for tensors (and extra, e.g. a dtype): from the active weight_cache, else
    made now (counted in uncached)."""
    if _caches:
        value, kept = _caches[-1].get(f"{op}/{path}/{extra}", tensors, make)
    else:
        value, kept = make(), False
    if not kept:
        _uncached[op, path] += 1
    return value
