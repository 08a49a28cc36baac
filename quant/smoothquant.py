"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

int8 activations lose their small channels when a few channels are much larger; weights are easy to
quantize. Per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) is folded into the norm
before the linears (quant.mappings.fold_scales), so the linears see X / s and weights W * s and the
model's function is unchanged. The paper smooths only at norms; the groups fed by a linear
(up_proj -> down_proj, and v_proj -> o_proj without GQA) are smoothed too by default, because
down_proj's input carries the largest outliers and static per-tensor scales suffer most from them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from pydantic import Field
from torch import Tensor, nn

from quant.mappings import Layer, decoder_layers, fold_scales
from quant.schema import StrictModel
from quant.stats import ActivationStats, LayerStats


class SmoothQuantConfig(StrictModel):
    alpha: float = Field(0.5, ge=0, le=1)
    """Migration strength: 0 leaves activations alone, 1 moves all their range into the weights."""
    linear_groups: bool = True
    """Also smooth the groups fed by a linear; False smooths at norms only, as the paper."""


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """The paper's per-channel scales; both maxima are floored at 1e-5 so dead channels stay finite."""
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


def _divided(stats: LayerStats, s: Tensor) -> LayerStats:
    s = s.double()
    return replace(stats, absmax=stats.absmax / s, min=stats.min / s, max=stats.max / s, sum_abs=stats.sum_abs / s)


@torch.no_grad()
def smooth_layer(layer: Layer, stats: dict[str, LayerStats], cfg: SmoothQuantConfig) -> dict[str, LayerStats]:
    """Fold smoothing scales into one decoder layer in place; return the statistics of its smoothed
    linears' inputs (X / s). `stats` are those of the layer's linears before smoothing."""
    smoothed = {}
    for group in layer.groups:
        if isinstance(group.prev, nn.Linear) and not cfg.linear_groups:
            continue
        s = smoothing_scales(stats[group.names[0]].absmax, [lin.weight for lin in group.linears], cfg.alpha)
        fold_scales(group.prev, group.linears, s)
        smoothed.update({name: _divided(stats[name], s) for name in group.names})
    return smoothed


def smooth(model: nn.Module, stats: ActivationStats, cfg: SmoothQuantConfig) -> tuple[nn.Module, ActivationStats]:
    """Return a smoothed deep copy of `model` and the statistics of its smoothed linear inputs.

    `stats` were gathered on `model`; the smoothed linears see X / s, so their statistics are divided
    by s. Pass the returned stats to quantize() so static activation scales match the smoothed model.
    """
    smoothed = copy.deepcopy(model)
    layers = dict(stats.layers)
    for layer in decoder_layers(smoothed):
        layers.update(smooth_layer(layer, stats.layers, cfg))
    return smoothed, ActivationStats(layers=layers, meta=dict(stats.meta, smoothquant=cfg.model_dump()))
