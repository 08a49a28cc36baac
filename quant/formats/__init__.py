"""Formats: calq's own checkpoint (save, find, load) and the exports other runtimes load (export)."""

from quant.formats.checkpoint import checkpoint_dir, load, run_variants, save_quantized
from quant.formats.exporter import ExportConfig, ExportResult, export

__all__ = ["ExportConfig", "ExportResult", "checkpoint_dir", "export", "load", "run_variants", "save_quantized"]
