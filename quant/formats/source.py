"""What every export starts from: the hash-checked calq checkpoint, loaded, and what travels with it (scheme,
fitted temperature or direction step, the run's gate verdict for that variant)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from quant.checks import GateReport
from quant.formats.checkpoint import WEIGHTS, CheckpointInfo, checkpoint_dir, checkpoint_info, load
from quant.methods import QuantLinear, coverage
from quant.models import HubNames


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
        """Every module whose matmul weight stays in full precision (linears, MoE routers), by name."""
        return sorted(coverage(self.model, {}).kept)

    @cached_property
    def names(self) -> HubNames:
        """The hub's names of this model's tensors and modules, which exports write (`to_hub`)."""
        return HubNames(self.model)

    def untied(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` with tied copies once: lm_head.weight is the embeddings' when the config ties them."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        return {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}

    def fp_state(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Every tensor outside the quantized linears (tied copies once), in `dtype`."""
        skip = tuple(f"{n}." for n in self.quantized)
        state = self.untied({k: v for k, v in self.model.state_dict().items() if not k.startswith(skip)})
        return {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}

    def save(self, state: dict[str, Tensor], out: Path) -> None:
        """`state` (tied copies once) in one safetensors file under the hub's names (Mixtral's
        block_sparse_moe.experts.<e>.w1, ...), as vLLM and transformers load a checkpoint of this model."""
        save_file({self.names.to_hub(k): v.contiguous() for k, v in self.untied(state).items()}, str(out / WEIGHTS),
                  metadata={"format": "pt"})

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
