"""Release gate: thresholds from the recipe, checked on every quantized variant against the reference.

A rule names one metric (`text.ece`, `text.perplexity`, `mmlu.accuracy`, ...) and exactly one bound:
an absolute `max`/`min`, or a change against full precision (`max_increase`, `max_ratio`, `max_drop`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import model_validator

from quant.cache import CalqError, write_text_atomic
from quant.evaluate import ModelEval
from quant.schema import StrictModel

BOUNDS = ("max", "min", "max_increase", "max_ratio", "max_drop")


class GateRule(StrictModel):
    metric: str
    max: float | None = None
    min: float | None = None
    max_increase: float | None = None
    max_ratio: float | None = None
    max_drop: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> GateRule:
        given = [b for b in BOUNDS if getattr(self, b) is not None]
        if len(given) != 1:
            raise ValueError(f"gate on {self.metric!r} needs exactly one of {', '.join(BOUNDS)} (got {given or 'none'})")
        if self.metric.split(".")[0] not in ("text", "mmlu") or "." not in self.metric:
            raise ValueError(f"gate metric {self.metric!r} must look like text.<name> or mmlu.<name>")
        return self

    @property
    def bound(self) -> str:
        return next(b for b in BOUNDS if getattr(self, b) is not None)


@dataclass(frozen=True)
class GateResult:
    variant: str
    metric: str
    bound: str
    threshold: float
    value: float  # the compared quantity: the metric, its increase, ratio or drop
    passed: bool

    def line(self) -> str:
        op = ">=" if self.bound == "min" else "<="
        what = self.metric if self.bound in ("max", "min") else f"{self.metric} {self.bound.removeprefix('max_')}"
        return f"{'PASS' if self.passed else 'FAIL'} {self.variant}: {what} = {self.value:.4f} {op} {self.threshold:g}"


@dataclass
class GateReport:
    results: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps({"passed": self.passed, "results": [asdict(r) for r in self.results]},
                                                 indent=1))

    @classmethod
    def load(cls, path: Path) -> GateReport:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise CalqError(f"cannot read gate verdict {path} ({err}); run `calq run RECIPE` first") from err
        return cls([GateResult(**r) for r in data["results"]])


def _metric(ev: ModelEval, metric: str, variant: str) -> float:
    section, _, name = metric.partition(".")
    values = getattr(ev, section)
    if name not in values:
        raise CalqError(f"gate metric {metric!r} is not measured for {variant!r}; "
                        f"available: {', '.join(f'{section}.{k}' for k in values) or 'none (is that evaluation off?)'}")
    return float(values[name])


def check_gates(results: dict[str, ModelEval], rules: list[GateRule], reference: str) -> GateReport:
    out = []
    for variant, ev in results.items():
        if variant == reference:
            continue
        for rule in rules:
            value = _metric(ev, rule.metric, variant)
            ref = _metric(results[reference], rule.metric, reference)
            bound = rule.bound
            compared = {"max": value, "min": value, "max_increase": value - ref,
                        "max_ratio": value / ref if ref else float("inf"), "max_drop": ref - value}[bound]
            threshold = getattr(rule, bound)
            passed = compared >= threshold if bound == "min" else compared <= threshold
            out.append(GateResult(variant, rule.metric, bound, threshold, compared, bool(passed)))
    return GateReport(out)
