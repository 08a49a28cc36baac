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

import torch
from pydantic import Field
from torch import Tensor, nn

from quant.awq import _capture, _sites, transform_layers
from quant.cache import CalqError
from quant.mappings import Layer
from quant.quantize import Codes, WeightScheme, code_range, is_ignored, quantize_weight
from quant.schema import StrictModel


class GPTQConfig(StrictModel):
    damp: float = Field(0.01, gt=0, lt=1)
    """Added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned."""
    max_tokens: int = Field(8192, ge=1)
    """Calibration tokens run through the layers (whole samples, evenly spaced)."""
    act_order: bool = True
    """Quantize the columns with the largest input energy first (static groups); see gptq_weight."""


def gptq_weight(weight: Tensor, gram: Tensor, scheme: WeightScheme, damp: float = 0.01,
                act_order: bool = False) -> Codes:
    """Quantize `weight` (N, K) with GPTQ given H = X^T X (K, K); returns its codes, scales and zero points.

    act_order: sweep the columns in order of decreasing H diagonal (the loudest inputs first, while most columns
    are left to absorb their error), with every group's grid fixed up front by min-max on the original weight
    (llm-compressor's "static" order); groups stay contiguous, so the checkpoint format is unchanged."""
    w = weight.float().clone()
    n, k = w.shape
    h = gram.float().clone()
    dead = h.diagonal() == 0  # input channels that never fire: any code is as good, keep H invertible
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    group = scheme.group_size or k
    if act_order:
        _, scale, zero = quantize_weight(w, scheme)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:  # grids are set as the sweep reaches each group, from its columns as they stand then
        scale, zero = torch.empty(n, -(-k // group)), torch.empty(n, -(-k // group))
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise CalqError(f"GPTQ: the input Hessian is not positive definite ({err}); raise gptq.damp") from err
    lo, hi = code_range(scheme)
    column_group = (perm // group).tolist()
    q = torch.empty_like(w)
    block_size = 128 if act_order else group  # without act order one block per group, so its grid comes first
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block, err = w[:, start:end].clone(), torch.empty(n, end - start)
        if not act_order:
            _, s, z = quantize_weight(block, scheme.model_copy(update={"group_size": None}))
            scale[:, start // group], zero[:, start // group] = s[:, 0], z[:, 0]
        for i in range(end - start):
            g = column_group[start + i]
            codes = (block[:, i] / scale[:, g] + zero[:, g]).round().clamp(lo, hi)
            q[:, start + i] = codes
            err[:, i] = (block[:, i] - (codes - zero[:, g]) * scale[:, g]) / hinv[start + i, start + i]
            block[:, i:] -= err[:, i, None] * hinv[start + i, start + i:end][None, :]
        w[:, end:] -= err @ hinv[start:end, end:]
    codes = torch.empty_like(q)
    codes[:, perm] = q
    return Codes(codes, scale, zero)


@torch.no_grad()
def gptq_layer(layer: Layer, hidden: list[Tensor], kwargs: list[dict], scheme: WeightScheme, cfg: GPTQConfig,
               ignore: tuple[str, ...] = ()) -> dict[str, Codes]:
    """GPTQ codes of one decoder layer's linears (except those matching `ignore`) on its inputs `hidden` (one per
    sample, called with the matching `kwargs`); their weights become the codes dequantized, in place."""
    sites = _sites(layer)
    _capture(layer, sites, hidden, kwargs)
    codes: dict[str, Codes] = {}
    for site in sites.values():
        chosen = [(name, lin) for name, lin in zip(site.names, site.linears) if not is_ignored(name, ignore)]
        if not chosen:
            continue
        stacked = gptq_weight(torch.cat([lin.weight for _, lin in chosen]), site.gram, scheme, cfg.damp,
                              cfg.act_order)
        rows = 0
        for name, lin in chosen:
            codes[name] = stacked.rows(rows, rows + lin.out_features)
            rows += lin.out_features
            lin.weight.copy_(codes[name].dequantize(scheme.group_size).to(lin.weight.dtype))
    return codes


def gptq(model: nn.Module, samples: list[Tensor], scheme: WeightScheme, cfg: GPTQConfig,
         ignore: tuple[str, ...] = ()) -> tuple[nn.Module, dict[str, Codes]]:
    """GPTQ codes of every decoder-layer linear not matched by `ignore`, and a copy of `model` whose weights are
    those codes dequantized (what the quantized model computes; the input model is not modified). Linears
    outside the decoder layers are left to the shared min-max quantizer."""
    codes: dict[str, Codes] = {}
    quantized = transform_layers(model, samples, cfg.max_tokens, "GPTQ", lambda layer, hidden, kwargs: codes.update(
        gptq_layer(layer, hidden, kwargs, scheme, cfg, ignore)))
    return quantized, codes
