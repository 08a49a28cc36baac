"""Benchmark the CPU paths of the quantized linears against float32 F.linear, per linear and end to end.

Per linear (linear.csv, linear.png): for each weight shape (N, K) of SmolLM2-135M (the default model) and of
Gemma3-270M (hidden 640, intermediate 2048, 4 query heads and 1 kv head of dim 256, vocab head 262144) and M rows
(default 1 and 512), times in one interleaved loop (median over --reps rounds, warm-up first):
    fp32, bf16               F.linear in float32 / bfloat16: the baselines
    <op>/<path>              int8_linear / int4_linear with the CPU path forced (kernels.force_cpu_paths) inside a
                             kernels.weight_cache (prepared weights kept, as in an evaluation)
    <op>/auto                the path the dispatch picks (kernels.cpu_dispatch())
    <op>/ref                 the reference, what the CPU branch ran before the dispatch
    <op>/dequant-uncached    W4A16 dequant outside any weight_cache (the weight dequantized on every call)
with op w8a8 (act="dynamic"), w8a16 (act="none"), w4a16-g128 and w4a16-g64; x is float32 except for the rows
marked bf16, whose x (and the bf16 baseline) is bfloat16. ratio = time / the fp32 time of the same shape and M.

End to end (e2e.csv): a random-weight SmolLM2-135M from benchmarks/smollm2-135m (AutoConfig + from_config) with
every nn.Linear but lm_head swapped for a wrapper calling int8_linear / int4_linear on weights quantized here (min-max,
no calibration), timed for a --prefill-tokens prefill and --decode-tokens decode steps (KV cache; a quarter of them
for the slow "ref" models), interleaved over --e2e-reps rounds after a warm-up round, medians; per quantized model also
the relative error of its logits (64 tokens, and 1) against the same model on the reference paths.

The CPU capability, hardware features and the dispatch's decisions go to dispatch.txt. Compare machines by running
it with ATEN_CPU_CAPABILITY=avx2 (ATen's own kernels only; add ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
to hold oneDNN and MKL to AVX2 as well), or with --no-onednn, which turns oneDNN off in torch
(torch.backends.mkldnn.enabled = False), the way torch._int_mm runs its naive loop (the 15-23x slow W8A8 of the
report); it also changes the bfloat16 baselines.

    python benchmarks/bench_cpu.py --out runs/bench_cpu/native
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_cpu.py --out runs/bench_cpu/avx2
    python benchmarks/bench_cpu.py --out runs/bench_cpu/quick --quick    # small shapes, few reps
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import random
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

import calq_kernels as kernels  # noqa: E402
from quant.methods import QuantLinear, QuantSpec, quantize_linears  # noqa: E402

SMOLLM_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down
GEMMA_SHAPES = [(1024, 640), (256, 640), (2048, 640), (640, 2048), (262144, 640)]  # q, k/v, gate/up, down, vocab
QUICK_SHAPES = [(576, 576), (640, 2048)]
BIG = 50_000_000  # N * K above which a shape gets --big-reps rounds


# ----------------------------------------------------------------------------------------------
# Weights quantized by calq's own quantizer (min-max, no calibration)
# ----------------------------------------------------------------------------------------------

SPECS = {"w8a8": QuantSpec(name="w8a8", scheme="W8A8"), "w8a16": QuantSpec(name="w8a16", weights={"num_bits": 8}),
         "w4a16-g128": QuantSpec(name="g128", scheme="W4A16_ASYM"),
         "w4a16-g64": QuantSpec(name="g64", scheme="W4A16_ASYM", weights={"group_size": 64})}


def quantized(w: torch.Tensor, variant: str) -> QuantLinear:
    """The QuantLinear calq makes of weight w for a variant of SPECS."""
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    spec = SPECS[variant]
    return QuantLinear.from_linear(linear, spec.weights, spec.input_activations)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


Variant = tuple[str, dict, Callable[[], object]]  # (x dtype, forced CPU paths, fn)


def interleaved(variants: dict[str, Variant], reps: int, budget: float, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each variant's fn over rounds, each round calling every fn once, in a shuffled order (what
    ran just before a call changes its time: caches, oneDNN's state): at least reps rounds, more (up to 500) while a
    round costs under budget / reps seconds, as measured in the warm-up. The variant's forced paths (and, for
    "uncached" ones, a weight_cache of 0 bytes) are entered outside the timer."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    rounds = warmup + reps
    round_ = 0
    while round_ < rounds:
        rng.shuffle(order)
        for name in order:
            _, paths, fn = variants[name]
            forced = {op: path for op, path in paths.items() if op != "uncached"}
            with kernels.force_cpu_paths(**forced), kernels.weight_cache(0) if "uncached" in paths else nullcontext():
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            times[name].append(elapsed)
        round_ += 1
        if round_ == warmup:
            per_round = sum(ts[-1] for ts in times.values())
            rounds = warmup + max(reps, min(500, int(budget / max(per_round, 1e-9))))
    return {name: statistics.median(ts[warmup:]) for name, ts in times.items()}


def linear_variants(m: int, n: int, k: int, gen: torch.Generator) -> dict[str, Variant]:
    """name -> (x dtype, forced paths, fn) of every variant for one shape and M (see the module docstring)."""
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    q8 = quantized(w, "w8a8")
    qweight8, w_scale = q8.qweight, q8.scales
    out: dict[str, Variant] = {
        "fp32": ("float32", {}, lambda: F.linear(x, w)),
        "bf16": ("bfloat16", {}, lambda: F.linear(xb, wb)),
    }
    for op, act in (("w8a8", "dynamic"), ("w8a16", "none")):
        def call(xx, act=act):
            return kernels.int8_linear(xx, qweight8, w_scale, act=act)

        for path in kernels.cpu.PATHS[op]:
            if kernels.cpu.SERVES.get(path, torch.float32) == torch.float32:
                out[f"{op}/{path}"] = ("float32", {op: path}, lambda call=call: call(x))
        out[f"{op}/auto"] = ("float32", {}, lambda call=call: call(x))
        if op == "w8a16":
            for path in ("int8pack", "dequant_bf16", "dequant"):
                out[f"{op}/{path} bf16"] = ("bfloat16", {op: path}, lambda call=call: call(xb))
            out[f"{op}/auto bf16"] = ("bfloat16", {}, lambda call=call: call(xb))
    for group_size in (128, 64):
        op = f"w4a16-g{group_size}"
        q4 = quantized(w, op)
        qweight4, scales, zeros = q4.qweight, q4.scales, q4.zeros

        def call4(xx, qweight4=qweight4, scales=scales, zeros=zeros, group_size=group_size):
            return kernels.int4_linear(xx, qweight4, scales, zeros, group_size)

        for path in ("dequant", "native"):
            out[f"{op}/{path}"] = ("float32", {"w4a16": path}, lambda call4=call4: call4(x))
        out[f"{op}/ref"] = ("float32", {"w4a16": "ref"}, lambda call4=call4: call4(x))
        out[f"{op}/auto"] = ("float32", {}, lambda call4=call4: call4(x))
        for path in ("int4pack", "dequant_bf16", "dequant"):
            out[f"{op}/{path} bf16"] = ("bfloat16", {"w4a16": path}, lambda call4=call4: call4(xb))
        out[f"{op}/auto bf16"] = ("bfloat16", {}, lambda call4=call4: call4(xb))
        out[f"{op}/dequant-uncached"] = ("float32", {"w4a16": "dequant", "uncached": True},
                                         lambda call4=call4: call4(x))  # fmt: skip
    return out


def bench_linears(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        for m in args.ms:
            reps = args.big_reps if n * k > BIG else args.reps
            variants = linear_variants(m, n, k, gen)
            with kernels.weight_cache(max_bytes=16 * 2**30):
                times = interleaved(variants, reps, args.budget)
            for name, (dtype, _, _) in variants.items():
                rows.append({"capability": args.capability, "n": n, "k": k, "m": m, "variant": name, "x_dtype": dtype,
                             "ms": times[name] * 1e3,
                             "ratio_vs_fp32": times[name] / times["fp32"],
                             "ratio_vs_bf16": times[name] / times["bf16"]})  # fmt: skip
            line = "  ".join(f"{name} {times[name] / times['fp32']:.2f}" for name in variants if name != "fp32")
            print(f"N={n} K={k} M={m}: fp32 {times['fp32'] * 1e3:.3f} ms; x fp32: {line}", flush=True)
            del variants
    return rows


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def e2e_models(dtype: torch.dtype) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    """name -> (model, forced CPU paths) over one random-weight SmolLM2-135M."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ROOT / "benchmarks" / "smollm2-135m")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    models: dict[str, tuple[nn.Module, dict[str, str]]] = {"fp32": (base, {})}
    models["bf16"] = (copy.deepcopy(base).to(torch.bfloat16), {})
    for name, spec in SPECS.items():
        model = copy.deepcopy(base).to(dtype)
        quantize_linears(model, spec.weights, spec.input_activations, spec.ignore)  # every linear but lm_head
        op = name.split("-")[0]
        models[f"{name} {dtype_name(dtype)}"] = (model, {})
        models[f"{name} {dtype_name(dtype)} ref"] = (model, {op: "ref"})
    return models


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prefill_and_decode(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step over decode_tokens greedy steps) with a DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / decode_tokens


