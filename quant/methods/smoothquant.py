"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

int8 activations lose their small channels when a few channels are much larger; weights are easy to
quantize. Per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) is folded into the norm
before the linears (quant.models.fold_scales), so the linears see X / s and weights W * s and the
model's function is unchanged. The paper smooths only at norms; the groups fed by a linear
(up_proj -> down_proj, and v_proj -> o_proj without GQA) are smoothed too by default, because
down_proj's input carries the largest outliers and static per-tensor scales suffer most from them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field
from torch import Tensor, nn

from quant.calibrate.stats import LayerStats
from quant.methods.mappings import check_model, layer_groups
from quant.methods.step import LayerCall, LayerChange, Method
from quant.models import fold_scales
from quant.schema import StrictModel


class SmoothQuantConfig(StrictModel):
    renamed = {"alpha": "smoothing_strength (llm-compressor's name)"}
    smoothing_strength: float = Field(0.5, ge=0, le=1)
    """Migration strength alpha: 0 leaves activations alone, 1 moves all their range into the weights."""
    linear_groups: bool = True
    """Also smooth the groups fed by a linear; False smooths at norms only, as the paper."""


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """The paper's per-channel scales; both maxima are floored at 1e-5 so dead channels stay finite."""
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    act = act_absmax.to(w_absmax.device).float().clamp(min=1e-5)  # statistics may be cached on CPU
    return (act.pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


def _divided(stats: LayerStats, s: Tensor) -> LayerStats:
    s = s.to(stats.absmax.device).double()
    return replace(stats, absmax=stats.absmax / s, min=stats.min / s, max=stats.max / s, sum_abs=stats.sum_abs / s)


@torch.no_grad()
def smooth_layer(call: LayerCall) -> LayerChange:
    """Fold smoothing scales into one decoder layer in place; report the statistics of its smoothed linears'
    inputs (X / s), so static activation scales match the smoothed model."""
    cfg: SmoothQuantConfig = call.options
    smoothed = {}
    groups, skipped, _ = layer_groups(call.layer, call.model_type, call.probe, "SmoothQuant")
    for group in groups:
        if isinstance(group.prev, nn.Linear) and not cfg.linear_groups:
            continue
        s = smoothing_scales(call.stats[group.names[0]].absmax, [lin.weight for lin in group.linears],
                             cfg.smoothing_strength)
        fold_scales(group.prev, group.readers, s)
        smoothed.update({name: _divided(call.stats[name], s) for name in group.names})
    return LayerChange(stats=smoothed, skipped=skipped)


METHOD = Method("smoothquant", SmoothQuantConfig, smooth_layer, needs_stats=True, needs_activations=True,
                integer_only=False,
                check_model=lambda model: check_model(model, "SmoothQuant"))
