"""What a quantization scheme is, in compressed-tensors' vocabulary (num_bits, strategy, group_size, symmetric,
dynamic; presets W4A16, W8A8, ...), and the pure math of rounding a weight with one.

int4 codes are unsigned, [0, 15] around a zero point; symmetric int4 uses compressed-tensors' and GPTQ's grid,
scale = absmax / 7.5 and zero point 8, so its exports hold the very codes. int8 codes are signed, [-127, 127],
scale = absmax / 127.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor

from quant.schema import StrictModel


class WeightScheme(StrictModel):
    """compressed-tensors' QuantizationArgs for weights, the subset calq's kernels run."""

    renamed = {"bits": "num_bits"}
    num_bits: Literal[4, 8] = 8
    type: Literal["int", "float"] = "int"
    """float: FP8 e4m3 (8 bits, one scale per output channel)."""
    strategy: Literal["group", "channel"] | None = None
    """None: "group" when group_size is set, else "channel" (as compressed-tensors infers it)."""
    group_size: int | None = None
    """Columns per scale (strategy group); a ragged last group is allowed."""
    symmetric: bool = True

    @model_validator(mode="after")
    def _check(self) -> WeightScheme:
        strategy = self.strategy or ("group" if self.group_size is not None else "channel")
        object.__setattr__(self, "strategy", strategy)
        if (strategy == "group") != (self.group_size is not None):
            raise ValueError(f"strategy {strategy!r} with group_size {self.group_size}: a group strategy needs a "
                             "group_size, a channel strategy none")
        if self.num_bits == 8 and (strategy != "channel" or not self.symmetric):
            raise ValueError("8-bit weights are per-channel symmetric: set strategy: channel (no group_size) and "
                             "symmetric: true")
        if self.type == "float" and (self.num_bits != 8 or strategy != "channel" or not self.symmetric):
            raise ValueError("float weights are FP8 e4m3 with one scale per output channel: num_bits 8, no "
                             "group_size, symmetric")
        if self.group_size is not None and (self.group_size < 16 or self.group_size % 16):
            raise ValueError(f"group_size {self.group_size}: calq's CUDA kernels take multiples of 16; use 32, 64 or "
                             "128 (or none)")
        return self


class ActScheme(StrictModel):
    """int8 input activations: dynamic = one scale per token at run time; static = one calibrated scale per
    tensor (compressed-tensors' strategy token / tensor)."""

    renamed = {"mode": "dynamic: true (per token) or dynamic: false with strategy: tensor"}
    num_bits: Literal[8] = 8
    type: Literal["int", "float"] = "int"
    """float: FP8 e4m3 activations (dynamic per token only)."""
    strategy: Literal["token", "tensor"] | None = None
    """None: "token" when dynamic, else "tensor"."""
    dynamic: bool = True
    symmetric: Literal[True] = True

    @model_validator(mode="after")
    def _check(self) -> ActScheme:
        strategy = self.strategy or ("token" if self.dynamic else "tensor")
        object.__setattr__(self, "strategy", strategy)
        if (strategy == "token") != self.dynamic:
            raise ValueError(f"{'dynamic' if self.dynamic else 'static'} activations with strategy {strategy!r}: "
                             "calq runs dynamic per-token or static per-tensor activation scales")
        if self.type == "float" and not self.dynamic:
            raise ValueError("FP8 activations are dynamic per token in calq: set dynamic: true")
        return self

    @property
    def mode(self) -> Literal["dynamic", "static"]:
        return "dynamic" if self.dynamic else "static"


PRESETS: dict[str, dict] = {
    "W4A16": {"weights": {"num_bits": 4, "group_size": 128, "symmetric": True}},
    "W4A16_ASYM": {"weights": {"num_bits": 4, "group_size": 128, "symmetric": False}},
    "W8A8": {"weights": {"num_bits": 8}, "input_activations": {"dynamic": True}},
    "FP8_DYNAMIC": {"weights": {"num_bits": 8, "type": "float"}, "input_activations": {"type": "float", "dynamic": True}},
}
"""compressed-tensors' preset schemes of the same names (their weights and input_activations). Its W8A16 is int8 in
groups of 128, which calq's int8 kernels do not run; per-channel W8A16 is `weights: {num_bits: 8}` alone."""


# ----------------------------------------------------------------------------------------------
# Quantization math (pure functions)
# ----------------------------------------------------------------------------------------------

def grouped(w: Tensor, group_size: int | None) -> Tensor:
    """(N, K) -> (N, G, group); a ragged last group is padded by repeating its last column,
    which leaves that group's min and max unchanged."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    pad = -k % gs
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, gs)


FP8_MAX = 448.0
"""The largest float8 e4m3 value."""


def code_range(scheme: WeightScheme) -> tuple[float, float]:
    """Smallest and largest code: [0, 2^bits - 1] for int4, [-127, 127] for int8, [-448, 448] for FP8."""
    if scheme.type == "float":
        return -FP8_MAX, FP8_MAX
    return (-127, 127) if scheme.num_bits == 8 else (0, 2**scheme.num_bits - 1)


def quantize_weight(w: Tensor, scheme: WeightScheme, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max codes (N, K) and per-group scales and zero points (N, G), codes in [0, 2^bits - 1]
    (int4) or [-127, 127] (int8), all as float.

    `clip` (scalar or (N, G)) shrinks the range, which AWQ's clipping search uses.
    """
    n, k = w.shape
    g = grouped(w.float(), scheme.group_size)
    if scheme.type == "float":  # FP8: codes are e4m3 values (held in float32), round to nearest even
        scale = (g.abs().amax(-1) * clip).clamp(min=1e-12) / FP8_MAX
        q = (g / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return q.reshape(n, -1)[:, :k], scale, torch.zeros_like(scale)
    bits = scheme.num_bits
    qmax = 2**bits - 1
    lo_code, hi_code = code_range(scheme)
    if scheme.symmetric:  # int4: the grid of compressed-tensors and GPTQ, absmax / 7.5 around zero point 8
        absmax = g.abs().amax(-1) * clip
        scale = absmax.clamp(min=1e-8) / (qmax / 2 if bits == 4 else 127)
        zero = torch.full_like(scale, (qmax + 1) // 2 if bits == 4 else 0)
    else:
        lo = g.amin(-1).clamp(max=0) * clip
        hi = g.amax(-1).clamp(min=0) * clip
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, qmax)
    q = ((g / scale[..., None]).round_() + zero[..., None]).clamp_(lo_code, hi_code)  # round, then shift: as CT/GPTQ
    return q.reshape(n, -1)[:, :k], scale, zero


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    n, k = q.shape
    g = grouped(q.float(), group_size)
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
