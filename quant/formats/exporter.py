"""Export a calq checkpoint to formats other runtimes load: compressed-tensors (vLLM, transformers), AutoAWQ GEMM
(transformers, AutoAWQ, vLLM) and GGUF (llama.cpp), one module each.

Every export starts from the hash-checked calq checkpoint (formats.source), is written to a temporary directory
renamed into place at the end (an interrupted export leaves nothing that looks complete), ends with a manifest of
hashes, and carries the fitted temperature or direction step and the run's gate verdict for that variant
(config.json `calq`, GGUF `calq.*`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from quant.files import atomic_path
from quant.formats import autoawq, compressed_tensors, gguf
from quant.confidence.probe import PROBE_FILE
from quant.formats.checkpoint import write_manifest
from quant.errors import CalqError
from quant.formats.source import ExportSource, Shapes
from quant.methods import QuantSpec
from quant.models import converted_kinds
from quant.schema import StrictModel

log = logging.getLogger(__name__)

Format = Literal["compressed-tensors", "awq", "gguf"]
FORMATS = {"compressed-tensors": compressed_tensors, "awq": autoawq, "gguf": gguf}
"""Each format's module: `problems(spec, shapes, config)` (what keeps a variant of a model from it, checked at recipe
load from the config alone and again before writing) and `write(source, dtype, out)`, which returns what the user
should know about the written export (where it does not load), one line each."""


def export_problems(fmt: Format, spec: QuantSpec, shapes: Shapes, config) -> list[str]:
    kinds, found = converted_kinds(config), []
    if "Conv1D" in kinds:  # measured: transformers loads a GPT-2 export without complaint, logits 0.42 off
        found.append(f"{fmt} export of {config.model_type}: calq quantizes its Conv1D projections as nn.Linear "
                     "([out, in]) but runtimes build them as Conv1D ([in, out]), so the export would compute wrong "
                     "logits; use calq's own checkpoint (quant.load)")
    return found + FORMATS[fmt].problems(spec, shapes, config)


class ExportConfig(StrictModel):
    format: Format
    variant: str | None = None
    """Which quantized variant of a run directory (not needed for a model directory or a one-variant run)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Float dtype of scales and of the layers kept in full precision (runtimes' kernels want 16-bit)."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: Format
    weight_bytes: int
    """Bytes of the weight files (safetensors or GGUF) as written."""
    notes: tuple[str, ...] = ()
    """What the user should know, one line each: what of the checkpoint the format cannot carry (its confidence
    probe), runtimes that cannot load it."""


def export(source: str | Path, config: ExportConfig, out: str | Path) -> ExportResult:
    """Write the checkpoint at `source` (a run or model directory) to `out` in `config.format`, atomically."""
    src = ExportSource.open(Path(source), config.variant)
    found = export_problems(config.format, src.info.spec, src.shapes, src.model.config)
    if found:
        raise CalqError("; ".join(found))
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        notes = FORMATS[config.format].write(src, getattr(torch, config.dtype), tmp)
        if config.format != "gguf":
            src.tokenizer.save_pretrained(tmp)
        write_manifest(tmp, config.format, calq=src.calq)
    weights = [p for p in out.iterdir() if p.suffix in (".safetensors", ".gguf")]
    if (src.directory / PROBE_FILE).is_file():
        notes.append(f"the confidence probe ({PROBE_FILE}) is not carried: {config.format} has no place for it; "
                     "it stays with the calq checkpoint")
    result = ExportResult(out, config.format, sum(p.stat().st_size for p in weights), tuple(notes))
    log.info("exported %s as %s to %s (%.1f MB)", src.info.spec.name, config.format, out, result.weight_bytes / 2**20)
    return result
