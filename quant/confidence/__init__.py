"""Confidence: calibration metrics, temperature re-calibration, confidence bands, the logit lens and the probe."""

from quant.confidence.bands import BandConfig, band_table
from quant.confidence.lens import LensConfig, layer_calibration
from quant.confidence.probe import Probe, ProbeConfig
from quant.confidence.recalibrate import SUFFIX, RecalibrateConfig, Tempered, recalibrate, reference_logits

__all__ = ["SUFFIX", "BandConfig", "LensConfig", "Probe", "ProbeConfig", "RecalibrateConfig", "Tempered", "band_table",
           "layer_calibration", "recalibrate", "reference_logits"]
