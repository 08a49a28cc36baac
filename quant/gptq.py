"""GPTQ for weight-only quantization: pick codes column by column and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's output error (Frantar et al.,
2022). With H = X^T X of the layer's inputs X, the output error ||X dW^T||^2 = tr(dW H dW^T) is what is
minimised, so correlated input channels absorb each other's rounding.

Group scales and zero points are min-max over a group's columns as they stand when the sweep reaches the
group (already corrected for the errors of earlier columns), as in the reference implementation. GPTQ picks
the codes itself, so it hands them to the shared quantizer (`quant.quantize`, `Codes`) instead of a float
model to round. Linears that read the same input (q/k/v, gate/up) share H and are solved as one stacked
weight: rows are independent given H, so this is exact.

Layers run in order, each on the outputs of the layers before it with their weights already quantized.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant.awq import _capture, _sites, calibration_subset, layer_inputs
from quant.cache import CalqError
from quant.mappings import decoder_layers
from quant.quantize import Codes, WeightScheme, code_range, is_ignored, quantize_weight
from quant.schema import StrictModel


class GPTQConfig(StrictModel):
    damp: float = Field(0.01, gt=0, lt=1)
    """Added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned."""
    max_tokens: int = Field(8192, ge=1)
    """Calibration tokens run through the layers (whole samples, evenly spaced)."""


def gptq_weight(weight: Tensor, gram: Tensor, scheme: WeightScheme, damp: float = 0.01) -> Codes:
    """Quantize `weight` (N, K) with GPTQ given H = X^T X (K, K); returns its codes, scales and zero points."""
    w = weight.float().clone()
    n, k = w.shape
    h = gram.float().clone()
    dead = h.diagonal() == 0  # input channels that never fire: any code is as good, keep H invertible
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise CalqError(f"GPTQ: the input Hessian is not positive definite ({err}); raise gptq.damp") from err
    group = scheme.group_size or k
    lo, hi = code_range(scheme)
    q = torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, k, group):  # one block per group: its grid is set from its current columns
        end = min(start + group, k)
        block, err = w[:, start:end].clone(), torch.empty(n, end - start)
        _, scale, zero = quantize_weight(block, scheme.model_copy(update={"group_size": None}))
        scales.append(scale[:, 0])
        zeros.append(zero[:, 0])
        for i in range(end - start):
            codes = (block[:, i] / scale[:, 0] + zero[:, 0]).round().clamp(lo, hi)
            q[:, start + i] = codes
            err[:, i] = (block[:, i] - (codes - zero[:, 0]) * scale[:, 0]) / hinv[start + i, start + i]
            block[:, i:] -= err[:, i, None] * hinv[start + i, start + i:end][None, :]
        w[:, end:] -= err @ hinv[start:end, end:]
    return Codes(q, torch.stack(scales, 1), torch.stack(zeros, 1))


@torch.no_grad()
def gptq(model: nn.Module, samples: list[Tensor], scheme: WeightScheme, cfg: GPTQConfig,
         ignore: tuple[str, ...] = ()) -> tuple[nn.Module, dict[str, Codes]]:
    """GPTQ codes of every decoder-layer linear not matched by `ignore`, and a copy of `model` whose weights are
    those codes dequantized (what the quantized model computes; the input model is not modified). Linears
    outside the decoder layers are left to the shared min-max quantizer."""
    if not samples:
        raise CalqError("GPTQ needs calibration samples; select samples first")
    model = copy.deepcopy(model)
    layers = decoder_layers(model)
    hidden, kwargs = layer_inputs(model, layers, calibration_subset(samples, cfg.max_tokens))
    codes: dict[str, Codes] = {}
    for layer, layer_kwargs in zip(tqdm(layers, desc="gptq", unit="layer"), kwargs):
        sites = _sites(layer)
        _capture(layer, sites, hidden, layer_kwargs)
        for site in sites.values():
            chosen = [(name, lin) for name, lin in zip(site.names, site.linears) if not is_ignored(name, ignore)]
            if not chosen:
                continue
            stacked = gptq_weight(torch.cat([lin.weight for _, lin in chosen]), site.gram, scheme, cfg.damp)
            rows = 0
            for name, lin in chosen:
                part = stacked.rows(rows, rows + lin.out_features)
                rows += lin.out_features
                codes[name] = part
                lin.weight.copy_(part.dequantize(scheme.group_size).to(lin.weight.dtype))
        hidden = [layer.module(h, **kw) for h, kw in zip(hidden, layer_kwargs)]
    return model, codes
