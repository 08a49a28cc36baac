"""Release gate: thresholds from the recipe, checked on every shipped variant against the reference.

A rule names one metric (`text.ece`, `text.perplexity`, `mmlu.accuracy`, ...) and exactly one bound:
an absolute `max`/`min`, or a change against full precision (`max_increase`, `max_ratio`, `max_drop`).
The gate decides on the bootstrap interval, not the point: a `max` must hold for the interval's upper
bound, a `min` for its lower bound, and a change uses the paired interval (same resampled windows / items
for both models) of the difference or ratio, again at its unfavourable end. So a pass means "within the
threshold even allowing for sampling noise", and too little evaluation data fails rather than passes.
The verdict is written as JSON (gate.json), Markdown (gate.md) and JUnit XML (gate.xml, one test case
per variant and rule) so CI systems list every gate as a test.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import model_validator

from quant.errors import CalqError
from quant.checks.evaluation import METRICS, ModelEval, split_metric
from quant.checks.tasks import MEAN_TOKEN
from quant.data.tasks import TASK_NAME
from quant.files import write_text_atomic
from quant.schema import StrictModel

BOUNDS = ("max", "min", "max_increase", "max_ratio", "max_drop")


class GateRule(StrictModel):
    metric: str
    max: float | None = None
    min: float | None = None
    max_increase: float | None = None
    max_ratio: float | None = None
    max_drop: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_names(cls, data):
        if isinstance(data, dict) and data.get("metric") == "coverage":  # {metric: coverage, min: 0.95}
            data = {**data, "metric": "coverage.share"}
        return data

    @model_validator(mode="after")
    def _one_bound(self) -> GateRule:
        given = [b for b in BOUNDS if getattr(self, b) is not None]
        if len(given) != 1:
            raise ValueError(f"gate on {self.metric!r} needs exactly one of {', '.join(BOUNDS)} (got {given or 'none'})")
        section, name = split_metric(self.metric)
        if self.metric.startswith("task."):  # the recipe checks the task exists and reports this metric
            if not re.fullmatch(rf"task\.{TASK_NAME}(\.{MEAN_TOKEN})?", section) or not name:
                raise ValueError(f"gate metric {self.metric!r}: task gates are task.<name>.<metric> "
                                 f"(or task.<name>.{MEAN_TOKEN}.<metric> for free text)")
        elif name not in METRICS.get(section, ()):
            known = ", ".join(f"{s}.{m}" for s, names in METRICS.items() for m in names if m != "n") \
                + ", task.<name>.<metric>"
            raise ValueError(f"gate metric {self.metric!r} is not one the evaluation reports; choose from {known}")
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
    value: float  # the compared quantity (the metric, its increase, ratio or drop): point estimate
    low: float | None = None  # ... and its bootstrap interval (None when the evaluation had none)
    high: float | None = None
    passed: bool = False

    @property
    def decisive(self) -> float:
        """The end of the interval the threshold is checked against (the point when there is no interval)."""
        end = self.low if self.bound == "min" else self.high
        return self.value if end is None else end

    def _what_op(self) -> tuple[str, str]:
        what = self.metric if self.bound in ("max", "min") else f"{self.metric} {self.bound.removeprefix('max_')}"
        return what, ">=" if self.bound == "min" else "<="

    @property
    def rule(self) -> str:
        what, op = self._what_op()
        return f"{what} {op} {self.threshold:g}"

    def line(self) -> str:
        what, op = self._what_op()
        interval = "" if self.low is None else (f" [{self.low:.4f}, {self.high:.4f}], "
                                                f"{'lower' if self.bound == 'min' else 'upper'} bound")
        return f"{'PASS' if self.passed else 'FAIL'} {self.variant}: {what} = {self.value:.4f}{interval} {op} {self.threshold:g}"


@dataclass
class GateReport:
    results: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps({"passed": self.passed, "results": [asdict(r) for r in self.results]},
                                                 indent=1))

    def markdown(self) -> str:
        passed = sum(r.passed for r in self.results)
        lines = [f"Gate: **{'PASS' if self.passed else 'FAIL'}** ({passed}/{len(self.results)} rules); "
                 "decided on the unfavourable end of the 95% bootstrap interval.", "",
                 "| variant | rule | value | interval | verdict |", "|---|---|---|---|---|"]
        for r in self.results:
            interval = "-" if r.low is None else f"[{r.low:.4f}, {r.high:.4f}]"
            lines.append(f"| {r.variant} | `{r.rule}` | {r.value:.4f} | {interval} | {'PASS' if r.passed else 'FAIL'} |")
        return "\n".join(lines) + "\n"

    def junit(self) -> str:
        """JUnit XML: one test case per variant and rule; a failed gate is a failure whose message is its line."""
        failures = sum(not r.passed for r in self.results)
        suites = ET.Element("testsuites", name="calq", tests=str(len(self.results)), failures=str(failures))
        suite = ET.SubElement(suites, "testsuite", name="calq.gate", tests=str(len(self.results)),
                              failures=str(failures), errors="0", skipped="0")
        for r in self.results:
            case = ET.SubElement(suite, "testcase", classname=f"calq.gate.{r.variant}", name=r.rule)
            if not r.passed:
                ET.SubElement(case, "failure", message=r.line(), type="GateFailure").text = r.line()
            else:
                ET.SubElement(case, "system-out").text = r.line()
        ET.indent(suites)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"

    def write(self, run_dir: Path) -> None:
        """gate.json, gate.md and gate.xml in `run_dir`."""
        self.save(Path(run_dir) / "gate.json")
        write_text_atomic(Path(run_dir) / "gate.md", self.markdown())
        write_text_atomic(Path(run_dir) / "gate.xml", self.junit())

    @classmethod
    def load(cls, path: Path) -> GateReport:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise CalqError(f"cannot read gate verdict {path} ({err}); run `calq run RECIPE` first") from err
        return cls([GateResult(**r) for r in data["results"]])


def _metric(ev: ModelEval, metric: str, variant: str) -> float:
    section, name = split_metric(metric)
    values = ev.section(section)
    if name not in values:
        raise CalqError(f"gate metric {metric!r} is not measured for {variant!r}; "
                        f"available: {', '.join(f'{section}.{k}' for k in values) or 'none (is that evaluation off?)'}")
    return float(values[name])


def _compared(ev: ModelEval, ref: ModelEval, rule: GateRule, variant: str, reference: str
              ) -> tuple[float, float | None, float | None]:
    """(point, low, high) of the quantity a rule bounds: the metric's own interval for max/min, else the
    paired interval of the difference or ratio against the reference (drop = -difference, so it flips).
    No interval (None) when the evaluation carries none, e.g. a ModelEval built by hand."""
    value, ref_value = _metric(ev, rule.metric, variant), _metric(ref, rule.metric, reference)
    bound = rule.bound
    if bound in ("max", "min"):
        est = ev.intervals.get(rule.metric)
        return (est.value, est.low, est.high) if est else (value, None, None)
    change = ev.vs_reference.get(rule.metric)
    if bound == "max_ratio":
        est = change["ratio"] if change else None
        return (est.value, est.low, est.high) if est else (value / ref_value if ref_value else math.inf, None, None)
    est = change["difference"] if change else None
    point, low, high = (est.value, est.low, est.high) if est else (value - ref_value, None, None)
    if bound == "max_increase":
        return point, low, high
    return -point, None if high is None else -high, None if low is None else -low


def check_gates(results: dict[str, ModelEval], rules: list[GateRule], reference: str,
                variants: list[str] | None = None) -> GateReport:
    """Check every rule on `variants` (default: every model but the reference)."""
    out = []
    for variant in variants if variants is not None else [n for n in results if n != reference]:
        for rule in rules:
            value, low, high = _compared(results[variant], results[reference], rule, variant, reference)
            threshold = getattr(rule, rule.bound)
            unchecked = GateResult(variant, rule.metric, rule.bound, threshold, value, low, high)
            decisive = unchecked.decisive
            passed = decisive >= threshold if rule.bound == "min" else decisive <= threshold  # NaN fails
            out.append(GateResult(variant, rule.metric, rule.bound, threshold, value, low, high, bool(passed)))
    return GateReport(out)
