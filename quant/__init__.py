"""calq: calibration-aware post-training quantization for LLMs.

The pipeline, one package per stage, each lower one knowing nothing of those above it:
  data (sources, select) -> models (load, structure) -> calibrate (capture, stats, walker)
  -> methods (schemes, quantizer, smoothquant / awq / gptq, table, variant) | confidence (metrics, recalibrate, bands,
  lens) -> evaluate (evaluation, distributed, gate, report, plots) -> formats (checkpoint, exports)
  -> recipe -> pipeline -> compare | ask -> cli.
"""

from quant.calibrate import ActivationStats, SequentialConfig, Streamed, collect_stats
from quant.confidence import (BandConfig, LensConfig, RecalibrateConfig, Tempered, band_table, layer_calibration,
                              recalibrate)
from quant.data import SelectConfig, Selection, select_samples
from quant.errors import CalqError
from quant.evaluate import REFERENCE, EvalConfig, GateReport, GateRule, ModelEval, check_gates, eval_windows, evaluate
from quant.formats import ExportConfig, export, load, save_quantized
from quant.methods import (METHODS, ActScheme, QuantizeResult, QuantLinear, QuantSpec, WeightScheme, quantize_variant,
                           quantize_variants)
from quant.models import ModelConfig, load_model
from quant.pipeline import RunResult, run
from quant.recipe import Recipe, load_recipe

__all__ = [
    "METHODS", "REFERENCE", "ActScheme", "ActivationStats", "BandConfig", "CalqError", "EvalConfig", "ExportConfig",
    "GateReport", "GateRule", "LensConfig", "ModelConfig", "ModelEval", "QuantLinear", "QuantSpec", "QuantizeResult",
    "RecalibrateConfig", "Recipe", "RunResult", "SelectConfig", "Selection", "SequentialConfig", "Streamed",
    "Tempered", "WeightScheme", "band_table", "check_gates", "collect_stats", "eval_windows", "evaluate", "export",
    "layer_calibration", "load", "load_model", "load_recipe", "quantize_variant", "quantize_variants", "recalibrate",
    "run", "save_quantized", "select_samples",
]
