"""AWQ (activation-aware weight quantization) for weight-only int4: scale search and clip search.

Weights that multiply large activations matter most, so per smoothing group (quant.methods.mappings) AWQ
scales those input columns up before quantizing (s = mean|x|^r, r searched on a grid) and folds 1/s
into the op before, then shrinks each weight group's range where that lowers the error. The result
is a float layer; the shared min-max quantizer (quant.methods.quantizer) quantizes it afterwards.

Both searches minimise the error of the group's linears' outputs on calibration tokens (q/k/v
outputs concatenated; AutoAWQ scores q/k/v on the attention block's output instead). The error of a
weight perturbation dW over tokens X is ||X dW^T||^2 = tr(dW H dW^T) with H = X^T X, so each layer
accumulates H once and every grid point costs one (N, K) x (K, K) product, however many tokens.
Layers are processed in order by the walk (quant.calibrate.walker); each one's inputs come from the previous,
already-transformed layer (scaled and clipped but, by default, not quantized).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from quant.calibrate.capture import input_sites
from quant.methods.mappings import check_model, layer_groups
from quant.methods.quantizer import is_ignored, unreached
from quant.methods.schemes import Codes, WeightScheme, fake_quantize, grouped, quantize_weight
from quant.methods.step import LayerCall, LayerChange, Method, TokenBudget
from quant.models import fold_scales


class AWQConfig(TokenBudget):
    renamed = {"grid": "n_grid (llm-compressor's name)"}
    n_grid: int = Field(20, ge=1)
    """Scale exponents r tried: 0, 1/n_grid, ..., (n_grid-1)/n_grid (r = 0 is no scaling)."""
    clip_grid: int = Field(20, ge=1)
    max_shrink: float = Field(0.5, gt=0, lt=1)
    """Range factors tried by the clip search: 1 - i * max_shrink / clip_grid for i < clip_grid."""
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
        dw = grouped(fake_quantize(w, scheme, f) - w, scheme.group_size)
        errors.append(torch.einsum("ngi,gij,ngj->ng", dw, blocks, dw))
    return factors[torch.stack(errors).argmin(0)]


def clip_weight(weight: Tensor, scheme: WeightScheme, clip: Tensor) -> Tensor:
    """Clamp each group to the range quantize_weight(weight, scheme, clip) rounds within: AWQ's float model, whose
    min-max range is the chosen one (its codes are handed over directly, see awq_layer)."""
    n, k = weight.shape
    g = grouped(weight.float(), scheme.group_size)
    if scheme.symmetric:
        hi = g.abs().amax(-1) * clip
        lo = -hi
    else:
        lo = g.amin(-1).clamp(max=0) * clip
        hi = g.amax(-1).clamp(min=0) * clip
    return g.clamp(lo[..., None], hi[..., None]).reshape(n, -1)[:, :k]


# ----------------------------------------------------------------------------------------------
# One decoder layer
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def awq_layer(call: LayerCall) -> LayerChange:
    """Search and fold AWQ scales and clip the weights of one decoder layer in place, on its calibration inputs, and
    hand the clipped linears' codes (quantize_weight at the chosen range) to the quantizer: re-rounding the clamped
    float weight could land a group's end one code off at a rounding tie. Linears matching `ignore` stay in full
    precision, so they are never clipped (folding scales into them keeps their function)."""
    cfg: AWQConfig = call.options
    groups, skipped, keep = layer_groups(call.layer, call.model_type, call.probe, "AWQ")
    sites = input_sites(call.layer, call.inputs.hidden, call.inputs.kwargs)
    site_of = {name: site for site in sites for name in site.names}
    for group in groups:
        site = site_of[group.names[0]]
        weight = torch.cat([lin.weight for lin in group.linears])
        s = best_scales(site.sum_abs / site.tokens, site.gram, weight, call.weights, cfg.n_grid)
        fold_scales(group.prev, group.readers, s)
        site.gram = site.gram / (s[:, None] * s[None, :])  # the linears now read X / s
    codes = {}
    if cfg.clip:
        for site in sites:
            for name, lin in zip(site.names, site.linears):
                if name not in keep and not is_ignored(name, call.ignore):
                    clip = best_clip(lin.weight, site.gram, call.weights, cfg.clip_grid, cfg.max_shrink)
                    codes[name] = Codes(*quantize_weight(lin.weight, call.weights, clip))
                    lin.weight.copy_(clip_weight(lin.weight, call.weights, clip))
    return LayerChange(codes=codes, skipped={**skipped, **unreached(call.layer, sites, call.ignore)})


METHOD = Method("awq", AWQConfig, awq_layer, check_model=lambda model: check_model(model, "AWQ"))
