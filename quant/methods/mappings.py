"""Where scales can be folded in each supported architecture (smoothing groups), for SmoothQuant and AWQ.

A smoothing group is an op and the linears that read its output. Dividing the op's output channels by s and
multiplying the linears' input columns by s (quant.models.fold_scales) leaves the model's function unchanged while
moving magnitude between activations and weights, which is what SmoothQuant and AWQ exploit. Architectures differ
only in module names, so they are tables here and the methods stay architecture-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.errors import CalqError
from quant.models import Layer, decoder_layers
from quant.models.structure import norm_offset


@dataclass(frozen=True)
class GroupSpec:
    prev: str
    """The op whose output the linears read, relative to the decoder layer."""
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    groups: tuple[GroupSpec, ...]
    unclipped: tuple[str, ...]
    """Linears AWQ's clip search leaves alone: clipping q/k distorts attention scores (as AutoAWQ)."""


_ATTENTION = (GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              GroupSpec("self_attn.v_proj", ("self_attn.o_proj",)))
_LLAMA = Architecture(
    groups=(*_ATTENTION, GroupSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            GroupSpec("mlp.up_proj", ("mlp.down_proj",))),
    unclipped=("self_attn.q_proj", "self_attn.k_proj"),
)
# Gemma3 normalizes the attention output after o_proj; the MLP reads pre_feedforward_layernorm.
_GEMMA3 = Architecture(
    groups=(*_ATTENTION, GroupSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            GroupSpec("mlp.up_proj", ("mlp.down_proj",))),
    unclipped=_LLAMA.unclipped,
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,
}


@dataclass(frozen=True)
class Group:
    prev: nn.Module
    names: tuple[str, ...]
    """Full module names of the linears (the keys of ActivationStats)."""
    linears: tuple[nn.Linear, ...]


def architecture(model_type: str | None, method: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise CalqError(f"{method} has no smoothing groups for architecture {model_type!r}; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))} (use method: minmax or gptq for this model)")
    return ARCHITECTURES[model_type]


def check_model(model: nn.Module, method: str) -> Architecture:
    """The model's smoothing groups exist, and its (1 + w) norms among them are held in float32: (1 + w) / s - 1
    rounded to bfloat16 moves the effective multiplier by several percent for the large s SmoothQuant and AWQ pick
    (Gemma). Checked before any work (at recipe load, on a meta skeleton)."""
    arch = architecture(getattr(model.config, "model_type", None), method)
    layer = decoder_layers(model)[0]
    for spec in arch.groups:
        prev = layer.module.get_submodule(spec.prev)
        if not isinstance(prev, nn.Linear) and norm_offset(prev) and prev.weight.dtype != torch.float32:
            raise CalqError(f"{method} folds scales into {layer.name}.{spec.prev} ({type(prev).__name__}, "
                            f"y = x * (1 + w)), which {prev.weight.dtype} cannot hold exactly; load the model with "
                            "dtype: float32")
    return arch


def _width(prev: nn.Module) -> int:
    return prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()


def smoothing_groups(layer: Layer, arch: Architecture) -> tuple[tuple[Group, ...], dict[str, str]]:
    """The smoothing groups of one decoder layer, and the ones skipped with the reason (shown in the report).

    A group whose op is narrower or wider than its linears' input is skipped: v_proj -> o_proj under
    grouped-query attention, where one v channel feeds several o columns (AutoAWQ skips it too).
    """
    groups, skipped = [], {}
    for spec in arch.groups:
        prev = layer.module.get_submodule(spec.prev)
        linears = tuple(layer.module.get_submodule(n) for n in spec.linears)
        if all(_width(prev) == lin.in_features for lin in linears):
            groups.append(Group(prev, tuple(f"{layer.name}.{n}" for n in spec.linears), linears))
        else:
            skipped[f"{layer.name}.{spec.prev} -> {', '.join(spec.linears)}"] = (
                f"{spec.prev} has {_width(prev)} output channels, its readers {linears[0].in_features} inputs "
                "(grouped-query attention): no exact per-channel fold")
    return tuple(groups), skipped


def unclipped(layer: Layer, arch: Architecture) -> frozenset[str]:
    return frozenset(f"{layer.name}.{n}" for n in arch.unclipped)
