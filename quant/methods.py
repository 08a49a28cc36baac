"""Quantization methods: an optional transform of the float model, then the shared quantizer. min-max = no
transform; SmoothQuant and AWQ move magnitude between activations and weights first; GPTQ picks the codes
itself, with error feedback, and hands them to the quantizer. Every method sees the same calibration samples
and statistics, so comparisons are fair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import model_validator
from torch import Tensor, nn

from quant.awq import AWQConfig, awq
from quant.gptq import GPTQConfig, gptq
from quant.quantize import ActScheme, Codes, QuantizeResult, WeightScheme, quantize
from quant.schema import StrictModel
from quant.smoothquant import SmoothQuantConfig, smooth
from quant.stats import ActivationStats

Method = Literal["minmax", "smoothquant", "awq", "gptq"]


class QuantSpec(StrictModel):
    """One quantized variant of the model."""

    name: str
    method: Method = "minmax"
    weights: WeightScheme = WeightScheme()
    activations: ActScheme | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    """fnmatch patterns of module names kept in full precision (embeddings are never nn.Linear)."""
    smoothquant: SmoothQuantConfig = SmoothQuantConfig()
    awq: AWQConfig = AWQConfig()
    gptq: GPTQConfig = GPTQConfig()

    @model_validator(mode="after")
    def _check(self) -> QuantSpec:
        if self.activations is not None and self.weights.bits != 8:
            raise ValueError(f"variant {self.name!r}: int8 activations need 8-bit weights (W8A8); "
                             "remove `activations` for weight-only W4A16")
        if self.method == "smoothquant" and self.activations is None:
            raise ValueError(f"variant {self.name!r}: SmoothQuant only helps quantized activations; "
                             "add `activations: {mode: dynamic}` or `{mode: static}`")
        return self


Transform = Callable[[nn.Module, QuantSpec, ActivationStats, list[Tensor]],
                     tuple[nn.Module, ActivationStats, dict[str, Codes]]]


def _gptq(model: nn.Module, spec: QuantSpec, stats: ActivationStats, samples: list[Tensor]):
    quantized, codes = gptq(model, samples, spec.weights, spec.gptq, spec.ignore)
    return quantized, stats, codes


TRANSFORMS: dict[str, Transform] = {
    "minmax": lambda model, spec, stats, samples: (model, stats, {}),
    "smoothquant": lambda model, spec, stats, samples: (*smooth(model, stats, spec.smoothquant), {}),
    "awq": lambda model, spec, stats, samples: (awq(model, samples, spec.weights, spec.awq, spec.ignore), stats, {}),
    "gptq": _gptq,
}


def quantize_variant(model: nn.Module, spec: QuantSpec, stats: ActivationStats,
                     samples: list[Tensor]) -> QuantizeResult:
    """Apply the spec's transform to a copy of `model`, then quantize it (the input is never modified)."""
    transformed, transformed_stats, codes = TRANSFORMS[spec.method](model, spec, stats, samples)
    return quantize(transformed, spec, transformed_stats, codes)
