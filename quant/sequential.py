"""Sequential (layer-by-layer) calibration: statistics and quantization of a model that never sits
in memory whole.

The model is built on the meta device (accelerate.init_empty_weights) and its weights stay in the
safetensors checkpoint on disk. Decoder layers are brought in one at a time: the calibration inputs
run through the layer (activation statistics), each variant's transform is searched on it
(SmoothQuant, AWQ), it is quantized, its outputs become the next layer's inputs, and the float layer
is dropped (only the quantized layer is kept, on CPU). Peak memory is about one float layer, the
calibration activations and the quantized model, whatever the model size; the embeddings, final norm
and lm_head are loaded only to make layer 0's inputs and at the end.

Which outputs feed the next layer (SequentialConfig.propagate):
- "float" (default): the transformed float layer's, exactly what the whole-model path does (statistics
  on the float model, AWQ on the scaled and clipped but unquantized layers), so both give the same
  quantized weights (tests/test_sequential.py checks this).
- "quantized": the quantized layer's (GPTQ-style), so each layer is calibrated on the inputs it will
  see once quantized; stats-based variants (SmoothQuant, static activation scales) then record their
  statistics per layer on those inputs instead of using the float statistics.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from quant.awq import awq_layer, calibration_subset, layer_inputs
from quant.cache import CalqError
from quant.gptq import gptq_layer
from quant.mappings import Layer, architecture, decoder_layers
from quant.methods import QuantSpec
from quant.models import ModelConfig, resolve_model_path
from quant.quantize import Codes, QuantizeResult, is_ignored, quantize
from quant.schema import StrictModel
from quant.smoothquant import smooth_layer
from quant.stats import ActivationStats, LayerStats, recording


class SequentialConfig(StrictModel):
    propagate: Literal["float", "quantized"] = "float"
    """Outputs fed to the next layer: the transformed float layer's (same result as the whole-model
    path) or the quantized layer's (each layer calibrated on its quantized inputs)."""
    device: str = "cpu"
    """Where each layer computes ("cuda" on a GPU); quantized layers are kept on CPU."""


@dataclass
class SequentialResult:
    stats: ActivationStats
    variants: dict[str, QuantizeResult]


# ----------------------------------------------------------------------------------------------
# Weights on disk, modules on the meta device
# ----------------------------------------------------------------------------------------------

class _Checkpoint:
    """A safetensors checkpoint directory (one file or sharded with an index), read tensor by tensor."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            raise CalqError(f"{path} has no model.safetensors; sequential calibration streams layers from a "
                            "safetensors checkpoint (save the model with save_pretrained first)")

    def load(self, model: nn.Module, names: list[str], device: str) -> None:
        """Replace the (meta) tensors `names` of `model` by the checkpoint's, in the model's dtypes.

        Each file is opened only for the call, so no mapping outlives the layer that needed it.
        """
        current = model.state_dict()
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name in self.files:
                by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt", device=device) as f:
                tensors.update({k: f.get_tensor(k).to(current[k].dtype) for k in keys})
        model.load_state_dict(tensors, strict=False, assign=True)


class _Replay(nn.Module):
    """Stands in for decoder layer 0 (with `hidden`) or a later layer (without): replays the recorded
    final hidden states, one sample per call, so the model's tail runs on them."""

    def __init__(self, hidden: list[Tensor] | None) -> None:
        super().__init__()
        self.hidden = iter(hidden) if hidden is not None else None

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        return next(self.hidden) if self.hidden is not None else hidden_states


def _rooted(name: str, module: nn.Module) -> nn.Module:
    """`module` at path `name` in an otherwise empty tree, so quantize() sees full module names."""
    root = parent = nn.Module()
    *path, last = name.split(".")
    for part in path:
        parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(last, module)
    return root


