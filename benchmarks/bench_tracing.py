"""How long tracing the smoothing groups (quant.methods.mappings.traced_groups) takes on one decoder layer of a
Qwen3-30B-A3B-shaped MoE model (128 experts, 8 per token, head_dim 128; widths / 8, random weights), by number of
experts: it should grow linearly with the experts, not quadratically.

    OMP_NUM_THREADS=1 python benchmarks/bench_tracing.py --experts 16 64 128
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quant.calibrate.walker import Resident
from quant.methods.mappings import traced_groups
from quant.models import route_all_experts


def qwen3_moe_shaped(experts: int = 128, layers: int = 1, vocab: int = 384) -> nn.Module:
    """A random-weight model with Qwen3-30B-A3B's expert layout (8 routed per token, head_dim 128, GQA), widths / 8."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=vocab, hidden_size=256, moe_intermediate_size=96,
                               intermediate_size=768, num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                               max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # from_config leaves fused experts at zero
                p.normal_(0, 0.05)
    return model


def layer_and_probe(experts: int, tokens: int):
    source = Resident(qwen3_moe_shaped(experts))
    with route_all_experts():
        track = source.inputs([torch.randint(0, 384, (tokens,), device="cpu")])
    return source.layers[0], track.at(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    for experts in args.experts:
        layer, probe = layer_and_probe(experts, args.tokens)
        start = time.perf_counter()
        groups, skipped = traced_groups(layer, probe)
        seconds = time.perf_counter() - start
        print(f"{experts:4d} experts: {seconds:6.2f} s, {len(groups)} groups over "
              f"{sum(len(g.names) for g in groups)} linears, {len(skipped)} skipped")


if __name__ == "__main__":
    main()
