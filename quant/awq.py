"""AWQ (activation-aware weight quantization) for weight-only int4: scale search and clip search.

Weights that multiply large activations matter most, so per smoothing group (quant.mappings) AWQ
scales those input columns up before quantizing (s = mean|x|^r, r searched on a grid) and folds 1/s
into the op before, then shrinks each weight group's range where that lowers the error. The result
is a float model; the shared min-max quantizer (quant.quantize) quantizes it afterwards.

Both searches minimise the error of the group's linears' outputs on calibration tokens (q/k/v
outputs concatenated; AutoAWQ scores q/k/v on the attention block's output instead). The error of a
weight perturbation dW over tokens X is ||X dW^T||^2 = tr(dW H dW^T) with H = X^T X, so each layer
accumulates H once and every grid point costs one (N, K) x (K, K) product, however many tokens.
Layers are processed in order; each one's inputs come from the previous, already-transformed layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant.cache import CalqError
from quant.mappings import Layer, decoder_layers, fold_scales
from quant.quantize import WeightScheme, _grouped, fake_quantize, is_ignored
from quant.schema import StrictModel


class AWQConfig(StrictModel):
    grid: int = Field(20, ge=1)
    """Scale exponents r tried: 0, 1/grid, ..., (grid-1)/grid (r = 0 is no scaling)."""
    clip_grid: int = Field(20, ge=1)
    max_shrink: float = Field(0.5, gt=0, lt=1)
    """Range factors tried by the clip search: 1 - i * max_shrink / clip_grid for i < clip_grid."""
    max_tokens: int = Field(8192, ge=1)
    """Calibration tokens run through the layers (whole samples, evenly spaced); run time grows with it."""
    clip: bool = True


# ----------------------------------------------------------------------------------------------
# Search math (pure functions)
# ----------------------------------------------------------------------------------------------

def output_error(dw: Tensor, gram: Tensor) -> Tensor:
    """Squared output error tr(dW H dW^T) of a weight error dW (N, K), given H = X^T X (K, K)."""
    return ((dw @ gram) * dw).sum()


def best_scales(x_mean_abs: Tensor, gram: Tensor, weight: Tensor, scheme: WeightScheme, grid: int) -> Tensor:
    """The input-channel scales (K,) of the grid point whose quantized weight Q(W s) / s errs least.

    `weight` stacks the group's linears (N, K). r = 0 gives s = 1 and wins ties, so scaling is only
    applied when it lowers the error.
    """
    w = weight.float()
    ratios = torch.arange(grid, dtype=torch.float32, device=w.device) / grid
    s = x_mean_abs.float()[None].pow(ratios[:, None]).clamp(min=1e-4)
    s = s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()
    errors = torch.stack([output_error(fake_quantize(w * si, scheme) / si - w, gram) for si in s])
    return s[errors.argmin()]


def _group_blocks(gram: Tensor, group_size: int) -> Tensor:
    """The (G, group, group) diagonal blocks of H, zero-padded for a ragged last group."""
    pad = -gram.shape[0] % group_size
    g = F.pad(gram, (0, pad, 0, pad))
    n = g.shape[0] // group_size
    return g.reshape(n, group_size, n, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def best_clip(weight: Tensor, gram: Tensor, scheme: WeightScheme, clip_grid: int, max_shrink: float) -> Tensor:
    """Per (row, group) range factor (N, G) minimising that group's share of the output error.

    Cross-group terms of H are ignored (as AutoAWQ), so every group is chosen independently.
    """
    w = weight.float()
    group_size = scheme.group_size or w.shape[1]
    blocks = _group_blocks(gram, group_size)
    factors = 1 - torch.arange(clip_grid, dtype=torch.float32, device=w.device) * max_shrink / clip_grid
    errors = []
    for f in factors:
        # the ragged group's padding columns meet the zero padding of `blocks`, so they add nothing
        dw = _grouped(fake_quantize(w, scheme, f) - w, scheme.group_size)
        errors.append(torch.einsum("ngi,gij,ngj->ng", dw, blocks, dw))
    return factors[torch.stack(errors).argmin(0)]


def clip_weight(weight: Tensor, scheme: WeightScheme, clip: Tensor) -> Tensor:
    """Clamp each group to the range quantize_weight(weight, scheme, clip) spans, so the min-max
    quantizer run later on the clamped weight finds exactly the chosen range."""
    n, k = weight.shape
    g = _grouped(weight.float(), scheme.group_size)
    if scheme.symmetric:
        hi = g.abs().amax(-1) * clip
        lo = -hi
    else:
        lo = g.amin(-1).clamp(max=0) * clip
        hi = g.amax(-1).clamp(min=0) * clip
    return g.clamp(lo[..., None], hi[..., None]).reshape(n, -1)[:, :k]


# ----------------------------------------------------------------------------------------------
# Running the layers
# ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised once the last decoder layer's inputs are recorded: the rest of the forward is not needed."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through."""

    def __init__(self, calls: list, last: bool) -> None:
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden_states: Tensor, **kwargs):
        self.calls.append((hidden_states, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def layer_inputs(model: nn.Module, layers: list[Layer], samples: list[Tensor]) -> tuple[list[Tensor], list[list[dict]]]:
    """Layer 0's hidden states per sample, and per layer and sample the keyword arguments the model
    passes (masks and rotary embeddings differ by layer type in Gemma3), without running any layer."""
    calls: list[list] = [[] for _ in layers]
    device = next(model.parameters()).device
    for layer, c in zip(layers, calls):
        model.set_submodule(layer.name, _Recorder(c, last=c is calls[-1]))
    try:
        for ids in samples:
            try:
                model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in layers:
            model.set_submodule(layer.name, layer.module)
    return [h for h, _ in calls[0]], [[kw for _, kw in c] for c in calls]


@dataclass
class _Site:
    """Linears that read one tensor, and running statistics of that tensor."""

    names: tuple[str, ...]
    linears: tuple[nn.Linear, ...]
    sum_abs: Tensor | float = 0.0
    gram: Tensor | float = 0.0
    tokens: int = 0

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_abs = self.sum_abs + x.abs().sum(0)
        self.gram = self.gram + x.T @ x
        self.tokens += x.shape[0]


def _sites(layer: Layer) -> dict[tuple[str, ...], _Site]:
    """One site per smoothing group, plus one per linear outside every group (o_proj under GQA)."""
    sites = {g.names: _Site(g.names, g.linears) for g in layer.groups}
    grouped = {name for names in sites for name in names}
    for rel, mod in layer.module.named_modules():
        name = f"{layer.name}.{rel}"
        if isinstance(mod, nn.Linear) and name not in grouped:
            sites[(name,)] = _Site((name,), (mod,))
    return sites


def _capture(layer: Layer, sites: dict[tuple[str, ...], _Site], hidden: list[Tensor], kwargs: list[dict]) -> None:
    handles = [site.linears[0].register_forward_pre_hook(lambda _m, args, site=site: site.update(args[0]))
               for site in sites.values()]
    try:
        for h, kw in zip(hidden, kwargs):
            layer.module(h, **kw)
    finally:
        for handle in handles:
            handle.remove()


def calibration_subset(samples: list[Tensor], max_tokens: int) -> list[Tensor]:
    """Evenly spaced samples totalling about `max_tokens` tokens (at least one sample)."""
    mean_len = sum(len(s) for s in samples) / len(samples)
    k = min(len(samples), max(1, round(max_tokens / mean_len)))
    return [samples[i] for i in torch.linspace(0, len(samples) - 1, k).round().long().tolist()]


@torch.no_grad()
def awq_layer(layer: Layer, hidden: list[Tensor], kwargs: list[dict], scheme: WeightScheme, cfg: AWQConfig,
              ignore: tuple[str, ...] = ()) -> None:
    """Search and fold AWQ scales and clip the weights of one decoder layer in place, on its inputs
    `hidden` (one per sample, called with the matching `kwargs`). Linears matching `ignore` stay in full
    precision, so they are never clipped (folding scales into them keeps their function)."""
    sites = _sites(layer)
    _capture(layer, sites, hidden, kwargs)
    for group in layer.groups:
        site = sites[group.names]
        weight = torch.cat([lin.weight for lin in group.linears])
        s = best_scales(site.sum_abs / site.tokens, site.gram, weight, scheme, cfg.grid)
        fold_scales(group.prev, group.linears, s)
        site.gram = site.gram / (s[:, None] * s[None, :])  # the linears now read X / s
    if cfg.clip:
        for site in sites.values():
            for name, lin in zip(site.names, site.linears):
                if name not in layer.unclipped and not is_ignored(name, ignore):
                    clip = best_clip(lin.weight, site.gram, scheme, cfg.clip_grid, cfg.max_shrink)
                    lin.weight.copy_(clip_weight(lin.weight, scheme, clip))


@torch.no_grad()
def transform_layers(model: nn.Module, samples: list[Tensor], max_tokens: int, method: str,
                     step: Callable[[Layer, list[Tensor], list[dict]], None]) -> nn.Module:
    """A deep copy of `model` on which `step(layer, hidden, kwargs)` changed every decoder layer in place, in
    order, each on the outputs of the layers before it as already changed (AWQ and GPTQ walk layers this way)."""
    if not samples:
        raise CalqError(f"{method} needs calibration samples; select samples first")
    model = copy.deepcopy(model)
    layers = decoder_layers(model)
    hidden, kwargs = layer_inputs(model, layers, calibration_subset(samples, max_tokens))
    for layer, layer_kwargs in zip(tqdm(layers, desc=method.lower(), unit="layer"), kwargs):
        step(layer, hidden, layer_kwargs)
        hidden = [layer.module(h, **kw) for h, kw in zip(hidden, layer_kwargs)]
    return model


def awq(model: nn.Module, samples: list[Tensor], scheme: WeightScheme, cfg: AWQConfig,
        ignore: tuple[str, ...] = ()) -> nn.Module:
    """Return a deep copy of `model` with AWQ scales folded in and weights clipped (still float).

    Each layer is calibrated on the float outputs of the layers before it, already transformed
    (scaled and clipped) but not quantized; quant.sequential does the same by default.
    """
    return transform_layers(model, samples, cfg.max_tokens, "AWQ",
                            lambda layer, hidden, kwargs: awq_layer(layer, hidden, kwargs, scheme, cfg, ignore))
