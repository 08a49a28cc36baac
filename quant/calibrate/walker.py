"""The walk: one pass over the decoder layers that drives activation statistics, every method and quantization.

Calibration samples are embedded once (layer 0's inputs, plus the keyword arguments the model passes each layer),
then each decoder layer in turn: its float inputs run through it while its linears' inputs are recorded (the
statistics), each visitor (one quantized variant, quant.methods) transforms and quantizes its own copy of the
layer on its own inputs, and the outputs become the next layer's inputs. Stages that need only hidden states
never run the output head: the embedding pass stops at the first decoder layer and the head's statistics are
taken at its input.

Where the layers come from is the source:
- `Resident`: a model in memory (the whole-model path);
- `Streamed`: a safetensors checkpoint on disk, the model built on the meta device and each layer's weights read
  only while it is walked, then dropped: peak memory is about one float layer, the calibration activations and
  the quantized layers, whatever the model size (`SequentialConfig`, recipe key `sequential`).
Both run the same code on the same inputs, so they give the same statistics and the same quantized weights.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from quant.calibrate.stats import ActivationStats, LayerStats, recording
from quant.errors import CalqError
from quant.models import (HubNames, Layer, ModelConfig, checkpoint_tensors, decoder_layers, layers_path, linearize,
                          resolve_model_path, route_all_experts)
from pydantic import Field

from quant.schema import StrictModel

Propagate = Literal["float", "quantized"]
PROBE_TOKENS = 32
"""Tokens of the first calibration sample run through the float layers for visitors to trace structure on."""


class SequentialConfig(StrictModel):
    """Walk a checkpoint streamed from disk instead of a model in memory."""

    propagate: Propagate = "float"
    """Outputs fed to the next layer: the transformed float layer's (the same result as the whole-model path) or
    the quantized layer's (each layer calibrated on the inputs it will see once quantized)."""
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d+)?)$")
    """Where each layer computes; null: the model's device (model.device). One float layer at a time is there, the
    rest of the model stays on disk and the quantized layers on CPU, so a model larger than the GPU calibrates."""


# ----------------------------------------------------------------------------------------------
# Layer inputs
# ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised once what a pass needs is recorded: the rest of the forward is not run."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call (positional arguments by their names in the layer's
    signature: GPT-2 passes the mask positionally) and passes the hidden states through."""

    def __init__(self, calls: list, last: bool, layer: nn.Module) -> None:
        super().__init__()
        self.calls, self.last = calls, last
        self.signature = inspect.signature(layer.forward)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if args:
            bound = self.signature.bind_partial(hidden_states, *args).arguments
            kwargs = {**dict(list(bound.items())[1:]), **kwargs}
        self.calls.append((hidden_states, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@contextlib.contextmanager
def _replaced(model: nn.Module, layers: list[Layer], stand_ins: list[nn.Module]) -> Iterator[None]:
    for layer, stand_in in zip(layers, stand_ins):
        model.set_submodule(layer.name, stand_in)
    try:
        yield
    finally:
        for layer in layers:
            model.set_submodule(layer.name, layer.module)


@dataclass
class Track:
    """Calibration inputs on their way through the layers: the current hidden states per sample and, per layer,
    the keyword arguments the model passes it with each (masks and rotary embeddings differ by layer type)."""

    hidden: list[Tensor]
    kwargs: list[list[dict]]

    def at(self, i: int) -> LayerInputs:
        return LayerInputs(self.hidden, self.kwargs[i])


@dataclass(frozen=True)
class LayerInputs:
    """One decoder layer's inputs: hidden states per sample, each with its keyword arguments."""

    hidden: list[Tensor]
    kwargs: list[dict]

    def run(self, module: nn.Module) -> list[Tensor]:
        return [hidden_out(module(h, **kw)) for h, kw in zip(self.hidden, self.kwargs)]


def hidden_out(output: Tensor | tuple) -> Tensor:
    """A decoder layer's hidden states: most layers return them, some (Falcon, GPT-NeoX) a tuple starting with them."""
    return output[0] if isinstance(output, tuple) else output


def layer_inputs(model: nn.Module, layers: list[Layer], samples: list[Tensor], device) -> Track:
    """Layer 0's hidden states per sample and every layer's keyword arguments, without running any layer."""
    calls: list[list] = [[] for _ in layers]
    with _replaced(model, layers, [_Recorder(c, c is calls[-1], layer.module) for c, layer in zip(calls, layers)]):
        for ids in samples:
            with contextlib.suppress(_Stop):
                model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    return Track([h for h, _ in calls[0]], [[kw for _, kw in c] for c in calls])


def calibration_subset(samples: list[Tensor], max_tokens: int) -> list[Tensor]:
    """Evenly spaced samples totalling about `max_tokens` tokens (at least one sample)."""
    mean_len = sum(len(s) for s in samples) / len(samples)
    k = min(len(samples), max(1, round(max_tokens / mean_len)))
    return [samples[i] for i in torch.linspace(0, len(samples) - 1, k, device="cpu").round().long().tolist()]


# ----------------------------------------------------------------------------------------------
# Sources: a model in memory, or a checkpoint on disk
# ----------------------------------------------------------------------------------------------

