"""Benchmark the quantized matmul kernels against cuBLAS on an NVIDIA GPU.

Kernel mode (default): for every (N, K) weight shape and every M, checks our kernels against the torch references
at full size, then times with triton.testing.do_bench (median of GPU times, L2 flushed before each run):
    fp16         F.linear(x, w) in float16 (cuBLAS), the baseline of the speedups
    w4a16        int4_linear: int4 weights, min-max asymmetric, group 128
    w8a8         int8_linear act="dynamic": per-token activation quantization kernel plus int8 matmul
    int_mm_kn    torch._int_mm(x_int8, w_int8) with a row-major (K, N) weight (no quantization, int32 output)
    int_mm_nk_t  torch._int_mm(x_int8, w_int8.t()) with the (N, K) weight passed transposed
and prints time, speedup over fp16, achieved bandwidth (the kernel's minimum bytes divided by its time) and TOPS,
and writes them to a CSV (--out). With --peak-gbps it also prints the bytes floor time and the share of it.

--e2e: decode tokens/s of a local Hugging Face causal LM (--model) in float16, and with every nn.Linear but the
output head quantized by calq's own quantizer (QuantLinear: int4_linear for w4a16, int8_linear for w8a8).

    python benchmarks/bench_kernels.py --out runs/bench_kernels.csv
    python benchmarks/bench_kernels.py --e2e --model /path/to/llama --new-tokens 128 [--static-cache]
    python benchmarks/bench_kernels.py --e2e --model benchmarks/smollm2-135m   # the default model's shape
"""

import argparse
import csv
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.testing

from calq_kernels import int4_linear, int4_linear_ref, int8_linear, int8_linear_ref, quantize_per_token, quantize_per_token_ref
from quant.methods import ActScheme, QuantLinear, WeightScheme, quantize_linears

MS = (1, 16, 128, 1024, 4096)
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))  # (N, K)
GROUP_SIZE = 128
KERNELS = ("fp16", "w4a16", "w8a8", "int_mm_kn", "int_mm_nk_t")


W4 = WeightScheme(num_bits=4, group_size=GROUP_SIZE, symmetric=False)
W8 = WeightScheme(num_bits=8)


def quantized(w: torch.Tensor, scheme: WeightScheme) -> QuantLinear:
    """calq's own quantized linear of weight w (min-max), as the quantized model holds it."""
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    linear.weight.data.copy_(w)
    return QuantLinear.from_linear(linear, scheme)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bytes_floor(kernel: str, m: int, n: int, k: int) -> int:
    """Bytes a kernel must at least read and write: its inputs and output, once."""
    activations, output = 2 * m * k, 2 * m * n
    if kernel == "fp16":
        return activations + 2 * n * k + output
    if kernel == "w4a16":
        return activations + n * math.ceil(k / 8) * 4 + n * math.ceil(k / GROUP_SIZE) * 3 + output
    if kernel == "w8a8":
        return activations + n * k + 4 * n + output
    return m * k + n * k + 4 * m * n  # torch._int_mm: int8 in, int32 out


def check(name: str, error: float, tolerance: float) -> None:
    if not error < tolerance:
        raise SystemExit(f"correctness check failed: {name} relative error {error:.3g} >= {tolerance}")


def bench_shape(n: int, k: int, ms: tuple[int, ...], args) -> list[dict]:
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / math.sqrt(k)
    q4, q8 = quantized(w, W4), quantized(w, W8)
    qweight4, scales, zeros = q4.qweight, q4.scales, q4.zeros
    qweight8, w_scale = q8.qweight, q8.scales
    qweight8_kn = qweight8.t().contiguous()
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)

        # Full-size correctness against the references (this also autotunes the kernels for this shape).
        x_int8, scale = quantize_per_token(x)
        q_ref, scale_ref = quantize_per_token_ref(x)
        if not (torch.equal(x_int8, q_ref) and torch.equal(scale, scale_ref)):
            raise SystemExit(f"correctness check failed: quantize_per_token differs from the reference at {(m, k)}")
        ref4 = int4_linear_ref(x, qweight4, scales, zeros, GROUP_SIZE)
        check(f"w4a16 {(m, n, k)}", rel_err(int4_linear(x, qweight4, scales, zeros, GROUP_SIZE), ref4), 1e-2)
        ref8 = int8_linear_ref(x, qweight8, w_scale)
        check(f"w8a8 {(m, n, k)}", rel_err(int8_linear(x, qweight8, w_scale), ref8), 1e-2)

        fns = {
            "fp16": lambda: F.linear(x, w),
            "w4a16": lambda: int4_linear(x, qweight4, scales, zeros, GROUP_SIZE),
            "w8a8": lambda: int8_linear(x, qweight8, w_scale, act="dynamic"),
            "int_mm_kn": lambda: torch._int_mm(x_int8, qweight8_kn),
            "int_mm_nk_t": lambda: torch._int_mm(x_int8, qweight8.t()),
        }
        times = {}
        for kernel, fn in fns.items():
            try:
                times[kernel] = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
            except RuntimeError as err:  # torch._int_mm needs M > 16 (and N, K multiples of 8)
                print(f"  {kernel} at M={m}, N={n}, K={k} not run: {str(err).splitlines()[0]}")
        for kernel, ms_time in times.items():
            floor = bytes_floor(kernel, m, n, k)
            rows.append({
                "N": n, "K": k, "M": m, "kernel": kernel,
                "time_us": ms_time * 1e3,
                "speedup_vs_fp16": times["fp16"] / ms_time,
                "bytes_floor": floor,
                "gbps": floor / ms_time / 1e6,
                "tops": 2 * m * n * k / ms_time / 1e9,
                "floor_us": floor / args.peak_gbps / 1e3 if args.peak_gbps else None,
            })
    return rows


