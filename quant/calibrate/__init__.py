"""Calibration: what the linears read (capture), its per-channel statistics (stats), and the walk over the
decoder layers that gathers them and drives every method (walker)."""

from quant.calibrate.stats import ActivationStats, LayerStats
from quant.calibrate.walker import Resident, SequentialConfig, Streamed, collect_stats, walk

__all__ = ["ActivationStats", "LayerStats", "Resident", "SequentialConfig", "Streamed", "collect_stats", "walk"]
