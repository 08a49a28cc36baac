"""Per-channel statistics of every linear layer's input, gathered by streaming forward hooks.

Only running reductions are kept (never the activations), so memory is O(channels) per layer.
Saved as safetensors (the tensors) + JSON (what produced them), and loaded back for later stages.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant.cache import CalqError, atomic_path

FIELDS = ("absmax", "min", "max", "sum_abs")


@dataclass
class LayerStats:
    absmax: Tensor  # (in_features,) max |x| per input channel
    min: Tensor
    max: Tensor
    sum_abs: Tensor  # running sum of |x|; mean_abs = sum_abs / tokens
    tokens: int

    @property
    def mean_abs(self) -> Tensor:
        return self.sum_abs / max(self.tokens, 1)

    @classmethod
    def empty(cls, channels: int) -> LayerStats:
        inf = torch.full((channels,), float("inf"), dtype=torch.float64)
        return cls(torch.zeros(channels, dtype=torch.float64), inf.clone(), -inf, torch.zeros_like(inf), 0)

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.min = torch.minimum(self.min, x.amin(0))
        self.max = torch.maximum(self.max, x.amax(0))
        self.sum_abs += x.abs().sum(0)
        self.tokens += x.shape[0]


@dataclass
class ActivationStats:
    layers: dict[str, LayerStats]
    meta: dict

    def save(self, directory: Path) -> None:
        """Write stats.safetensors + stats.json into `directory` (atomically, as one unit)."""
        tensors = {f"{name}.{f}": getattr(s, f).float().contiguous() for name, s in self.layers.items() for f in FIELDS}
        info = {"meta": self.meta, "tokens": {name: s.tokens for name, s in self.layers.items()}}
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / "stats.safetensors")
            (tmp / "stats.json").write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, directory: Path) -> ActivationStats:
        directory = Path(directory)
        try:
            info = json.loads((directory / "stats.json").read_text())
            tensors = load_file(directory / "stats.safetensors")
        except (OSError, ValueError) as err:
            raise CalqError(f"cannot read activation statistics in {directory} ({err}); "
                            "delete the directory and collect them again") from err
        layers = {name: LayerStats(*(tensors[f"{name}.{f}"].double() for f in FIELDS), tokens=n)
                  for name, n in info["tokens"].items()}
        return cls(layers=layers, meta=info["meta"])

    def summary(self) -> dict[str, dict[str, float]]:
        """Per-layer scalars a person can scan: outlier ratio = max channel absmax / median absmax."""
        return {name: {"absmax": float(s.absmax.max()), "mean_abs": float(s.mean_abs.mean()),
                       "outlier_ratio": float(s.absmax.max() / s.absmax.median().clamp(min=1e-8)),
                       "tokens": s.tokens}
                for name, s in self.layers.items()}


@contextlib.contextmanager
def recording(module: nn.Module, prefix: str = "") -> Iterator[dict[str, LayerStats]]:
    """Statistics of every nn.Linear input inside `module` (named `prefix`), updated while the block runs.

    The sequential path records one decoder layer at a time with it, the whole-model path the model.
    """
    layers: dict[str, LayerStats] = {}
    handles = []
    for name, mod in module.named_modules(prefix=prefix):
        if isinstance(mod, nn.Linear):
            layers[name] = LayerStats.empty(mod.in_features)
            handles.append(mod.register_forward_pre_hook(lambda _m, args, s=layers[name]: s.update(args[0])))
    try:
        yield layers
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def collect_stats(model: nn.Module, samples: list[Tensor], meta: dict | None = None) -> ActivationStats:
    """Run each sample (a 1-D tensor of token ids) through `model` and reduce every nn.Linear input.

    Samples run one at a time, so variable lengths need no padding and no masking.
    """
    if not samples:
        raise CalqError("no calibration samples to collect statistics from; select samples first")
    device = next(model.parameters()).device
    with recording(model) as layers:
        for ids in tqdm(samples, desc="activation stats", unit="sample"):
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    return ActivationStats(layers=layers, meta=dict(meta or {}, samples=len(samples)))
