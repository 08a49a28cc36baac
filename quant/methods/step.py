"""What every method is: a typed config, and a transform of one decoder layer at a time that the walk calls.

A method is one entry of quant.methods.table: adding one is a file holding its config, its per-layer
transform and its `Method` entry, plus one line in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import Field
from torch import nn

from quant.calibrate.stats import LayerStats
from quant.calibrate.walker import LayerInputs
from quant.methods.schemes import ActScheme, Codes, WeightScheme
from quant.models import Layer
from quant.schema import StrictModel


class TokenBudget(StrictModel):
    """Options of a method that runs its layers on calibration inputs: how many tokens it sees."""

    max_tokens: int = Field(8192, ge=1)
    """Calibration tokens run through the layers (whole samples, evenly spaced); run time grows with it."""


class NoOptions(StrictModel):
    """A method without options."""


@dataclass(frozen=True)
class LayerCall:
    """What a method's transform sees of one decoder layer: a copy of the float layer, its to change in place."""

    layer: Layer
    model_type: str | None
    weights: WeightScheme
    activations: ActScheme | None
    ignore: tuple[str, ...]
    options: StrictModel
    stats: dict[str, LayerStats]
    """Statistics of the float model's linear inputs (every layer's; empty if the method needs none)."""
    inputs: LayerInputs | None
    """This layer's calibration inputs (methods with a TokenBudget), from the layers before it as changed."""
    probe: LayerInputs | None = None
    """One short calibration sample's inputs of this float layer, to trace its smoothing groups on (None without
    samples)."""


@dataclass
class LayerChange:
    """What a transform reports back besides the changed weights."""

    stats: dict[str, LayerStats] = field(default_factory=dict)
    """Statistics of linears whose inputs it changed (SmoothQuant divides them by its scales)."""
    codes: dict[str, Codes] = field(default_factory=dict)
    """Codes it chose itself (GPTQ), stored instead of rounding the float weight."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Work it left undone, with the reason (a smoothing group it cannot fold): counted in the report."""


@dataclass(frozen=True)
class Method:
    name: str
    options: type[StrictModel]
    """Its config; a TokenBudget subclass means it runs on calibration inputs."""
    transform: Callable[[LayerCall], LayerChange] | None
    """None: the float layer is quantized as it is (min-max rounding)."""
    needs_stats: bool = False
    """Reads the float model's activation statistics."""
    needs_activations: bool = False
    """Only helps quantized activations (SmoothQuant): refused for weight-only schemes."""
    integer_only: bool = True
    """Picks or searches integer codes (AWQ, GPTQ): refused for FP8 schemes."""
    check_model: Callable[[nn.Module], object] | None = None
    """Called with the model (a meta skeleton when streamed) before any work; raises CalqError if the method
    cannot handle it."""

    @property
    def needs_inputs(self) -> bool:
        return issubclass(self.options, TokenBudget)
