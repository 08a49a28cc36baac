"""Round-to-nearest (min-max) quantization: schemes, pure quantization math, and the quantized linear.

Smoothing methods (SmoothQuant, AWQ; quant.methods) are transforms applied to the float model before
this step, so every method shares this one quantizer. The quantized linear calls `kernels`, which runs Triton on
CUDA and the pure-torch reference on CPU.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

import kernels
from quant.schema import StrictModel
from quant.stats import ActivationStats

if TYPE_CHECKING:
    from quant.methods import QuantSpec


class WeightScheme(StrictModel):
    bits: Literal[4, 8] = 4
    group_size: int | None = 128
    """Columns per scale; None = one scale per output channel. A ragged last group is allowed."""
    symmetric: bool = False

    @model_validator(mode="after")
    def _check(self) -> WeightScheme:
        if self.bits == 8 and (self.group_size is not None or not self.symmetric):
            raise ValueError("8-bit weights are per-channel symmetric: set group_size: null and symmetric: true")
        if self.group_size is not None and self.group_size < 8:
            raise ValueError(f"group_size {self.group_size} is too small: use 32, 64 or 128 (or null)")
        return self


class ActScheme(StrictModel):
    """int8 activations: `dynamic` = one scale per token at run time; `static` = one calibrated scale."""

    mode: Literal["dynamic", "static"] = "dynamic"


# ----------------------------------------------------------------------------------------------
# Quantization math (pure functions)
# ----------------------------------------------------------------------------------------------

def _grouped(w: Tensor, group_size: int | None) -> Tensor:
    """(N, K) -> (N, G, group); a ragged last group is padded by repeating its last column,
    which leaves that group's min and max unchanged."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    pad = -k % gs
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, gs)


def code_range(scheme: WeightScheme) -> tuple[int, int]:
    """Smallest and largest code: [0, 2^bits - 1] for int4, [-127, 127] for int8."""
    return (-127, 127) if scheme.bits == 8 else (0, 2**scheme.bits - 1)


