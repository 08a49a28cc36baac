"""One quantized variant of a model: its spec (scheme, method, options), and the verbs that make it.

`quantize_variant` makes one variant of a model in memory; `quantize_variants` makes several in one walk over the
decoder layers of a model in memory or a checkpoint streamed from disk, with the activation statistics on the way.
Both run the spec's method through the walk (quant.calibrate.walker) and end in the shared quantizer, so every
method sees the same calibration samples and statistics and comparisons are fair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import model_validator
from torch import Tensor, nn

from quant.calibrate.stats import ActivationStats, LayerStats, recording
from quant.calibrate.walker import LayerInputs, Propagate, Resident, calibration_subset, walk
from quant.errors import CalqError
from quant.methods.quantizer import Coverage, Quantized, coverage, quantize_linears
from quant.methods.schemes import PRESETS, ActScheme, WeightScheme
from quant.methods.step import LayerCall, LayerChange
from quant.methods.table import METHODS
from quant.models import Layer
from quant.schema import StrictModel

Preset = Literal[tuple(PRESETS)]


def _merged(preset: dict, given: dict) -> dict:
    out = {**preset}
    for key, value in given.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class QuantSpec(StrictModel):
    """One quantized variant: a scheme (compressed-tensors' weights / input_activations, or a preset name that fills
    them, its keys overridable), a method from the method table with its options, and the linears kept in full
    precision."""

    renamed = {"activations": "input_activations (e.g. {dynamic: true})", "smoothquant": "options",
               "awq": "options", "gptq": "options"}
    name: str
    scheme: Preset | None = None
    """A preset (W4A16, W4A16_ASYM, W8A8): its weights and input_activations, which the keys below override."""
    weights: WeightScheme
    input_activations: ActScheme | None = None
    method: str = "minmax"
    options: dict[str, Any] = {}
    """The method's options (see its config class in quant/methods/); validated at load."""
    ignore: tuple[str, ...] = ("lm_head",)
    """fnmatch patterns of module names kept in full precision (embeddings are never nn.Linear)."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        cls.refuse_renamed(data)
        if data.get("scheme") is not None:
            if data["scheme"] not in PRESETS:
                raise ValueError(f"unknown scheme {data['scheme']!r}; presets: {', '.join(PRESETS)}")
            data = _merged(PRESETS[data["scheme"]], data)
        if data.get("weights") is None:
            raise ValueError(f"variant {data.get('name')!r} has no weights: give a scheme "
                             f"({', '.join(PRESETS)}) or weights: {{num_bits, group_size, symmetric}}")
        return data

    @model_validator(mode="after")
    def _check(self) -> QuantSpec:
        if self.method not in METHODS:
            raise ValueError(f"variant {self.name!r}: unknown method {self.method!r}; methods: {', '.join(METHODS)}")
        method = METHODS[self.method]
        try:
            options = method.options.model_validate(self.options)
        except ValueError as err:
            raise ValueError(f"variant {self.name!r}: options of {self.method}: {err.errors()[0]['msg']} "
                             f"({'.'.join(str(p) for p in err.errors()[0]['loc'])})") from None
        object.__setattr__(self, "options", options.model_dump())
        if self.input_activations is not None and self.weights.num_bits != 8:
            raise ValueError(f"variant {self.name!r}: int8 activations need 8-bit weights (W8A8); "
                             "remove input_activations for weight-only W4A16")
        acts = self.input_activations
        if self.weights.type == "float" and (acts is None or acts.type != "float"):
            raise ValueError(f"variant {self.name!r}: FP8 weights run with FP8 activations; use scheme FP8_DYNAMIC")
        if acts is not None and acts.type != self.weights.type:
            raise ValueError(f"variant {self.name!r}: {acts.type} activations with {self.weights.type} weights; "
                             "calq runs int8 x int8 (W8A8) or FP8 x FP8 (FP8_DYNAMIC)")
        if self.weights.type == "float" and method.integer_only:
            raise ValueError(f"variant {self.name!r}: {self.method} picks integer codes; use minmax or smoothquant "
                             "with FP8")
        if method.needs_activations and self.input_activations is None:
            raise ValueError(f"variant {self.name!r}: {self.method} only helps quantized activations; use scheme "
                             "W8A8 or add input_activations: {dynamic: true} (or {dynamic: false} for static)")
        return self

    @property
    def config(self) -> StrictModel:
        """The method's options as its typed config."""
        return METHODS[self.method].options.model_validate(self.options)

    @property
    def static_activations(self) -> bool:
        return self.input_activations is not None and not self.input_activations.dynamic


@dataclass
class QuantizeResult:
    model: nn.Module
    spec: QuantSpec
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Linear layers left in full precision, with the reason (shown in the report and to the gate)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Work the method left undone (a smoothing group it cannot fold), with the reason (shown in the report)."""
    converted: dict[str, str] = field(default_factory=dict)
    """Modules converted to nn.Linear before the walk (Conv1D, fused experts; quant.models.linearize)."""
    coverage: Coverage | None = None
    """Share of the model's matmul weights quantized, and every one kept with the reason."""

    def weight_bytes(self) -> int:
        """Bytes of all parameters and buffers as stored (packed codes count at their packed size)."""
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())


