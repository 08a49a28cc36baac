"""Everything calq can only check on an NVIDIA GPU, in one prepared run (under 8 minutes on an H100/H200).

    python benchmarks/gpu_check.py --out DIR [--quick]
    python benchmarks/gpu_check.py --out DIR --smoke     # on CPU, tiny shapes: checks the script itself (CI does)

Needs torch, triton and transformers (and calq's small pure-Python needs: pydantic; see README "GPU check" for the
wheels to carry to a machine without a registry). No model download: models are random weights on real configs.
Writes CSV/JSON to DIR and prints each table; the targets are checked as ratios measured in the same run.

1. correctness.csv: every kernel at full Llama sizes against the float64 reference, under every autotune config
   (int4 GEMM and split-K decode with each SPLIT_K, int8), and FP8 (torch._scaled_mm) against its emulation.
2. kernels.csv: W4A16, W8A8 (activation quantization included), FP8 and torch._int_mm against cuBLAS bf16/fp16 at
   M in {1, 16, 128, 1024, 4096} on the Llama shapes, with achieved GB/s and TOPS and the bytes-floor time.
3. pipeline.json: the whole Python pipeline on the GPU (statistics, min-max / AWQ / GPTQ W4, W8A8, FP8, evaluation)
   on the default model's shape and a ~1B Llama, whole-model and streamed, wall time per stage and peak GPU memory.
4. decode.csv: decode tokens/s of each path on both models, with a static KV cache (compiled, CUDA graphs).
targets.json: the issue's targets as measured ratios, each PASS or FAIL.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MS = (1, 16, 128, 1024, 4096)
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))  # (N, K)
GROUP = 128
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, model_type="llama")
MODELS = {"smollm2-135m": {"dir": str(ROOT / "benchmarks" / "smollm2-135m")}, "llama-1b": LLAMA_1B}
SAMPLES = (128, 512, 8)  # calibration samples, their length, the forward batch
TARGETS = (  # (name, kernel, baseline, M values, at least this speedup)
    ("W4A16 vs cuBLAS bf16 at M=1", "w4a16", "bf16", (1,), 3.5),
    ("W4A16 vs cuBLAS bf16 at M=16", "w4a16", "bf16", (16,), 3.0),
    ("W4A16 vs cuBLAS bf16 at M=128", "w4a16", "bf16", (128,), 1.0),
    ("W8A8 (with activation quantization) vs bf16 at M>=1024", "w8a8", "bf16", (1024, 4096), 1.5),
    ("FP8 vs bf16 at M>=1024", "fp8", "bf16", (1024, 4096), 1.6),
)


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        sync()


def smoke() -> None:
    """Shrink every size so the whole script runs on CPU in seconds: its glue is checked before GPU time is spent."""
    global DEVICE, MS, SHAPES, GROUP, MODELS, SAMPLES
    DEVICE, MS, SHAPES, GROUP, SAMPLES = "cpu", (1, 16, 32), ((96, 128), (64, 256)), 32, (4, 64, 8)
    MODELS = {"tiny-llama": dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512)}


def gpu_gb(peak: bool = False) -> float:
    if DEVICE != "cuda":
        return 0.0
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def bench_ms(fn) -> float:
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def quantized(w: torch.Tensor, spec: str):
    """calq's own QuantLinear of weight w (min-max), as the quantized model holds it."""
    from quant.methods import QuantLinear, QuantSpec

    spec = QuantSpec(name="k", scheme=spec, weights={"group_size": GROUP} if spec.startswith("W4") else {})
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    linear.weight.data.copy_(w)
    return QuantLinear.from_linear(linear, spec.weights, spec.input_activations)


# ------------------------------------------------------------------------------------------------------------------
# 1. correctness under every config
# ------------------------------------------------------------------------------------------------------------------

