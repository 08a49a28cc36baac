"""Peak memory and time of whole-model vs sequential (layer-by-layer) AWQ, each in a fresh process.

    .venv/bin/python benchmarks/bench_memory.py --out runs/bench_memory                  # default model
    .venv/bin/python benchmarks/bench_memory.py --out runs/bench_memory_1b --large --cap-mb 6000

Peak memory: the child's peak RSS (getrusage ru_maxrss) on CPU, torch.cuda.max_memory_allocated on GPU,
and the RSS right after imports (so "above baseline" is what the method itself needs). `--cap-mb` is a
memory cap enforced by a watchdog thread in the child (it exits when its RSS passes the cap, no cgroup
needed): the table says which path finished under it. `--large` benchmarks a random Llama config of
~1.1B parameters (TinyLlama's shape, bf16) written once to a checkpoint, with a cheaper AWQ search
(the grids and token count are CLI options) so the CPU run takes minutes. Both paths quantize the same
samples, and their quantized weights are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quant.calibrate import ActivationStats, Streamed
from quant.files import write_text_atomic
from quant.methods import QuantSpec, quantize_variant, quantize_variants
from quant.methods.awq import AWQConfig
from quant.models import ModelConfig, resolve_model_path

CAPPED = 3  # the child's exit code when it passed the memory cap
LARGE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def _watchdog(cap_mb: float) -> None:
    proc = psutil.Process()
    while True:
        if proc.memory_info().rss / 2**20 > cap_mb:
            os._exit(CAPPED)
        time.sleep(0.01)


def child(args: argparse.Namespace) -> None:
    """One path in this (fresh) process: quantize, save the weights, print the measurements as JSON."""
    base_mb = psutil.Process().memory_info().rss / 2**20
    torch.set_num_threads(args.threads)
    if args.cap_mb:
        threading.Thread(target=_watchdog, args=(args.cap_mb,), daemon=True).start()
    source = ModelConfig(source=args.model, dtype=args.dtype)
    samples = list(load_file(args.samples).values())
    spec = QuantSpec(name="awq", method="awq", scheme="W4A16_ASYM",
                     options={"n_grid": args.grid, "clip_grid": args.clip_grid, "max_tokens": args.max_tokens})
    empty = ActivationStats(layers={}, meta={})  # AWQ W4A16 uses no statistics
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    if args.path == "whole":
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=getattr(torch, args.dtype))
        result = quantize_variant(model.to(args.device), spec, empty, samples)
    else:
        result = quantize_variants(Streamed(source, args.device), samples, [spec], empty)[1]["awq"]
    seconds = time.perf_counter() - t0
    save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()
               if "layers." in k}, args.weights)
    print(json.dumps({"path": args.path, "seconds": seconds, "baseline_rss_mb": base_mb,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


def _samples(args: argparse.Namespace, out: Path) -> Path:
    path = out / "samples.safetensors"
    if args.large:
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, LARGE["vocab_size"], (512,), generator=g) for _ in range(64)]
    else:
        from transformers import AutoTokenizer

        from quant.data import SelectConfig, select_samples
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
        ids = select_samples(tokenizer, SelectConfig()).token_ids  # the default recipe's samples
    save_file({f"{i:05d}": t.contiguous() for i, t in enumerate(ids)}, path)
    return path


def _large_checkpoint(out: Path) -> str:
    """A random ~1.1B-parameter Llama, saved once (bf16) in a child process so this one stays small."""
    path = out / "random-llama-1b"
    if not (path / "config.json").exists():
        code = ("import torch, sys; from transformers import LlamaConfig, AutoModelForCausalLM; torch.manual_seed(0); "
                f"AutoModelForCausalLM.from_config(LlamaConfig(**{LARGE!r}), dtype=torch.bfloat16)"
                ".save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_memory"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--large", action="store_true", help="a random ~1.1B Llama (bf16) instead of --model")
    ap.add_argument("--cap-mb", type=float, default=None, help="memory cap for both paths (watchdog)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grid", type=int, default=None)
    ap.add_argument("--clip-grid", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads per path (1 is steadier on a shared machine)")
    ap.add_argument("--child", choices=["whole", "sequential"], dest="path", help=argparse.SUPPRESS)
    ap.add_argument("--samples", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = AWQConfig()
    cheap = args.large  # the 1B search on CPU: fewer grid points and tokens, the same for both paths
    args.grid = args.grid or (4 if cheap else defaults.n_grid)
    args.clip_grid = args.clip_grid or (4 if cheap else defaults.clip_grid)
    args.max_tokens = args.max_tokens or (2048 if cheap else defaults.max_tokens)
    if args.path:
        return child(args)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.large:
        args.model, args.dtype = _large_checkpoint(args.out), "bfloat16"
    samples = _samples(args, args.out)
    rows = {}
    for path in ("sequential", "whole"):
        weights = args.out / f"weights-{path}.safetensors"
        cmd = [sys.executable, __file__, "--child", path, "--samples", str(samples), "--weights", str(weights),
               "--model", args.model, "--dtype", args.dtype, "--device", args.device, "--grid", str(args.grid),
               "--clip-grid", str(args.clip_grid), "--max-tokens", str(args.max_tokens),
               "--threads", str(args.threads)]
        if args.cap_mb:
            cmd += ["--cap-mb", str(args.cap_mb)]
        t0 = time.perf_counter()
        with open(args.out / f"{path}.log", "w") as log:  # the child's progress bars
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        if proc.returncode == CAPPED:
            rows[path] = {"path": path, "exceeded_cap_mb": args.cap_mb, "seconds_until_cap": time.perf_counter() - t0}
        elif proc.returncode:
            raise SystemExit(f"{path} failed (exit {proc.returncode}); see {args.out / f'{path}.log'}")
        else:
            rows[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[path]))
    report = {"model": args.model, "dtype": args.dtype, "device": args.device, "cap_mb": args.cap_mb,
              "awq": {"grid": args.grid, "clip_grid": args.clip_grid, "max_tokens": args.max_tokens},
              "torch_threads": args.threads, "runs": rows}
    if all("peak_rss_mb" in r for r in rows.values()):
        w, s = (load_file(args.out / f"weights-{p}.safetensors") for p in ("whole", "sequential"))
        report["weights"] = {"tensors": len(w), "same_keys": w.keys() == s.keys(),
                             "max_abs_diff": max((w[k].float() - s[k].float()).abs().max().item() for k in w),
                             "identical": all(torch.equal(w[k], s[k]) for k in w)}
        key = "peak_cuda_mb" if args.device.startswith("cuda") else "peak_rss_mb"
        report["peak_ratio_sequential_to_whole"] = rows["sequential"][key] / rows["whole"][key]
        report["above_baseline_ratio"] = ((rows["sequential"]["peak_rss_mb"] - rows["sequential"]["baseline_rss_mb"])
                                          / (rows["whole"]["peak_rss_mb"] - rows["whole"]["baseline_rss_mb"]))
    write_text_atomic(args.out / "bench_memory.json", json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
