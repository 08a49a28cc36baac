"""Recipes: one YAML file says what to do. The schema is the stage configs themselves, composed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import yaml
from accelerate import init_empty_weights
from pydantic import Field, ValidationError, model_validator
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quant.calibrate import SequentialConfig
from quant.confidence import SUFFIX, RecalibrateConfig
from quant.confidence.probe import ProbeConfig
from quant.data import SelectConfig
from quant.errors import CalqError
from quant.checks import REFERENCE, EvalConfig, GateRule
from quant.checks.evaluation import split_metric
from quant.checks.tasks import task_sections
from quant.data.tasks import load_task
from quant.formats import ExportConfig
from quant.formats.exporter import export_problems
from quant.methods import METHODS, QuantSpec, is_ignored
from quant.models import ModelConfig, linearize, resolve_model_path
from quant.schema import StrictModel

MIN_PROBE_ITEMS = 16
"""Fewest fit items a probe is fitted on."""
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
    probe: ProbeConfig | None = None
    """A confidence probe per model (quant/confidence/probe.py), fitted on the fit split of MMLU or of a
    multiple-choice task, reported against the model's own confidence and saved with each checkpoint; null = none."""
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
    def _cross_checks(self) -> Recipe:
        names = [q.name for q in self.quantize]
        found = [f"export variant {e.variant!r} is not one of the quantize variants {names}"
                 for e in self.export if e.variant not in names]
        if self.evaluation.mmlu is None:
            found += [f"gate on {g.metric} but evaluation.mmlu is off" for g in self.gates if g.metric.startswith("mmlu.")]
        sections = {s: m for t in self.evaluation.tasks for s, m in task_sections(t).items()}
        sections.update(self.evaluation.lm_eval.sections() if self.evaluation.lm_eval else {})
        for g in self.gates:
            section, name = split_metric(g.metric)
            if not section.startswith("task."):
                continue
            if section not in sections:
                found.append(f"gate on {g.metric}: no such task section; evaluation.tasks has "
                             f"{', '.join(sections) or 'none'}")
            elif name not in sections[section]:
                found.append(f"gate on {g.metric}: {section} reports {', '.join(m for m in sections[section] if m != 'n')}")
        found += self._probe_problems()
        if found:
            raise ValueError("; ".join(found))
        return self

    def _probe_problems(self) -> list[str]:
        if self.probe is None:
            return []
        if self.probe.source == "mmlu":
            return [] if self.evaluation.mmlu is not None else ["probe.source mmlu but evaluation.mmlu is off; turn it "
                                                                "on or name a multiple-choice task"]
        choice = [t.name for t in self.evaluation.tasks if t.kind == "multiple_choice"]
        if self.probe.source not in choice:
            return [f"probe.source {self.probe.source!r} is neither mmlu nor a multiple-choice task of "
                    f"evaluation.tasks ({', '.join(choice) or 'none'})"]
        return []

    @property
    def run_dir(self) -> Path:
        return Path(self.output.format(name=self.name))

    def section_hash(self, *sections: str) -> str:
        """A fingerprint of the sections a stage depends on, to tell whether its cached output is stale."""
        data = {s: self.model_dump(mode="json")[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _error_line(err: ValidationError, path: Path) -> str:
    """Every problem pydantic found, in one line."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"unknown recipe key '{where}'; remove it or check its spelling" if e["type"] == "extra_forbidden"
                     else f"recipe key '{where}': {e['msg'].removeprefix('Value error, ')}")
    return f"{path}: " + "; ".join(lines)


def model_problems(recipe: Recipe) -> list[str]:
    """What the recipe asks of its model that the model's shapes rule out (a method its architecture cannot run, an
    export its layer widths cannot take), read from config.json alone on a meta-device skeleton: seconds, before
    any weight is loaded. A hub id is checked when it loads."""
    path = Path(resolve_model_path(recipe.model.source))
    if not (path / "config.json").is_file():
        return []
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=recipe.model.torch_dtype)
    linearize(model)  # as the walk will see it: Conv1D and fused experts as nn.Linear
    found = []
    for spec in recipe.quantize:
        check = METHODS[spec.method].check_model
        try:
            if check is not None:
                check(model)
        except CalqError as err:
            found.append(f"variant {spec.name}: {err}")
    specs = {q.name: q for q in recipe.quantize}
    for e in recipe.export:
        spec = specs[e.variant]
        shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and not is_ignored(n, spec.ignore)}
        found += [f"export {e.format} of {spec.name}: {p}" for p in export_problems(e.format, spec, shapes, config)]
    return found


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
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise CalqError(_error_line(err, path)) from err
    if recipe.evaluation.lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
        raise CalqError(f"{path}: evaluation.lm_eval needs the lm-eval extra: pip install 'calq[lm-eval]' "
                        "(lm-eval==0.4.13)")
    for task in recipe.evaluation.tasks:  # every task file read and checked before any model loads
        try:
            loaded = load_task(task)
        except CalqError as err:
            raise CalqError(f"{path}: {err}") from err
        if recipe.probe is not None and recipe.probe.source == task.name and len(loaded.fit) < MIN_PROBE_ITEMS:
            raise CalqError(f"{path}: probe.source {task.name}: only {len(loaded.fit)} items in its fit split, a probe "
                            f"needs {MIN_PROBE_ITEMS}; add items to the task or use probe.source: mmlu")
    found = model_problems(recipe)
    if found:
        raise CalqError(f"{path}: " + "; ".join(found))
    return recipe