def correctness(quick: bool) -> list[dict]:
    import calq_kernels as k

    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    for n, kk in shapes:
        w = torch.randn(n, kk, device=DEVICE, dtype=torch.bfloat16) / math.sqrt(kk)
        q4, q8, f8 = quantized(w, "W4A16_ASYM"), quantized(w, "W8A8"), quantized(w, "FP8_DYNAMIC")
        for m in MS[:4]:
            x = torch.randn(m, kk, device=DEVICE, dtype=torch.bfloat16)
            ref4 = k.int4_linear_ref(x.double(), q4.qweight, q4.scales, q4.zeros, GROUP)
            for kernel, configs in k.tuning_configs("int4", m).items():
                for cfg in configs:
                    with k.forced_config(kernel, cfg):
                        out = k.int4_linear(x, q4.qweight, q4.scales, q4.zeros, GROUP)
                    rows.append({"op": "w4a16", "kernel": kernel, "config": str(cfg), "N": n, "K": kk, "M": m,
                                 "rel_err": rel_err(out, ref4), "ok": rel_err(out, ref4) < 1e-2})
            ref8 = k.int8_linear_ref(x, q8.qweight, q8.scales).double()
            for kernel, configs in k.tuning_configs("int8", m).items():
                for cfg in configs:
                    with k.forced_config(kernel, cfg):
                        out = k.int8_linear(x, q8.qweight, q8.scales)
                    rows.append({"op": "w8a8", "kernel": kernel, "config": str(cfg), "N": n, "K": kk, "M": m,
                                 "rel_err": rel_err(out, ref8), "ok": rel_err(out, ref8) < 1e-2})
            out = k.fp8_linear(x, f8.qweight, f8.scales)
            ref = k.fp8_linear_ref(x.cpu().float(), f8.qweight.cpu(), f8.scales.cpu()).to(DEVICE)
            rows.append({"op": "fp8", "kernel": "torch._scaled_mm", "config": "-", "N": n, "K": kk, "M": m,
                         "rel_err": rel_err(out, ref), "ok": rel_err(out, ref) < 1e-2})
    return rows


# ------------------------------------------------------------------------------------------------------------------
# 2. the kernel table
# ------------------------------------------------------------------------------------------------------------------

def bytes_floor(kernel: str, m: int, n: int, k: int) -> int:
    """Bytes a kernel must at least read and write: its inputs and output, once (16-bit activations and output)."""
    act, out = 2 * m * k, 2 * m * n
    return {"bf16": act + 2 * n * k + out, "fp16": act + 2 * n * k + out,
            "w4a16": act + n * math.ceil(k / 8) * 4 + n * math.ceil(k / GROUP) * 3 + out,
            "w8a8": act + n * k + 4 * n + out, "fp8": act + n * k + 4 * n + out,
            "int_mm": m * k + n * k + 4 * m * n}[kernel]


def kernel_table(quick: bool, peak_gbps: float) -> list[dict]:
    import calq_kernels as k

    rows = []
    for n, kk in SHAPES[:2] if quick else SHAPES:
        w16 = torch.randn(n, kk, device=DEVICE, dtype=torch.bfloat16) / math.sqrt(kk)
        q4, q8, f8 = quantized(w16, "W4A16_ASYM"), quantized(w16, "W8A8"), quantized(w16, "FP8_DYNAMIC")
        wh = w16.half()
        for m in MS:
            x = torch.randn(m, kk, device=DEVICE, dtype=torch.bfloat16)
            xi, _ = k.quantize_per_token(x)
            fns = {"bf16": lambda: F.linear(x, w16), "fp16": lambda: F.linear(x.half(), wh),
                   "w4a16": lambda: k.int4_linear(x, q4.qweight, q4.scales, q4.zeros, GROUP),
                   "w8a8": lambda: k.int8_linear(x, q8.qweight, q8.scales, act="dynamic"),
                   "fp8": lambda: k.fp8_linear(x, f8.qweight, f8.scales),
                   "int_mm": lambda: torch._int_mm(xi, q8.qweight.t())}
            times = {}
            for kernel, fn in fns.items():
                try:
                    times[kernel] = bench_ms(fn)
                except RuntimeError as err:  # torch._int_mm needs M > 16
                    print(f"  {kernel} M={m} N={n} K={kk} not run: {str(err).splitlines()[0]}")
            for kernel, ms in times.items():
                floor = bytes_floor(kernel, m, n, kk)
                rows.append({"N": n, "K": kk, "M": m, "kernel": kernel, "time_us": ms * 1e3,
                             "speedup_vs_bf16": times["bf16"] / ms, "speedup_vs_fp16": times["fp16"] / ms,
                             "gbps": floor / ms / 1e6, "tops": 2 * m * n * kk / ms / 1e9,
                             "floor_us": floor / peak_gbps / 1e3, "share_of_floor": floor / peak_gbps / 1e3 / (ms * 1e3)})
    return rows


