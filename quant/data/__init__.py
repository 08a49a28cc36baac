"""Data: real text and MMLU from registry packages (sources), and diverse calibration samples (select)."""

from quant.data.select import SelectConfig, Sample, Selection, select_samples, special_prefix
from quant.data.sources import Document, MCItem, load_documents, load_mmlu, source_fingerprint, source_names

__all__ = ["Document", "MCItem", "Sample", "SelectConfig", "Selection", "load_documents", "load_mmlu",
           "select_samples", "source_fingerprint", "source_names", "special_prefix"]