def quantize_weight(w: Tensor, scheme: WeightScheme, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max codes (N, K) and per-group scales and zero points (N, G), codes in [0, 2^bits - 1]
    (int4) or [-127, 127] (int8), all as float.

    `clip` (scalar or (N, G)) shrinks the range, which AWQ's clipping search uses.
    """
    n, k = w.shape
    g = _grouped(w.float(), scheme.group_size)
    qmax = 2**scheme.bits - 1
    lo_code, hi_code = code_range(scheme)
    if scheme.symmetric:
        absmax = g.abs().amax(-1) * clip
        scale = absmax.clamp(min=1e-8) / ((qmax + 1) / 2 if scheme.bits == 4 else 127)
        zero = torch.full_like(scale, (qmax + 1) // 2 if scheme.bits == 4 else 0)
    else:
        lo = g.amin(-1).clamp(max=0) * clip
        hi = g.amax(-1).clamp(min=0) * clip
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, qmax)
    q = (g / scale[..., None] + zero[..., None]).round_().clamp_(lo_code, hi_code)
    return q.reshape(n, -1)[:, :k], scale, zero


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    n, k = q.shape
    g = _grouped(q.float(), group_size)
    return ((g - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k]


@dataclass(frozen=True)
class Codes:
    """A weight a method quantized itself (GPTQ): codes (N, K) and per-group scales and zero points (N, G), as
    quantize_weight returns them. The quantizer stores these instead of rounding the float weight."""

    q: Tensor
    scale: Tensor
    zero: Tensor

    def rows(self, start: int, end: int) -> Codes:
        return Codes(self.q[start:end], self.scale[start:end], self.zero[start:end])

    def dequantize(self, group_size: int | None) -> Tensor:
        return dequantize_codes(self.q, self.scale, self.zero, group_size)


def fake_quantize(w: Tensor, scheme: WeightScheme, clip: Tensor | float = 1.0) -> Tensor:
    """quantize -> dequantize, in w's dtype: the weight the quantized model effectively uses."""
    q, scale, zero = quantize_weight(w, scheme, clip)
    return dequantize_codes(q, scale, zero, scheme.group_size).to(w.dtype)


# ----------------------------------------------------------------------------------------------
# The quantized linear module
# ----------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A linear layer with int4 (packed, group-wise) or int8 (per-channel) weights.

    int8 weights run W8A8 when `act_mode` is set (dynamic per-token or static per-tensor int8
    activations), else W8A16. Buffers are what checkpoints store; forward calls the kernels.
    """

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme,
                 act_mode: Literal["dynamic", "static"] | None, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.act_mode = scheme, act_mode
        groups = 1 if scheme.group_size is None else -(-in_features // scheme.group_size)
        if scheme.bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // 8), dtype=torch.int32))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32) if act_mode == "static" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: WeightScheme,
                    act_mode: Literal["dynamic", "static"] | None = None,
                    act_absmax: Tensor | None = None, codes: Codes | None = None) -> QuantLinear:
        """Round the linear's weight (min-max), or store `codes` a method chose for it."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, scheme, act_mode, linear.bias is not None, w.dtype)
        if codes is not None and codes.q.shape != w.shape:
            raise ValueError(f"codes of shape {tuple(codes.q.shape)} for a weight of shape {tuple(w.shape)}")
        q, scale, zero = (codes.q, codes.scale, codes.zero) if codes is not None else quantize_weight(w, scheme)
        if scheme.bits == 4:
            mod.qweight.copy_(kernels.pack_int4(q.to(torch.uint8)))
            mod.scales.copy_(scale.to(w.dtype))
            mod.zeros.copy_(zero.to(torch.uint8))
        else:
            mod.qweight.copy_(q.to(torch.int8))
            mod.scales.copy_(scale[:, 0])
        if act_mode == "static":
            if act_absmax is None:
                raise ValueError("static activation quantization needs activation statistics for this layer")
            mod.act_scale.fill_(float(act_absmax.max().clamp(min=1e-8)) / 127)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def dequantized_weight(self) -> Tensor:
        if self.scheme.bits == 4:
            q = kernels.unpack_int4(self.qweight, self.in_features)
            return dequantize_codes(q, self.scales.float(), self.zeros.float(), self.scheme.group_size)
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme.bits == 4:
            return kernels.int4_linear(x, self.qweight, self.scales, self.zeros, self.scheme.group_size
                                       or self.in_features, self.bias)
        return kernels.int8_linear(x, self.qweight, self.scales, self.bias, act=self.act_mode or "none",
                                   act_scale=self.act_scale)

    def extra_repr(self) -> str:
        act = f"A8-{self.act_mode}" if self.act_mode else "A16"
        return (f"{self.in_features}, {self.out_features}, W{self.scheme.bits} "
                f"g{self.scheme.group_size or 'channel'} {'sym' if self.scheme.symmetric else 'asym'} {act}")


@dataclass
class QuantizeResult:
    model: nn.Module
    spec: QuantSpec
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Linear layers left in full precision, with the reason (shown in the report and to the gate)."""

    def weight_bytes(self) -> int:
        """Bytes of all parameters and buffers as stored (packed codes count at their packed size)."""
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module is kept in full precision by the spec's `ignore` fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def quantize(model: nn.Module, spec: QuantSpec, stats: ActivationStats | None = None,
             codes: dict[str, Codes] | None = None) -> QuantizeResult:
    """Return a quantized deep copy of `model` (the input model is never modified). Linears named in `codes`
    store those (a method such as GPTQ chose them); the others are rounded min-max."""
    codes = codes or {}
    if spec.activations is not None and spec.activations.mode == "static" and stats is None:
        raise ValueError(f"variant {spec.name!r} uses static activation scales: collect activation statistics first")
    qmodel = copy.deepcopy(model)
    result = QuantizeResult(model=qmodel, spec=spec)
    linears = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in tqdm(linears, desc=f"quantize {spec.name}", leave=False):
        if is_ignored(name, spec.ignore):
            result.kept[name] = "ignored by recipe"
            continue
        act_mode = spec.activations.mode if spec.activations else None
        absmax = stats.layers[name].absmax if act_mode == "static" else None
        parent_name, _, child = name.rpartition(".")
        qmodel.get_submodule(parent_name).register_module(
            child, QuantLinear.from_linear(linear, spec.weights, act_mode, absmax, codes.get(name)))
        result.quantized.append(name)
    return result
