"""Formats: calq's own checkpoint (save, find, load) and the exports other runtimes load (export)."""

from quant.formats.checkpoint import checkpoint_dir, load, load_probe, run_variants, save_quantized
from quant.formats.exporter import ExportConfig, ExportResult, export

__all__ = ["ExportConfig", "ExportResult", "checkpoint_dir", "export", "load", "load_probe", "run_variants",
           "save_quantized"]