class _Variant:
    """One variant on the walk: per decoder layer, a copy of the float layer transformed by the method and
    quantized; at the end, the rest of the model around the quantized layers."""

    def __init__(self, spec: QuantSpec, source: Resident, propagate: Propagate, rounded: bool = True) -> None:
        self.spec, self.method, self.propagate, self.rounded = spec, METHODS[spec.method], propagate, rounded
        self.model_type = getattr(source.model.config, "model_type", None)
        if self.method.check_model is not None:
            self.method.check_model(source.model)
        self.home = source.home
        self.needs_stats = self.method.needs_stats or spec.static_activations
        self.needs_inputs = self.method.needs_inputs or (propagate == "quantized" and self.needs_stats)
        self.layers: dict[str, nn.Module] = {}
        self.done = Quantized()
        self.skipped: dict[str, str] = {}
        self.result: QuantizeResult | None = None

    def samples(self, samples: list[Tensor]) -> list[Tensor]:
        if self.method.needs_inputs:
            return calibration_subset(samples, self.spec.config.max_tokens)
        return samples  # propagate="quantized": its statistics come from its own layers

    def visit(self, fp: Layer, inputs: LayerInputs | None, stats: dict[str, LayerStats],
              probe: LayerInputs | None = None) -> list[Tensor] | None:
        layer = Layer(fp.name, copy.deepcopy(fp.module))
        if inputs is not None and self.propagate == "quantized" and self.needs_stats:
            with recording(layer.module, layer.name) as stats:  # on the inputs this variant's layers see
                inputs.run(layer.module)
        change = LayerChange()
        if self.method.transform is not None:
            change = self.method.transform(LayerCall(layer, self.model_type, self.spec.weights,
                                                     self.spec.input_activations, self.spec.ignore, self.spec.config,
                                                     stats, inputs, probe))
        self.skipped.update(change.skipped)
        hidden = None
        if inputs is not None and self.propagate == "float":  # GPTQ's layer already holds its dequantized codes
            hidden = inputs.run(layer.module)
        if self.rounded:
            self.done.add(quantize_linears(layer.module, self.spec.weights, self.spec.input_activations,
                                           self.spec.ignore, {**stats, **change.stats}, change.codes,
                                           prefix=layer.name))
        if inputs is not None and self.propagate == "quantized":
            hidden = inputs.run(layer.module)
        self.layers[layer.name] = layer.module.to(self.home)
        return hidden

    def finish(self, source: Resident, stats: ActivationStats | None) -> None:
        """The variant's model: the rest of the float model around its quantized layers, the linears among the rest
        quantized too (the output head is usually ignored)."""
        model = source.variant_model(self.layers)
        if not self.rounded:
            self.result = QuantizeResult(model, self.spec, skipped=self.skipped, converted=source.converted)
            return
        self.done.add(quantize_linears(model, self.spec.weights, self.spec.input_activations, self.spec.ignore,
                                       stats.layers if stats is not None else None, skip=source.prefix))
        cover = coverage(model, self.done.kept)
        self.result = QuantizeResult(model, self.spec, self.done.quantized, cover.kept, self.skipped,
                                     source.converted, cover)


def quantize_variants(source: Resident, samples: list[Tensor], specs: list[QuantSpec] | tuple[QuantSpec, ...],
                      stats: ActivationStats | None = None, propagate: Propagate = "float",
                      meta: dict | None = None, rounded: bool = True
                      ) -> tuple[ActivationStats | None, dict[str, QuantizeResult]]:
    """Every variant of `specs` in one walk over `source` (a model in memory, `Resident`, or a checkpoint on disk,
    `Streamed`), with the float model's activation statistics on the way unless `stats` are given; the source is
    never changed. Returns the statistics and the variants by name. `rounded=False` stops before the quantizer: each
    variant is the method's float model (SmoothQuant's or AWQ's scales folded in, AWQ's clipping, GPTQ's codes
    dequantized)."""
    variants = [_Variant(spec, source, propagate, rounded) for spec in specs]
    wanted = [v.spec.name for v in variants if v.method.needs_inputs or (v.needs_stats and stats is None)]
    if wanted and not samples:
        raise CalqError(f"{', '.join(wanted)} need calibration samples (method or static activation scales); "
                        "select samples first")
    stats = walk(source, samples, variants, stats, meta)
    return stats, {v.spec.name: v.result for v in variants}


def quantize_variant(model: nn.Module, spec: QuantSpec, stats: ActivationStats | None = None,
                     samples: list[Tensor] | None = None) -> QuantizeResult:
    """A quantized copy of `model` as `spec` says: its method (on `samples`, and `stats` when it reads statistics;
    they are collected on the way when not given), then the shared quantizer. The input model is never modified."""
    return quantize_variants(Resident(model), samples or [], [spec], stats)[1][spec.name]


def transformed(model: nn.Module, spec: QuantSpec, stats: ActivationStats | None = None,
                samples: list[Tensor] | None = None) -> nn.Module:
    """The float model `spec`'s method makes of `model` before rounding (to inspect a transform, or hand it to
    another quantizer); the input model is never modified."""
    return quantize_variants(Resident(model), samples or [], [spec], stats, rounded=False)[1][spec.name].model