def targets(rows: list[dict]) -> list[dict]:
    out = []
    for name, kernel, base, ms, need in TARGETS:
        ratios = [r[f"speedup_vs_{base}"] for r in rows if r["kernel"] == kernel and r["M"] in ms]
        worst = min(ratios) if ratios else float("nan")
        out.append({"target": name, "needed": need, "measured_worst_shape": worst, "pass": worst >= need})
    return out


# ------------------------------------------------------------------------------------------------------------------
# 3. the pipeline on the GPU
# ------------------------------------------------------------------------------------------------------------------

def _random_model(config: dict, path: Path) -> Path:
    """A random-weight checkpoint of a real config (bf16), with the default model's tokenizer shape (GPT-2 BPE)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        cfg = AutoConfig.for_model(**config) if "model_type" in config else AutoConfig.from_pretrained(config["dir"])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    return path


def _samples(vocab: int, n: int, length: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g, device="cpu") for _ in range(n)]


def pipeline(work: Path, quick: bool) -> dict:
    """Statistics, methods and a perplexity pass per variant through the Python API on the GPU; the data are random
    token ids (speed and memory do not depend on them), the models random weights of real shapes."""
    from quant.calibrate import Streamed, collect_stats
    from quant.methods import QuantSpec, quantize_variant, quantize_variants
    from quant.models import ModelConfig

    specs = [QuantSpec(name="w4-minmax", scheme="W4A16_ASYM"), QuantSpec(name="w8a8", scheme="W8A8"),
             QuantSpec(name="fp8", scheme="FP8_DYNAMIC"),
             QuantSpec(name="w4-awq", scheme="W4A16_ASYM", method="awq", options={"max_tokens": 4096}),
             QuantSpec(name="w4-gptq", scheme="W4A16_ASYM", method="gptq", options={"max_tokens": 4096})]
    result = {}
    for label, config in list(MODELS.items())[:1 if quick else 2]:
        path = _random_model(config, work / label)
        source = ModelConfig(source=str(path), device=DEVICE, dtype="bfloat16")
        stages = {}

        def timed(name, fn):
            sync()
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn()
            sync()
            stages[name] = {"seconds": time.perf_counter() - t0, "peak_gpu_gb": gpu_gb(peak=True)}
            return out

        model = timed("load", lambda: _load_weights_only(source))
        count, length, batch = SAMPLES
        samples = _samples(model.config.vocab_size, count // 4 if quick else count, length)
        stats = timed("stats", lambda m=model: collect_stats(m, samples))
        ids = torch.stack(_samples(model.config.vocab_size, batch, length)).to(DEVICE)
        for spec in specs:
            v = timed(f"quantize {spec.name}", lambda m=model, s=spec: quantize_variant(m, s, stats, samples)).model
            with torch.inference_mode():
                timed(f"forward {spec.name} ({batch} x {length})", lambda v=v: v(input_ids=ids, use_cache=False))
        model = v = None  # free the GPU before the streamed walk
        torch.cuda.empty_cache()
        timed("streamed: stats + all variants", lambda: quantize_variants(Streamed(source), samples, specs))
        result[label] = stages
    return result


def _load_weights_only(source):
    """The checkpoint on the GPU without a tokenizer (the random models have none)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source.source, dtype=source.torch_dtype).to(source.torch_device).eval()


