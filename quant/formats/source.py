"""What every export starts from: the hash-checked calq checkpoint, loaded, and what travels with it (scheme,
fitted temperature or direction step, the run's gate verdict for that variant)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from quant.checks import GateReport
from quant.formats.checkpoint import CheckpointInfo, checkpoint_dir, checkpoint_info, load
from quant.methods import QuantLinear


def _gate_verdict(directory: Path) -> dict | None:
    gate = directory.parent.parent / "gate.json"
    if directory.parent.name != "models" or not gate.is_file():
        return None
    name = directory.name  # a re-calibrated variant is gated as name+T
    results = [r for r in GateReport.load(gate).results if r.variant == name or r.variant.startswith(f"{name}+")]
    return {"passed": all(r.passed for r in results), "results": [r.line() for r in results]} if results else None


@dataclass(frozen=True)
class ExportSource:
    model: nn.Module
    tokenizer: object
    directory: Path
    info: CheckpointInfo
    calq: dict
    """What travels with the export: scheme, temperature or direction step, gate verdict."""

    @classmethod
    def open(cls, path: Path, variant: str | None) -> ExportSource:
        directory = checkpoint_dir(path, variant)
        model, tokenizer = load(directory, device="cpu")
        info = checkpoint_info(directory)
        calq = {"variant": info.spec.name, "spec": info.spec.model_dump(mode="json"),
                "temperature": info.temperature, "direction": info.direction, "gate": _gate_verdict(directory)}
        return cls(model, tokenizer, directory, info, calq)

    @property
    def quantized(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLinear)}

    @property
    def kept(self) -> list[str]:
        """Linears in full precision, by name."""
        return sorted(n for n, m in self.model.named_modules() if isinstance(m, nn.Linear))

    def fp_state(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Every tensor outside the quantized linears (tied copies once), in `dtype`."""
        skip = tuple(f"{n}." for n in self.quantized)
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(skip)}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}

    @property
    def shapes(self) -> Shapes:
        return {n: (m.in_features, m.out_features) for n, m in self.quantized.items()}


Shapes = dict[str, tuple[int, int]]
"""(in_features, out_features) of every quantized linear, by name: what a format's constraints are checked on, from
a checkpoint or, at recipe load, from the model's config alone."""


def ragged_groups(fmt: str, group: int | None, shapes: Shapes) -> list[str]:
    """Formats that store whole groups only: the group size must divide every quantized layer's input size."""
    ragged = [n for n, (k, _) in shapes.items() if group and k % group]
    if not ragged:
        return []
    return [f"{fmt} needs group_size {group} to divide every input size, but {ragged[0]} has {shapes[ragged[0]][0]} "
            "inputs (a ragged last group); quantize with a group_size that divides it (e.g. 32 or 64)"]
