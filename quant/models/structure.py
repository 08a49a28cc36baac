"""Where things are in a causal LM: its decoder layers, its final norm, and the exact fold of a per-channel
scale into a norm or a linear. Every stage that walks or edits a model finds its parts here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quant.errors import CalqError

NORM_OFFSETS: dict[str, float] = {
    "LlamaRMSNorm": 0.0,
    "MistralRMSNorm": 0.0,
    "Qwen2RMSNorm": 0.0,
    "Qwen3RMSNorm": 0.0,
    "Gemma3RMSNorm": 1.0,
}
"""Per norm class, the offset in y = x_hat * (offset + weight): Gemma scales by (1 + weight)."""


@dataclass(frozen=True)
class Layer:
    """One decoder layer: its full module name (the prefix of its linears' names) and the module."""

    name: str
    module: nn.Module


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layers_path(model: nn.Module) -> str:
    """Path of the ModuleList holding the decoder layers: the largest list of the classes transformers keeps
    whole on one device (`_no_split_modules`), so multimodal wrappers (Gemma3's language_model) need no table."""
    whole = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) and (not whole or type(mod[0]).__name__ in whole)]
    if not lists:
        raise CalqError(f"{type(model).__name__} has no list of decoder layers (an nn.ModuleList of "
                        f"{', '.join(sorted(whole)) or 'blocks'}); calq walks causal LMs made of decoder layers")
    return max(lists, key=lambda item: _size(item[1]))[0]


def decoder_layers(model: nn.Module) -> list[Layer]:
    """The decoder layers in order."""
    path = layers_path(model)
    return [Layer(f"{path}.{i}", module) for i, module in enumerate(model.get_submodule(path))]


def final_norm(model: nn.Module, needed_by: str, fix: str) -> nn.Module:
    """The norm between the last decoder layer and the unembedding (where a temperature folds exactly and the
    logit lens reads every layer). `needed_by` and `fix` complete the error when the model has none."""
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise CalqError(f"{type(model).__name__} has no final norm with a weight (model.norm), which {needed_by} "
                        f"needs; {fix}")
    return norm


def norm_offset(norm: nn.Module) -> float:
    kind = type(norm).__name__
    if kind not in NORM_OFFSETS:
        raise CalqError(f"cannot fold scales into a {kind}; known norms: {', '.join(sorted(NORM_OFFSETS))}")
    return NORM_OFFSETS[kind]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear] | tuple[nn.Linear, ...], s: Tensor) -> None:
    """Divide prev's output channels by s and multiply the linears' input columns by s, in place.

    prev is a norm (its weight) or a linear (its rows and bias); the model computes the same function.
    """
    s = s.float()
    if isinstance(prev, nn.Linear):
        prev.weight.copy_(prev.weight.float() / s[:, None])
        if prev.bias is not None:
            prev.bias.copy_(prev.bias.float() / s)
    else:
        offset = norm_offset(prev)
        prev.weight.copy_((prev.weight.float() + offset) / s - offset)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s)