def print_table(rows: list[dict], peak_gbps: float | None) -> None:
    header = f"{'N':>6} {'K':>6} {'M':>5} {'kernel':<12} {'time us':>9} {'vs fp16':>8} {'GB/s':>8} {'TOPS':>7}"
    if peak_gbps:
        header += f" {'floor us':>9} {'% floor':>8}"
    print(header)
    for r in rows:
        line = (
            f"{r['N']:>6} {r['K']:>6} {r['M']:>5} {r['kernel']:<12} {r['time_us']:>9.1f} "
            f"{r['speedup_vs_fp16']:>7.2f}x {r['gbps']:>8.0f} {r['tops']:>7.1f}"
        )
        if peak_gbps:
            line += f" {r['floor_us']:>9.1f} {100 * r['floor_us'] / r['time_us']:>7.0f}%"
        print(line)


def swap_linears(model: nn.Module, variant: str) -> int:
    """Quantize every nn.Linear except the output head with calq's quantizer (min-max); return how many."""
    weights, acts = (W4, None) if variant == "w4a16" else (W8, ActScheme(dynamic=True))
    ignore = tuple(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    return len(quantize_linears(model, weights, acts, ignore).quantized)


def decode_tokens_per_s(model, input_ids: torch.Tensor, new_tokens: int, static_cache: bool) -> tuple[float, list]:
    """Greedy decode speed: (new_tokens - 1) / (time to generate new_tokens - time to generate 1), so the prompt's
    prefill cancels out. Returns it with the generated ids. static_cache: a static KV cache, with which
    transformers compiles the decode step (torch.compile, CUDA graphs), taking per-kernel launch overhead out of
    what is timed, as gpt-fast measures; the kernels run through their torch.library custom ops."""
    cache = {"cache_implementation": "static"} if static_cache else {}
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id

    def generate(count: int) -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=count,
                             min_new_tokens=count, do_sample=False, pad_token_id=pad, **cache)
        torch.cuda.synchronize()
        return time.perf_counter() - start, out

    generate(4)  # warm up: CUDA context, Triton autotuning for the prompt length and for M = 1, compilation
    one, _ = generate(1)
    total, out = generate(new_tokens)
    return (new_tokens - 1) / (total - one), out[0, input_ids.shape[1]:].tolist()


def load_e2e_model(model_dir: Path):
    """--model in float16 on the GPU. A directory with a config.json and no weights gets random ones (seeded):
    decode speed does not depend on weight values, and the GPU machine may have no copy of the weights
    (benchmarks/smollm2-135m holds the default model's config for that)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin")):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float16)
    return model.cuda().eval()


def run_e2e(args) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model) if (args.model / "tokenizer.json").exists() else None
    if tokenizer is not None:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.cuda()
    else:
        input_ids = torch.arange(1, 17, device="cuda")[None]  # no tokenizer: 16 fixed prompt ids
    results = {}
    for variant in ("fp16", "w4a16", "w8a8"):
        model = load_e2e_model(args.model)
        swapped = swap_linears(model, variant) if variant != "fp16" else 0
        with torch.inference_mode():
            tokens_per_s, ids = decode_tokens_per_s(model, input_ids, args.new_tokens, args.static_cache)
        results[variant] = tokens_per_s
        memory = torch.cuda.memory_allocated() / 2**30
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else str(ids[:12])
        print(
            f"{variant:<6} {tokens_per_s:8.1f} tokens/s  {tokens_per_s / results['fp16']:5.2f}x  "
            f"{swapped:4d} linears swapped  {memory:6.2f} GiB allocated  | {text[:80]!r}"
        )
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels.csv"), help="CSV of the kernel timings")
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS), help="token counts M (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup time in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="peak memory bandwidth in GB/s (e.g. 3350 for H100 SXM)"
    )
    parser.add_argument("--e2e", action="store_true", help="measure decode tokens/s of --model instead")
    parser.add_argument("--model", type=Path, default=None,
                        help="local Hugging Face causal LM directory (--e2e); config.json alone: random weights")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per measurement (--e2e)")
    parser.add_argument("--prompt", type=str, default="The history of the printing press begins", help="--e2e prompt")
    parser.add_argument("--static-cache", action="store_true",
                        help="--e2e with a static KV cache, which transformers compiles (CUDA graphs)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    if args.e2e:
        if args.model is None:
            parser.error("--e2e needs --model, a local Hugging Face model directory")
        run_e2e(args)
        return

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for n, k in SHAPES:
        rows += bench_shape(n, k, tuple(args.ms), args)
    print_table(rows, args.peak_gbps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
