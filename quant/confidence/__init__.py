"""Confidence: calibration metrics, temperature re-calibration, confidence bands and the logit lens."""

from quant.confidence.bands import BandConfig, band_table
from quant.confidence.lens import LensConfig, layer_calibration
from quant.confidence.recalibrate import SUFFIX, RecalibrateConfig, Tempered, recalibrate, reference_logits

__all__ = ["SUFFIX", "BandConfig", "LensConfig", "RecalibrateConfig", "Tempered", "band_table", "layer_calibration",
           "recalibrate", "reference_logits"]
