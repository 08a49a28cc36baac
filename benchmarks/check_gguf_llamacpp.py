"""Run a GGUF export in llama.cpp itself and compare its next-token predictions with calq's quantized model.

The export writes calq's own codes and scales into llama.cpp blocks; this checks that a real runtime reads them
as calq meant: same tokenizer ids, and logits that agree with the calq checkpoint the GGUF was exported from.
llama.cpp quantizes activations to 8 bits per block of 32 inside its dot products, much finer than calq's W8A8
(one scale per token), so it is also compared with calq's weights under float activations ("weights only").

Needs llama-cpp-python, which is not a calq dependency and builds llama.cpp from source:
    pip install llama-cpp-python
    python benchmarks/check_gguf_llamacpp.py runs/default --variant w4a16-g64-awq --windows 2
"""

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quant.checks.evaluation import TextEvalConfig, eval_windows
from quant.formats import load
from quant.methods import QuantLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory with models/VARIANT and export/VARIANT-gguf")
    parser.add_argument("--variant", required=True, help="the variant whose GGUF export is checked")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows (evaluation split of wikipedia)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed; pip install llama-cpp-python (it builds llama.cpp)")

    gguf = args.run_dir / "export" / f"{args.variant}-gguf" / "model.gguf"
    if not gguf.exists():
        raise SystemExit(f"{gguf} does not exist; export the variant with calq export --format gguf first")
    model, tokenizer = load(args.run_dir / "models" / args.variant, device="cpu")
    compared = {"calq": model}
    if any(isinstance(m, QuantLinear) and m.act_mode for m in model.modules()):  # W8A8: also its weights alone
        compared["calq weights only"] = copy.deepcopy(model)
        for module in compared["calq weights only"].modules():
            if isinstance(module, QuantLinear):
                module.activations = None
    llm = Llama(str(gguf), n_ctx=args.seq_len, n_batch=args.seq_len, logits_all=True, n_threads=args.threads,
                verbose=False)
    windows = eval_windows(tokenizer, TextEvalConfig(sources=["wikipedia"], windows=args.windows,
                                                     seq_len=args.seq_len))
    same_ids = 0
    rows: dict[str, dict[str, list]] = {name: {} for name in compared}
    nll_llama = []
    for ids in windows:
        text = tokenizer.decode(ids)
        same_ids += llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
        llm.reset()
        llm.eval(ids.tolist())
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        logp_theirs = F.log_softmax(theirs, -1)
        nll_llama.append(-logp_theirs[:-1].gather(-1, ids[1:, None])[:, 0])
        for name, m in compared.items():
            with torch.inference_mode():
                ours = m(input_ids=ids[None], use_cache=False).logits[0].float()
            logp_ours = F.log_softmax(ours, -1)
            for key, value in (("agree", (ours.argmax(-1) == theirs.argmax(-1)).float()),
                               ("kl", (logp_ours.exp() * (logp_ours - logp_theirs)).sum(-1)),
                               ("diff", (ours - theirs).abs().mean(-1)), ("max", (ours - theirs).abs().amax(-1)),
                               ("nll", -logp_ours[:-1].gather(-1, ids[1:, None])[:, 0])):
                rows[name].setdefault(key, []).append(value)

    llm.close()
    tokens = sum(len(w) for w in windows)
    ppl_llama = torch.cat(nll_llama).mean().exp()
    print(f"{gguf} ({gguf.stat().st_size / 2**20:.1f} MiB) vs calq {args.variant}, {tokens} held-out tokens")
    print(f"tokenizer: llama.cpp ids equal calq's on {same_ids}/{len(windows)} windows")
    print("| llama.cpp vs | top-1 agreement | mean KL | mean abs logit diff | max | perplexity (llama.cpp) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        c = {k: torch.cat(v) for k, v in r.items()}
        print(f"| {name} | {c['agree'].mean():.4f} | {c['kl'].mean():.5f} | {c['diff'].mean():.4f} | "
              f"{c['max'].max():.3f} | {c['nll'].mean().exp():.3f} ({ppl_llama:.3f}) |")


if __name__ == "__main__":
    main()