# ------------------------------------------------------------------------------------------------------------------
# 4. decode speed
# ------------------------------------------------------------------------------------------------------------------

def decode_tokens_per_s(model, new_tokens: int) -> float:
    """Greedy decode with a static KV cache (transformers compiles the step, CUDA graphs): (new_tokens - 1) / (time of
    new_tokens - time of 1), so the prompt's prefill cancels out."""
    ids = torch.arange(1, 17, device=DEVICE)[None]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(count: int) -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                       do_sample=False, pad_token_id=pad, cache_implementation="static")
        sync()
        return time.perf_counter() - t0

    generate(4)  # warm up: autotuning, compilation
    return (new_tokens - 1) / (generate(new_tokens) - generate(1))


def decode(work: Path, quick: bool) -> list[dict]:
    from quant.methods import QuantSpec, quantize_variant
    from quant.models import ModelConfig

    rows = []
    for label, config in list(MODELS.items())[:1 if quick else 2]:
        source = ModelConfig(source=str(_random_model(config, work / label)), device=DEVICE, dtype="bfloat16")
        base = None
        for name in ("bf16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC"):
            model = _load_weights_only(source)
            if name != "bf16":
                model = quantize_variant(model, QuantSpec(name="d", scheme=name)).model
            with torch.inference_mode():
                tps = decode_tokens_per_s(model, 32 if quick else 128)
            base = base or tps
            rows.append({"model": label, "path": name, "tokens_per_s": tps, "vs_bf16": tps / base,
                         "gpu_gb": gpu_gb()})
            del model
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/calq-gpu-check"), help="scratch for the random models")
    ap.add_argument("--quick", action="store_true", help="one shape and one model: a smoke run")
    ap.add_argument("--peak-gbps", type=float, default=4800, help="the GPU's memory bandwidth (H200 4800, H100 3350)")
    ap.add_argument("--only", nargs="*", default=["correctness", "kernels", "pipeline", "decode"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        smoke()
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs an NVIDIA GPU (torch.cuda.is_available() is False); --smoke runs on CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import triton

    summary = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--smoke)", "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(summary))
    t0 = time.perf_counter()
    if "correctness" in args.only:
        rows = correctness(args.quick)
        write_csv(args.out / "correctness.csv", rows)
        bad = [r for r in rows if not r["ok"]]
        summary["correctness"] = {"checked": len(rows), "failed": len(bad), "worst": max(r["rel_err"] for r in rows)}
        print("correctness:", summary["correctness"], *bad[:5], sep="\n  ")
    if "kernels" in args.only:
        rows = kernel_table(args.quick, args.peak_gbps)
        write_csv(args.out / "kernels.csv", rows)
        summary["targets"] = targets(rows)
        for r in rows:
            print(f"{r['N']:>6} {r['K']:>6} {r['M']:>5} {r['kernel']:<7} {r['time_us']:9.1f} us "
                  f"{r['speedup_vs_bf16']:6.2f}x bf16 {r['gbps']:7.0f} GB/s {r['tops']:7.1f} TOPS")
        for t in summary["targets"]:
            print(("PASS " if t["pass"] else "FAIL ") + f"{t['target']}: {t['measured_worst_shape']:.2f}x (>= {t['needed']})")
    if "pipeline" in args.only:
        summary["pipeline"] = pipeline(args.work, args.quick)
        print(json.dumps(summary["pipeline"], indent=1))
    if "decode" in args.only:
        rows = decode(args.work, args.quick)
        write_csv(args.out / "decode.csv", rows)
        for r in rows:
            print(f"{r['model']:<14} {r['path']:<12} {r['tokens_per_s']:8.1f} tokens/s {r['vs_bf16']:5.2f}x")
    summary["seconds"] = time.perf_counter() - t0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
