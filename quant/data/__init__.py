"""Data: real text and MMLU from registry packages (sources), diverse calibration samples (select), and the user's
task files (tasks)."""

from quant.data.select import SelectConfig, Sample, Selection, select_samples, special_prefix
from quant.data.sources import Document, MCItem, load_documents, load_mmlu, source_fingerprint, source_names
from quant.data.tasks import Task, TaskConfig, TaskItem, load_task

__all__ = ["Document", "MCItem", "Sample", "SelectConfig", "Selection", "load_documents", "load_mmlu",
           "load_task", "select_samples", "source_fingerprint", "source_names", "special_prefix", "Task", "TaskConfig",
           "TaskItem"]
