"""Recipes: one YAML file says what to do. The schema is the stage configs themselves, composed."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from quant.calibrate import SequentialConfig
from quant.confidence import SUFFIX, RecalibrateConfig
from quant.data import SelectConfig
from quant.errors import CalqError
from quant.evaluate import REFERENCE, EvalConfig, GateRule
from quant.formats import ExportConfig
from quant.methods import QuantSpec
from quant.models import ModelConfig
from quant.schema import StrictModel

VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Variant names are directory names under the run directory: letters, digits, '.', '_' and '-' only."""


class Recipe(StrictModel):
    name: str
    model: ModelConfig = ModelConfig()
    calibration: SelectConfig = SelectConfig()
    quantize: tuple[QuantSpec, ...] = Field(min_length=1)
    evaluation: EvalConfig = EvalConfig()
    gates: tuple[GateRule, ...] = ()
    export: tuple[ExportConfig, ...] = ()
    """Checkpoints for other runtimes, written to <run dir>/export/<variant>-<format> after the gates."""
    recalibrate: RecalibrateConfig | None = None
    """Temperature re-calibration of every variant after quantization (fitted on the calibration samples,
    folded into the saved checkpoint, which is what the gates check); null = off."""
    sequential: SequentialConfig | None = None
    """Calibrate layer by layer from the checkpoint on disk (peak memory ~ one layer); null = whole model."""
    output: str = "runs/{name}"
    """Run directory; `{name}` is replaced by the recipe name. Relative to the working directory."""

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [q.name for q in self.quantize]
        unsafe = [n for n in names if not VARIANT_NAME.fullmatch(n)]
        if unsafe:
            raise ValueError(f"variant name {unsafe[0]!r} is not a plain directory name: use letters, digits, '.', "
                             "'_' and '-' (it names run_dir/models/<variant>)")
        if len(set(names)) != len(names) or REFERENCE in names or any(n.endswith(SUFFIX) for n in names):
            raise ValueError(f"quantize variant names must be unique, not {REFERENCE!r} and not end in {SUFFIX!r} "
                             f"(got {names})")
        return self

    @model_validator(mode="after")
    def _export_variants(self) -> Recipe:
        names = [q.name for q in self.quantize]
        for e in self.export:
            if e.variant not in names:
                raise ValueError(f"export variant {e.variant!r} is not one of the quantize variants {names}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.format(name=self.name))

    def section_hash(self, *sections: str) -> str:
        """A fingerprint of the sections a stage depends on, to tell whether its cached output is stale."""
        data = {s: self.model_dump(mode="json")[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _error_line(err: ValidationError, path: Path) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown recipe key '{where}'; remove it or check its spelling"
    return f"{path}: recipe key '{where}': {first['msg']}"


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CalqError(f"recipe {path} does not exist; pass a YAML file such as recipes/default.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CalqError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise CalqError(f"{path}: a recipe is a YAML mapping with keys name, model, calibration, quantize, ...")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise CalqError(_error_line(err, path)) from err