class _Model:
    """One model skeleton on the meta device whose parts are loaded from and dropped back to disk."""

    def __init__(self, path: Path, dtype: torch.dtype, device: str) -> None:
        self.ckpt, self.device = _Checkpoint(path), device
        with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real
            self.model: PreTrainedModel = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path),
                                                                           dtype=dtype)
        self.model.eval().requires_grad_(False)
        self.prefix = architecture(self.model).layers + "."
        self.layers = decoder_layers(self.model)

    def copy(self) -> _Model:
        """Another skeleton of the same model (meta tensors: free)."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.layers = decoder_layers(other.model)
        return other

    def _rest(self) -> list[str]:
        return [k for k in self.model.state_dict() if not k.startswith(self.prefix)]

    def load_rest(self, device: str | None = None) -> None:
        """Embeddings, final norm and head: everything but the decoder layers."""
        self.ckpt.load(self.model, self._rest(), device or self.device)
        self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self.prefix)]
        if missing:
            raise CalqError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                            "re-save the model with save_pretrained")

    def drop_rest(self) -> None:
        current = self.model.state_dict()
        self.model.load_state_dict({k: current[k].to("meta") for k in self._rest()}, strict=False, assign=True)
        self.model.tie_weights()

    def load_layer(self, layer: Layer) -> None:
        self.ckpt.load(self.model, [f"{layer.name}.{k}" for k in layer.module.state_dict()], self.device)

    def inputs(self, samples: list[Tensor]) -> tuple[list[Tensor], list[list[dict]]]:
        """Layer 0's inputs and every layer's keyword arguments for `samples` (see awq.layer_inputs)."""
        return layer_inputs(self.model, self.layers, [s.to(self.device) for s in samples])

    def tail_stats(self, hidden: list[Tensor], samples: list[Tensor]) -> dict[str, LayerStats]:
        """Statistics of the linears after the decoder layers (lm_head), fed the final hidden states."""
        for layer in self.layers:
            self.model.set_submodule(layer.name, _Replay(hidden if layer is self.layers[0] else None))
        try:
            with recording(self.model) as stats:
                for ids in samples:
                    self.model(input_ids=ids.reshape(1, -1).to(self.device), use_cache=False)
        finally:
            for layer in self.layers:
                self.model.set_submodule(layer.name, layer.module)
        return stats


# ----------------------------------------------------------------------------------------------
# One variant, layer by layer
# ----------------------------------------------------------------------------------------------

@dataclass
class _Variant:
    spec: QuantSpec
    skeleton: _Model
    result: QuantizeResult
    samples: list[Tensor] | None
    """Samples this variant runs through its own layers (None: it needs no activations)."""
    hidden: list[Tensor] | None = None
    kwargs: list[list[dict]] | None = None
    done: dict[str, nn.Module] | None = None
    """Quantized decoder layers by name; the skeleton keeps its meta layers until the end."""


def _needs_stats(spec: QuantSpec) -> bool:
    return spec.method == "smoothquant" or (spec.activations is not None and spec.activations.mode == "static")


def _variant_samples(spec: QuantSpec, samples: list[Tensor], cfg: SequentialConfig) -> list[Tensor] | None:
    if spec.method in ("awq", "gptq"):
        return calibration_subset(samples, getattr(spec, spec.method).max_tokens)  # spec.awq / spec.gptq
    if cfg.propagate == "quantized" and _needs_stats(spec):
        return samples
    return None


def _run(module: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[Tensor]:
    return [module(h, **kw) for h, kw in zip(hidden, kwargs)]


# Per method: transform one float layer in place (given its variant's inputs and the statistics of its
# linears' inputs) and return the statistics of the transformed linears that changed, and any codes the method
# chose itself (GPTQ).
LayerTransform = Callable[[Layer, QuantSpec, dict[str, LayerStats], list[Tensor] | None, list[dict] | None],
                          tuple[dict[str, LayerStats], dict[str, Codes]]]
LAYER_TRANSFORMS: dict[str, LayerTransform] = {
    "minmax": lambda layer, spec, stats, hidden, kwargs: ({}, {}),
    "smoothquant": lambda layer, spec, stats, hidden, kwargs: (smooth_layer(layer, stats, spec.smoothquant), {}),
    "awq": lambda layer, spec, stats, hidden, kwargs: (awq_layer(layer, hidden, kwargs, spec.weights, spec.awq,
                                                                 spec.ignore) or {}, {}),
    "gptq": lambda layer, spec, stats, hidden, kwargs: ({}, gptq_layer(layer, hidden, kwargs, spec.weights,
                                                                       spec.gptq, spec.ignore)),
}


def _quantize_module(v: _Variant, name: str, module: nn.Module, stats: dict[str, LayerStats],
                     codes: dict[str, Codes] | None = None) -> nn.Module:
    """Quantize `module` (at full name `name`) as the whole-model quantize() would, on CPU."""
    q = quantize(_rooted(name, module), v.spec, ActivationStats(layers=stats, meta={}), codes)
    v.result.quantized += q.quantized
    v.result.kept.update(q.kept)
    return q.model.get_submodule(name).to("cpu")


@torch.no_grad()
def _layer_step(v: _Variant, i: int, fp: nn.Module, fp_stats: dict[str, LayerStats], cfg: SequentialConfig) -> None:
    """Transform and quantize variant `v`'s copy of float layer `i`, advancing its inputs."""
    meta = v.skeleton.layers[i]
    v.skeleton.model.set_submodule(meta.name, copy.deepcopy(fp))
    layer = decoder_layers(v.skeleton.model)[i]
    kwargs = v.kwargs[i] if v.kwargs is not None else None
    stats = fp_stats
    if cfg.propagate == "quantized" and _needs_stats(v.spec):
        with recording(layer.module, layer.name) as stats:
            _run(layer.module, v.hidden, kwargs)
    changed, codes = LAYER_TRANSFORMS[v.spec.method](layer, v.spec, stats, v.hidden, kwargs)
    stats = {**stats, **changed}
    if v.hidden is not None and cfg.propagate == "float":  # GPTQ's layer already holds its dequantized codes
        v.hidden = _run(layer.module, v.hidden, kwargs)
    qlayer = _quantize_module(v, layer.name, layer.module, stats, codes)
    if v.hidden is not None and cfg.propagate == "quantized":
        v.hidden = _run(qlayer.to(cfg.device), v.hidden, kwargs)
        qlayer.to("cpu")
    v.skeleton.model.set_submodule(layer.name, meta.module)
    v.done[layer.name] = qlayer


