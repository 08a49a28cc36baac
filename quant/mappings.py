"""Where scales can be folded in each supported architecture, and the exact folding transform.

A smoothing group is an op and the linears that read its output. Dividing the op's output channels
by s and multiplying the linears' input columns by s leaves the model's function unchanged while
moving magnitude between activations and weights, which is what SmoothQuant and AWQ exploit.
Architectures differ only in module names and norm flavour, so they are tables here and the methods
stay architecture-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from quant.cache import CalqError


@dataclass(frozen=True)
class GroupSpec:
    prev: str
    """The op whose output the linears read, relative to the decoder layer."""
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    layers: str
    """Path of the decoder layers' ModuleList."""
    groups: tuple[GroupSpec, ...]
    unclipped: tuple[str, ...]
    """Linears AWQ's clip search leaves alone: clipping q/k distorts attention scores (as AutoAWQ)."""


_LLAMA = Architecture(
    layers="model.layers",
    groups=(
        GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        GroupSpec("self_attn.v_proj", ("self_attn.o_proj",)),
        GroupSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        GroupSpec("mlp.up_proj", ("mlp.down_proj",)),
    ),
    unclipped=("self_attn.q_proj", "self_attn.k_proj"),
)
# Gemma3 normalizes the attention output after o_proj; the MLP reads pre_feedforward_layernorm.
_GEMMA3 = replace(_LLAMA, groups=(
    GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    GroupSpec("self_attn.v_proj", ("self_attn.o_proj",)),
    GroupSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    GroupSpec("mlp.up_proj", ("mlp.down_proj",)),
))

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _GEMMA3,
    "gemma3": replace(_GEMMA3, layers="model.language_model.layers"),
}

NORM_OFFSETS: dict[str, float] = {
    "LlamaRMSNorm": 0.0,
    "MistralRMSNorm": 0.0,
    "Qwen2RMSNorm": 0.0,
    "Qwen3RMSNorm": 0.0,
    "Gemma3RMSNorm": 1.0,
}
"""Per norm class, the offset in y = x_hat * (offset + weight): Gemma scales by (1 + weight)."""


@dataclass(frozen=True)
class Group:
    prev: nn.Module
    names: tuple[str, ...]
    """Full module names of the linears (the keys of ActivationStats)."""
    linears: tuple[nn.Linear, ...]


@dataclass(frozen=True)
class Layer:
    name: str
    module: nn.Module
    groups: tuple[Group, ...]
    unclipped: frozenset[str]


def architecture(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CalqError(f"smoothing methods do not know architecture {model_type!r}; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))} (use method: minmax for this model)")
    return ARCHITECTURES[model_type]


def _width(prev: nn.Module) -> int:
    return prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()


def decoder_layers(model: nn.Module) -> list[Layer]:
    """The decoder layers in order, each with the smoothing groups that apply to it.

    A group whose op is narrower or wider than its linears' input is skipped: v_proj -> o_proj under
    grouped-query attention, where one v channel feeds several o columns (AutoAWQ skips it too).
    """
    arch = architecture(model)
    layers = []
    for i, module in enumerate(model.get_submodule(arch.layers)):
        prefix = f"{arch.layers}.{i}"
        groups = []
        for spec in arch.groups:
            prev = module.get_submodule(spec.prev)
            linears = tuple(module.get_submodule(n) for n in spec.linears)
            if all(_width(prev) == lin.in_features for lin in linears):
                groups.append(Group(prev, tuple(f"{prefix}.{n}" for n in spec.linears), linears))
        layers.append(Layer(prefix, module, tuple(groups), frozenset(f"{prefix}.{n}" for n in arch.unclipped)))
    return layers


def _norm_offset(norm: nn.Module) -> float:
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
        offset = _norm_offset(prev)
        prev.weight.copy_((prev.weight.float() + offset) / s - offset)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s)
