"""calq: calibration-aware post-training quantization for LLMs.

The pipeline, one package per stage, each lower one knowing nothing of those above it:
  data (sources, select) | models (load, structure) -> calibrate (capture, stats, walker)
  -> methods (schemes, quantizer, smoothquant / awq / gptq, table, variant) | confidence (metrics, recalibrate, bands,
  lens, probe) -> checks (evaluation, probing, distributed, gate, report, plots) -> formats (checkpoint, exports)
  -> recipe -> pipeline -> compare | ask -> cli.

The names below are imported on first use, so `import quant.methods` loads only what the methods need.
"""

import importlib

_EXPORTS = {
    "ActivationStats": "quant.calibrate", "SequentialConfig": "quant.calibrate", "Streamed": "quant.calibrate",
    "collect_stats": "quant.calibrate",
    "BandConfig": "quant.confidence", "LensConfig": "quant.confidence", "RecalibrateConfig": "quant.confidence",
    "Tempered": "quant.confidence", "band_table": "quant.confidence", "layer_calibration": "quant.confidence",
    "recalibrate": "quant.confidence",
    "SelectConfig": "quant.data", "Selection": "quant.data", "select_samples": "quant.data",
    "CalqError": "quant.errors",
    "REFERENCE": "quant.checks", "EvalConfig": "quant.checks", "GateReport": "quant.checks",
    "GateRule": "quant.checks", "ModelEval": "quant.checks", "check_gates": "quant.checks",
    "eval_windows": "quant.checks", "evaluate": "quant.checks",
    "ExportConfig": "quant.formats", "export": "quant.formats", "load": "quant.formats",
    "save_quantized": "quant.formats",
    "METHODS": "quant.methods", "ActScheme": "quant.methods", "QuantizeResult": "quant.methods",
    "QuantLinear": "quant.methods", "QuantSpec": "quant.methods", "WeightScheme": "quant.methods",
    "quantize_variant": "quant.methods", "quantize_variants": "quant.methods", "transformed": "quant.methods",
    "ModelConfig": "quant.models", "load_model": "quant.models",
    "RunResult": "quant.pipeline", "run": "quant.pipeline",
    "Recipe": "quant.recipe", "load_recipe": "quant.recipe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
