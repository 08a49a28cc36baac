"""GPTQ for weight-only quantization: pick codes column by column and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's output error (Frantar et al.,
2022). With H = X^T X of the layer's inputs X, the output error ||X dW^T||^2 = tr(dW H dW^T) is what is
minimised, so correlated input channels absorb each other's rounding.

Group scales and zero points are min-max over a group's columns as they stand when the sweep reaches the
group (already corrected for the errors of earlier columns), as in the reference implementation. GPTQ picks
the codes itself, so it hands them to the shared quantizer (`quant.methods.quantizer`, `Codes`) instead of a float
model to round. Linears that read the same input (q/k/v, gate/up) share H and are solved as one stacked
weight: rows are independent given H, so this is exact. Which linears read the same input is seen in the forward
(quant.calibrate.capture), so GPTQ needs no table of the architecture.

Layers run in order, each on the outputs of the layers before it with their weights already quantized.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from quant.calibrate.capture import input_sites
from quant.errors import CalqError
from quant.methods.quantizer import is_ignored, unreached
from quant.methods.schemes import Codes, WeightScheme, code_range, quantize_weight
from quant.methods.step import LayerCall, LayerChange, Method, TokenBudget


class GPTQConfig(TokenBudget):
    renamed = {"damp": "dampening_frac (llm-compressor's name)", "act_order": "actorder: static (or null)"}
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    """Added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned."""
    actorder: Literal["static"] | None = "static"
    """"static": quantize the columns with the largest input energy first, groups fixed up front (llm-compressor's
    static order); null: in column order. See gptq_weight."""


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
        scale, zero = (torch.empty(n, -(-k // group), device=w.device) for _ in range(2))
        perm = torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise CalqError(f"GPTQ: the input Hessian is not positive definite ({err}); "
                        "raise options.dampening_frac") from err
    lo, hi = code_range(scheme)
    column_group = (perm // group).tolist()
    q = torch.empty_like(w)
    block_size = 128 if act_order else group  # without act order one block per group, so its grid comes first
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block, err = w[:, start:end].clone(), torch.empty(n, end - start, device=w.device)
        if not act_order:
            _, s, z = quantize_weight(block, scheme.model_copy(update={"group_size": None, "strategy": "channel"}))
            scale[:, start // group], zero[:, start // group] = s[:, 0], z[:, 0]
        for i in range(end - start):
            g = column_group[start + i]
            codes = ((block[:, i] / scale[:, g]).round() + zero[:, g]).clamp(lo, hi)
            q[:, start + i] = codes
            err[:, i] = (block[:, i] - (codes - zero[:, g]) * scale[:, g]) / hinv[start + i, start + i]
            block[:, i:] -= err[:, i, None] * hinv[start + i, start + i:end][None, :]
        w[:, end:] -= err @ hinv[start:end, end:]
    codes = torch.empty_like(q)
    codes[:, perm] = q
    return Codes(codes, scale, zero)


@torch.no_grad()
def gptq_layer(call: LayerCall) -> LayerChange:
    """GPTQ codes of one decoder layer's linears (except those matching `ignore`) on its calibration inputs; their
    weights become the codes dequantized, in place, so the next layer is calibrated on quantized outputs."""
    cfg: GPTQConfig = call.options
    codes: dict[str, Codes] = {}
    sites = input_sites(call.layer, call.inputs.hidden, call.inputs.kwargs)
    for site in sites:
        chosen = [(name, lin) for name, lin in zip(site.names, site.linears) if not is_ignored(name, call.ignore)]
        if not chosen:
            continue
        stacked = gptq_weight(torch.cat([lin.weight for _, lin in chosen]), site.gram, call.weights,
                              cfg.dampening_frac, cfg.actorder == "static")
        rows = 0
        for name, lin in chosen:
            codes[name] = stacked.rows(rows, rows + lin.out_features)
            rows += lin.out_features
            lin.weight.copy_(codes[name].dequantize(call.weights.group_size).to(lin.weight.dtype))
    return LayerChange(codes=codes, skipped=unreached(call.layer, sites, call.ignore))


METHOD = Method("gptq", GPTQConfig, gptq_layer)
