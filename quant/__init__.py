"""calq: calibration-aware post-training quantization for LLMs.

One module per pipeline stage, each with one public verb:
  models.load_model -> calibration.select_samples -> stats.collect_stats -> quantize.quantize
  -> recalibrate.recalibrate -> evaluate.evaluate -> gate.check_gates, composed by pipeline.run from a recipe
  (recipe.load_recipe).
"""

from quant.cache import CalqError
from quant.calibration import SelectConfig, Selection, select_samples
from quant.checkpoint import load
from quant.evaluate import EvalConfig, ModelEval, evaluate
from quant.gate import GateReport, GateRule, check_gates
from quant.models import ModelConfig, load_model
from quant.pipeline import RunResult, run
from quant.methods import QuantSpec, quantize_variant
from quant.quantize import ActScheme, QuantizeResult, QuantLinear, WeightScheme, quantize
from quant.recalibrate import RecalibrateConfig, Tempered, recalibrate
from quant.recipe import Recipe, load_recipe
from quant.stats import ActivationStats, collect_stats

__all__ = [
    "ActScheme", "ActivationStats", "CalqError", "EvalConfig", "GateReport", "GateRule", "ModelConfig",
    "ModelEval", "QuantLinear", "QuantSpec", "QuantizeResult", "RecalibrateConfig", "Recipe", "RunResult",
    "SelectConfig", "Selection", "Tempered", "WeightScheme", "check_gates", "collect_stats", "evaluate", "load",
    "load_model", "load_recipe", "quantize", "run", "quantize_variant", "recalibrate", "select_samples",
]