def _finish(v: _Variant, stats: ActivationStats) -> None:
    """Load the variant's embeddings, norm and head from disk and quantize the linears among them."""
    v.skeleton.load_rest("cpu")
    model = v.skeleton.model
    for name, qlayer in v.done.items():
        model.set_submodule(name, qlayer)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.startswith(v.skeleton.prefix):
            continue
        if is_ignored(name, v.spec.ignore):  # as quantize(), without copying
            v.result.kept[name] = "ignored by recipe"  # the (tied) lm_head: a copy would cost a vocabulary
        else:
            model.set_submodule(name, _quantize_module(v, name, mod, stats.layers))
    v.result.model = model


# ----------------------------------------------------------------------------------------------
# The stage's verb
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def calibrate_sequential(source: ModelConfig, samples: list[Tensor], specs: list[QuantSpec] | tuple[QuantSpec, ...],
                         cfg: SequentialConfig = SequentialConfig(), stats: ActivationStats | None = None,
                         meta: dict | None = None) -> SequentialResult:
    """Activation statistics (unless `stats` are given) and every variant of `specs`, in one pass over
    the decoder layers, each loaded from `source`'s checkpoint only while it is processed.

    Statistics equal collect_stats() on the float model; with propagate="float" each variant equals
    quantize_variant() on the whole model.
    """
    if not samples:
        raise CalqError("no calibration samples for sequential calibration; select samples first")
    path = Path(resolve_model_path(source.source))
    if not path.is_dir():
        raise CalqError(f"sequential calibration needs a local checkpoint directory, got {source.source!r}; "
                        "download the model (huggingface-cli download) and point model.source at it")
    base = _Model(path, getattr(torch, source.dtype), cfg.device)
    variants = [_Variant(spec, base.copy(), QuantizeResult(model=None, spec=spec),
                         _variant_samples(spec, samples, cfg), done={}) for spec in specs]
    fp_hidden = None
    if stats is None or any(v.samples is not None for v in variants):
        base.load_rest()
        if stats is None:
            fp_hidden, fp_kwargs = base.inputs(samples)
        for v in variants:
            if v.samples is not None:
                v.hidden, v.kwargs = base.inputs(v.samples)
        base.drop_rest()
    layer_stats: dict[str, LayerStats] = {} if stats is None else dict(stats.layers)
    for i, layer in enumerate(tqdm(base.layers, desc="sequential", unit="layer")):
        base.load_layer(layer)
        if fp_hidden is not None:
            with recording(layer.module, layer.name) as recorded:
                fp_hidden = _run(layer.module, fp_hidden, fp_kwargs[i])
            layer_stats.update(recorded)
        for v in variants:
            _layer_step(v, i, layer.module, layer_stats, cfg)
        layer.module.to("meta")
    if fp_hidden is not None:
        base.load_rest()
        layer_stats.update(base.tail_stats(fp_hidden, samples))
        base.drop_rest()
        stats = ActivationStats(layers=layer_stats, meta=dict(meta or {}, samples=len(samples)))
    for v in variants:
        _finish(v, stats)
    return SequentialResult(stats=stats, variants={v.spec.name: v.result for v in variants})