class _Replay(nn.Module):
    """Stands in for decoder layer 0: replays the recorded final hidden states, one sample per call, so the
    model's tail (final norm) runs on them; later layers pass them through."""

    def __init__(self, hidden: list[Tensor] | None, wrap: bool) -> None:
        super().__init__()
        self.hidden = iter(hidden) if hidden is not None else None
        self.wrap = wrap

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor | tuple[Tensor]:
        out = next(self.hidden) if self.hidden is not None else hidden_states
        return (out,) if self.wrap else out


class Resident:
    """A model in memory: the walk reads its layers in place and never changes their function (Conv1D and fused
    experts become nn.Linear in place first, exactly: quant.models.linearize; `converted` says what)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.converted = linearize(model)
        self.layers = decoder_layers(model)
        self.prefix = layers_path(model) + "."
        self.device = next(model.parameters()).device
        self.home = self.device
        """Where the quantized layers are kept."""
        self.tuple_out = False
        """Whether the decoder layers return a tuple (seen on the walk's first layer): the stand-ins must too."""

    @contextlib.contextmanager
    def rest(self) -> Iterator[None]:
        """Embeddings, final norm and head available while the block runs (always, in memory)."""
        yield

    def load(self, i: int) -> nn.Module:
        return self.layers[i].module

    def release(self, i: int) -> None:
        pass

    def inputs(self, samples: list[Tensor]) -> Track:
        return layer_inputs(self.model, self.layers, samples, self.device)

    def head_stats(self, hidden: list[Tensor], samples: list[Tensor]) -> dict[str, LayerStats]:
        """Statistics of the linears after the decoder layers (lm_head), fed the final hidden states; the output
        head records its input and stops the forward before its own (vocabulary-sized) product."""
        head = self.model.get_output_embeddings()

        def stop(_module, _args):
            raise _Stop

        stand_ins = [_Replay(hidden if layer is self.layers[0] else None, self.tuple_out) for layer in self.layers]
        with _replaced(self.model, self.layers, stand_ins), recording(self.model, skip=self.prefix) as stats:
            handle = head.register_forward_pre_hook(stop) if head is not None else None  # after recording's hook
            try:
                for ids in samples:
                    with contextlib.suppress(_Stop):
                        self.model(input_ids=ids.reshape(1, -1).to(self.device), use_cache=False)
            finally:
                if handle is not None:
                    handle.remove()
        return stats

    def variant_model(self, layers: dict[str, nn.Module]) -> nn.Module:
        """A copy of everything but the decoder layers, which become `layers` (the layers are never copied)."""
        with _replaced(self.model, self.layers, [nn.Identity() for _ in self.layers]):
            model = copy.deepcopy(self.model)
        for name, module in layers.items():
            model.set_submodule(name, module)
        return model


class _Checkpoint:
    """A safetensors checkpoint directory (one file or sharded with an index), read tensor by tensor, its keys named
    as the linearized model names them (`names`: transformers' renamings and per-expert names, e.g. GPT-NeoX's
    embed_out, Mixtral's w1)."""

    def __init__(self, path: Path, names: HubNames | None = None) -> None:
        index = path / "model.safetensors.index.json"
        if index.exists():
            stored = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", "pt") as f:
                stored = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            raise CalqError(f"{path} has no model.safetensors; sequential calibration streams layers from a "
                            "safetensors checkpoint (save the model with save_pretrained first)")
        self.files: dict[str, tuple[Path, str]] = {}
        """Model-side key -> (file, key in the file)."""
        for key, file in stored.items():
            self.files[names.to_model(key) if names else key] = (file, key)

    def load(self, model: nn.Module, names: list[str], device: str, converted: dict[str, str] | None = None) -> None:
        """Replace the (meta) tensors of `model` by the checkpoint's `names`, in the model's dtypes; `converted`:
        the linearized modules, whose checkpoint tensors are rearranged to their nn.Linear form.

        Each file is opened only for the call, so no mapping outlives the layer that needed it.
        """
        current = model.state_dict()
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name in self.files:
                by_file.setdefault(self.files[name][0], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt", device=device) as f:
                tensors.update({k: f.get_tensor(self.files[k][1]) for k in keys})
        if converted:
            tensors = checkpoint_tensors(converted, model, "", tensors)
        model.load_state_dict({k: t.to(current[k].dtype) for k, t in tensors.items() if k in current},
                              strict=False, assign=True)


class Streamed(Resident):
    """A checkpoint on disk: a model skeleton on the meta device whose parts are loaded from disk only while
    they are needed and dropped back to meta after."""

    def __init__(self, source: ModelConfig, device: str | None = None) -> None:
        path = Path(resolve_model_path(source.source))
        if not path.is_dir():
            raise CalqError(f"sequential calibration needs a local checkpoint directory, got {source.source!r}; "
                            "download the model (huggingface-cli download) and point model.source at it")
        with torch.device("cpu"), init_empty_weights():  # parameters on meta, buffers (rotary frequencies) on CPU
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=source.torch_dtype)
        self.ckpt = _Checkpoint(path, HubNames(model))
        super().__init__(model.eval().requires_grad_(False))
        self.device, self.home = torch.device(device) if device else source.torch_device, torch.device("cpu")

    def _rest(self) -> list[str]:
        return [k for k in self.model.state_dict() if not k.startswith(self.prefix)]

    def _load_rest(self, model: nn.Module, device) -> None:
        self.ckpt.load(model, [k for k in self.ckpt.files if not k.startswith(self.prefix)], str(device),
                       self.converted)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(self.prefix)]
        if missing:
            raise CalqError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                            "re-save the model with save_pretrained")

    @contextlib.contextmanager
    def rest(self) -> Iterator[None]:
        self._load_rest(self.model, self.device)
        try:
            yield
        finally:
            current = self.model.state_dict()
            self.model.load_state_dict({k: current[k].to("meta") for k in self._rest()}, strict=False, assign=True)
            self.model.tie_weights()

    def load(self, i: int) -> nn.Module:
        layer = self.layers[i]
        self.ckpt.load(self.model, [k for k in self.ckpt.files if k.startswith(f"{layer.name}.")], str(self.device),
                       {n: c for n, c in self.converted.items() if n.startswith(f"{layer.name}.")})
        return layer.module

    def release(self, i: int) -> None:
        self.layers[i].module.to("meta")

    def variant_model(self, layers: dict[str, nn.Module]) -> nn.Module:
        model = super().variant_model(layers)  # meta tensors: free to copy
        self._load_rest(model, self.home)
        return model


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------

