"""Where things are in a causal LM: its decoder layers, its final norm, and the exact fold of a per-channel
scale into a norm or a linear. Every stage that walks or edits a model finds its parts here.
"""

from __future__ import annotations

from dataclasses import dataclass

import copy

import torch
from torch import Tensor, nn

from quant.errors import CalqError

_OFFSETS: dict[type, float] = {}
"""norm_offset's answers per norm class (a class's behaviour does not change)."""


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
    logit lens reads every layer): the decoder's one direct child with a 1-D weight (model.norm, transformer.ln_f,
    decoder.final_layer_norm, ...). `needed_by` and `fix` complete the error when the model has none."""
    decoder = model.get_decoder()
    norms = [m for _, m in decoder.named_children()
             if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 1]
    if len(norms) != 1:
        raise CalqError(f"{type(model).__name__} has {len(norms)} modules with a 1-D weight directly under its "
                        f"decoder, not one final norm, which {needed_by} needs; {fix}")
    return norms[0]


@dataclass(frozen=True)
class LogitMap:
    """What a model does to its output head's product: logits = cap(scale * head(h)), cap(z) = tanh(z / c) * c."""

    scale: float = 1.0
    cap: float | None = None
    source: str = "none"
    """Where it comes from (shown in the report): the config keys."""

    def __call__(self, z: Tensor) -> Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return z


def logit_map(model: nn.Module) -> LogitMap:
    """The scaling after lm_head the model's forward applies: Cohere's logit_scale (times), Granite's logits_scaling
    (divided by), Gemma 2/3's final_logit_softcapping. The logit lens checks it against the model's own logits."""
    cfg, scale, parts = model.config, 1.0, []
    multiplier = getattr(model, "logit_scale", None)
    if isinstance(multiplier, (int, float)) and multiplier != 1:
        scale, parts = scale * multiplier, [*parts, f"logit_scale {multiplier:g}"]
    divisor = getattr(cfg, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        scale, parts = scale / divisor, [*parts, f"logits_scaling {divisor:g}"]
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        parts.append(f"final_logit_softcapping {cap:g}")
    return LogitMap(scale, cap, ", ".join(parts) or "none")


class Readout:
    """Any layer's residual stream read out as the model's own prediction: its final norm, output head and the
    scaling after it (the logit lens). transformers returns the last hidden state already through the final norm."""

    def __init__(self, model: nn.Module, needed_by: str, fix: str) -> None:
        self.norm, self.head = final_norm(model, needed_by, fix), model.get_output_embeddings()
        self.after = logit_map(model)

    def __call__(self, h: Tensor, last: bool) -> Tensor:
        """float32 logits of hidden states `h` (..., hidden); `last`: `h` is the model's last hidden state."""
        return self.after(self.head(h if last else self.norm(h)).float())


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """The offset in y = x_hat * (offset + weight) (+ bias): 0 for most norms, 1 for Gemma's. Read off the norm's
    behaviour on a probe (weight 0, then 1), so no table of norm classes; a norm whose output is not a per-channel
    multiple of its weight is refused (no fold into it is exact)."""
    kind = type(norm)
    if kind not in _OFFSETS:
        probe = copy.deepcopy(norm)
        probe = (probe.to_empty(device="cpu") if norm.weight.is_meta else probe.cpu()).float()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        x = torch.randn(4, norm.weight.numel(), generator=torch.Generator(device="cpu").manual_seed(0),
                        device="cpu")
        probe.weight.zero_()
        y0 = probe(x).float()
        probe.weight.fill_(1.0)
        y1 = probe(x).float()
        unit = y1 - y0
        offset = float((y0 * unit).sum() / (unit * unit).sum().clamp(min=1e-12))
        if (y0 - offset * unit).abs().max() > 1e-4 * unit.abs().max() or unit.abs().max() == 0:
            raise CalqError(f"cannot fold scales into a {kind.__name__}: its output is not a per-channel multiple "
                            "of its weight; use method: minmax or gptq for this model")
        _OFFSETS[kind] = round(offset, 4)
    return _OFFSETS[kind]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear] | tuple[nn.Linear, ...], s: Tensor) -> None:
    """Divide prev's output channels by s and multiply the linears' input columns by s, in place.

    prev is a norm (its weight, and bias if any) or a linear (its rows and bias); the model computes the same
    function.
    """
    s = s.float()
    if isinstance(prev, nn.Linear):
        prev.weight.copy_(prev.weight.float() / s[:, None])
        if prev.bias is not None:
            prev.bias.copy_(prev.bias.float() / s)
    else:
        offset = norm_offset(prev)
        prev.weight.copy_((prev.weight.float() + offset) / s - offset)
        if getattr(prev, "bias", None) is not None:  # LayerNorm: y = x_hat * w + b
            prev.bias.copy_(prev.bias.float() / s)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s)