def bench_e2e(args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype in args.e2e_dtypes:
        models = e2e_models(getattr(torch, dtype))
        ids = torch.randint(0, 49152, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        agreement = {}  # the logits of the dispatched paths against the reference paths: 64 tokens, then 1
        with torch.inference_mode(), kernels.weight_cache(max_bytes=16 * 2**30):
            for name, (model, paths) in models.items():
                op = name.split("-")[0].split(" ")[0]
                if paths or op not in kernels.cpu.PATHS:
                    continue
                errors = []
                for tokens in (64, 1):  # the prefill and the decode paths
                    auto = model(input_ids=ids[:, :tokens]).logits.double()
                    with kernels.force_cpu_paths(**{op: "ref"}):
                        ref = model(input_ids=ids[:, :tokens]).logits.double()
                    errors.append(((auto - ref).norm() / ref.norm()).item())
                agreement[name] = max(errors)
            order, rng = list(models), random.Random(0)
            for round_ in range(args.e2e_reps + 1):  # round 0: warm-up (prepares the cached weights)
                rng.shuffle(order)
                for name in order:
                    model, paths = models[name]
                    steps = max(4, args.decode_tokens // 4) if paths else args.decode_tokens  # ref paths: slow
                    with kernels.force_cpu_paths(**paths):
                        result = prefill_and_decode(model, ids, steps)
                    if round_:
                        times[name].append(result)
        fp32 = [statistics.median(t[i] for t in times["fp32"]) for i in range(2)]
        for name, ts in times.items():
            prefill = statistics.median(t[0] for t in ts)
            decode = statistics.median(t[1] for t in ts)
            rows.append({"capability": args.capability, "model": name, "prefill_tokens": args.prefill_tokens,
                         "prefill_s": prefill,
                         "prefill_tok_s": args.prefill_tokens / prefill, "prefill_ratio_vs_fp32": prefill / fp32[0],
                         "decode_s_per_token": decode, "decode_tok_s": 1 / decode,
                         "decode_ratio_vs_fp32": decode / fp32[1],
                         "logits_rel_err_vs_ref": agreement.get(name, "")})  # fmt: skip
            check = f", logits vs ref paths {agreement[name]:.1e}" if name in agreement else ""
            print(f"e2e {name}: prefill {args.prefill_tokens / prefill:.0f} tok/s ({prefill / fp32[0]:.2f}x fp32 "
                  f"time), decode {1 / decode:.1f} tok/s ({decode / fp32[1]:.2f}x){check}", flush=True)
        del models
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{v:.6g}" if isinstance(v, float) else v for key, v in row.items()})


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Heatmap of time / fp32 time: variants down, (shape, M) across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    columns = list(dict.fromkeys((r["n"], r["k"], r["m"]) for r in rows))
    ratio = {(r["variant"], (r["n"], r["k"], r["m"])): r["ratio_vs_fp32"] for r in rows}
    grid = [[ratio.get((v, c), float("nan")) for c in columns] for v in variants]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(columns), 1.0 + 0.32 * len(variants)))
    image = ax.imshow(grid, cmap="RdYlGn_r", norm=LogNorm(vmin=0.1, vmax=10), aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), [f"{n}x{k}\nM={m}" for n, k, m in columns], fontsize=7)
    ax.set_yticks(range(len(variants)), variants, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="time / fp32 F.linear time")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cpu"), help="folder for the CSVs and plot")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 512], help="rows M (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=9, help="interleaved rounds per shape and M, at least (median)")
    parser.add_argument("--budget", type=float, default=4.0,
                        help="seconds per shape and M: more rounds (up to 500) where they fit (default: %(default)s)")
    parser.add_argument("--big-reps", type=int, default=3, help=f"rounds for shapes with N*K > {BIG:,}")
    parser.add_argument("--shapes", choices=["smollm", "gemma", "all"], default="all")
    parser.add_argument("--no-linear", action="store_true", help="skip the per-linear timings")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end timings")
    parser.add_argument("--e2e-dtypes", nargs="+", default=["float32", "bfloat16"],
                        help="dtypes of the quantized end-to-end models (default: %(default)s)")  # fmt: skip
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--e2e-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-onednn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    parser.add_argument("--quick", action="store_true", help="two small shapes, 3 rounds, short e2e")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_onednn:
        torch.backends.mkldnn.enabled = False
    shapes = {"smollm": SMOLLM_SHAPES, "gemma": GEMMA_SHAPES, "all": SMOLLM_SHAPES + GEMMA_SHAPES}[args.shapes]
    if args.quick:
        shapes, args.reps, args.budget, args.e2e_reps = QUICK_SHAPES, 3, 0.5, 1
        args.prefill_tokens, args.decode_tokens = 64, 4
    args.out.mkdir(parents=True, exist_ok=True)

    dispatch = kernels.cpu_dispatch()
    args.capability = dispatch.capability + (" no-oneDNN" if args.no_onednn else "")
    env = {name: os.environ[name] for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
           if name in os.environ}  # fmt: skip
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability {dispatch.capability}, "
              f"env {env or 'none'}, oneDNN {'off' if args.no_onednn else 'on'}")  # fmt: skip
    print(header)
    print(dispatch.summary(), flush=True)

    if not args.no_linear:
        kernels.reset_cpu_counters()
        rows = bench_linears(args, shapes)
        write_csv(args.out / "linear.csv", rows)
        plot(args.out / "linear.png", rows, header)
    if not args.no_e2e:
        kernels.reset_cpu_counters()
        write_csv(args.out / "e2e.csv", bench_e2e(args))
    final = kernels.cpu_dispatch()
    (args.out / "dispatch.txt").write_text(header + "\n" + final.summary() + "\n")
    print(final.summary())


if __name__ == "__main__":
    main()
