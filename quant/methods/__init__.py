"""Methods: schemes and their math, the shared quantizer, the smoothing mappings, SmoothQuant / AWQ / GPTQ, the method
table, and the verbs that make quantized variants."""

from quant.methods.quantizer import Coverage, QuantLinear, coverage, is_ignored, kernel_paths, prepare_kernels, quantize_linears
from quant.methods.schemes import PRESETS, ActScheme, Codes, WeightScheme
from quant.methods.table import METHODS
from quant.methods.variant import QuantizeResult, QuantSpec, quantize_variant, quantize_variants, transformed

__all__ = ["METHODS", "PRESETS", "ActScheme", "Codes", "Coverage", "coverage", "QuantLinear", "QuantSpec", "QuantizeResult", "WeightScheme",
           "is_ignored", "kernel_paths", "prepare_kernels", "quantize_linears", "quantize_variant", "quantize_variants", "transformed"]