class Visitor(Protocol):
    """What the walk drives per layer: one quantized variant (quant.methods.variant)."""

    needs_stats: bool
    """Whether it reads the float model's activation statistics."""
    needs_inputs: bool
    """Whether it runs calibration samples through its own copies of the layers."""

    def samples(self, samples: list[Tensor]) -> list[Tensor]:
        """The samples it runs through its own copies of the layers (if it needs inputs)."""

    def visit(self, layer: Layer, inputs: LayerInputs | None, stats: dict[str, LayerStats],
              probe: LayerInputs | None = None) -> list[Tensor] | None:
        """Handle float `layer` (do not change it), on its own `inputs`; return its inputs for the next layer.
        `probe`: one short sample's inputs of the float layer (to trace its structure on)."""

    def finish(self, source: Resident, stats: ActivationStats | None) -> None:
        """Complete the variant after the last layer."""


@torch.no_grad()
def walk(source: Resident, samples: list[Tensor], visitors: Sequence[Visitor] = (),
         stats: ActivationStats | None = None, meta: dict | None = None) -> ActivationStats | None:
    """One pass over `source`'s decoder layers: the float model's activation statistics (unless `stats` are given
    or no visitor needs them) and every visitor's layers. Returns the statistics."""
    record = stats is None and (not visitors or any(v.needs_stats for v in visitors))
    if not samples and (record or any(v.needs_inputs for v in visitors)):
        raise CalqError("no calibration samples to calibrate on; select samples first")
    wanted = [v.samples(samples) if v.needs_inputs else None for v in visitors]
    with route_all_experts():  # every expert sees every calibration token; outputs as routed
        return _walk(source, samples, visitors, stats, meta, record, wanted)


def _walk(source: Resident, samples: list[Tensor], visitors: Sequence[Visitor], stats: ActivationStats | None,
          meta: dict | None, record: bool, wanted: list) -> ActivationStats | None:
    with source.rest():
        fp = source.inputs(samples) if record else None
        tracks = [source.inputs(s) if s is not None else None for s in wanted]
        probe = source.inputs([samples[0][:PROBE_TOKENS]]) if samples and visitors else None
    layer_stats: dict[str, LayerStats] = dict(stats.layers) if stats is not None else {}
    for i, layer in enumerate(tqdm(source.layers, desc="calibrate", unit="layer")):
        module = source.load(i)
        if fp is not None:
            if i == 0:
                source.tuple_out = isinstance(module(fp.hidden[0], **fp.kwargs[0][0]), tuple)
            with recording(module, layer.name) as recorded:
                fp.hidden = fp.at(i).run(module)
            layer_stats.update(recorded)
        for visitor, track in zip(visitors, tracks):
            hidden = visitor.visit(Layer(layer.name, module), track.at(i) if track is not None else None, layer_stats,
                                   probe.at(i) if probe is not None else None)
            if track is not None:
                track.hidden = hidden
        if probe is not None:
            probe.hidden = probe.at(i).run(module)
        source.release(i)
    if fp is not None:
        with source.rest():
            layer_stats.update(source.head_stats(fp.hidden, samples))
        stats = ActivationStats(layers=layer_stats, meta=dict(meta or {}, samples=len(samples)))
    for visitor in visitors:
        visitor.finish(source, stats)
    return stats


def collect_stats(model: nn.Module, samples: list[Tensor], meta: dict | None = None) -> ActivationStats:
    """Per-channel statistics of every nn.Linear input of `model` over `samples` (1-D tensors of token ids, run
    one at a time, so variable lengths need no padding)."""
    return walk(Resident(model), samples, meta=meta)
