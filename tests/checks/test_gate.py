import copy
import xml.etree.ElementTree as ET

import pytest

from quant.cli import main
from quant.checks.evaluation import BootstrapConfig, Estimate, EvalConfig, ModelEval, collect_text, reduce
from quant.checks.gate import GateRule, check_gates
from quant.confidence.recalibrate import apply_temperature
from tests.confidence.test_recalibrate import moderate, sample_from  # noqa: F401  (fixture)


def _evals(ppl_q: float, ece_q: float):
    return {"fp": ModelEval(text={"perplexity": 20.0, "ece": 0.02, "accuracy": 0.42}),
            "q": ModelEval(text={"perplexity": ppl_q, "ece": ece_q, "accuracy": 0.40})}


RULES = [GateRule(metric="text.perplexity", max_ratio=1.1), GateRule(metric="text.ece", max=0.05),
         GateRule(metric="text.ece", max_increase=0.01), GateRule(metric="text.accuracy", max_drop=0.05)]


def test_gate_on_points_when_there_are_no_intervals(tmp_path, capsys):
    good = check_gates(_evals(21.0, 0.025), RULES, "fp")
    assert good.passed and len(good.results) == 4
    bad = check_gates(_evals(23.0, 0.06), RULES, "fp")
    assert [r.passed for r in bad.results] == [False, False, False, True]
    assert bad.results[0].value == pytest.approx(1.15) and bad.results[0].low is None
    assert bad.results[2].value == pytest.approx(0.04)
    assert bad.results[0].line().startswith("FAIL q: text.perplexity ratio = 1.1500 <= 1.1")
    bad.save(tmp_path / "gate.json")
    assert main(["gate", str(tmp_path)]) == 1
    assert "gate: FAIL (1/4)" in capsys.readouterr().out
    good.save(tmp_path / "gate.json")
    assert main(["gate", str(tmp_path)]) == 0


def _with_intervals():
    fp = ModelEval(text={"ece": 0.02, "accuracy": 0.42, "perplexity": 20.0},
                   intervals={"text.ece": Estimate(0.02, 0.015, 0.03), "text.accuracy": Estimate(0.42, 0.40, 0.44)})
    q = ModelEval(text={"ece": 0.03, "accuracy": 0.40, "perplexity": 21.0},
                  intervals={"text.ece": Estimate(0.03, 0.02, 0.045), "text.accuracy": Estimate(0.40, 0.37, 0.43)},
                  vs_reference={"text.ece": {"difference": Estimate(0.01, 0.004, 0.018)},
                                "text.accuracy": {"difference": Estimate(-0.02, -0.035, -0.006)},
                                "text.perplexity": {"ratio": Estimate(1.05, 1.03, 1.08)}})
    return {"fp": fp, "q": q}


@pytest.mark.parametrize("rule,passed,decisive", [
    (GateRule(metric="text.ece", max=0.04), False, 0.045),  # point 0.03 passes, upper bound does not
    (GateRule(metric="text.ece", max=0.05), True, 0.045),
    (GateRule(metric="text.accuracy", min=0.38), False, 0.37),  # lower bound for min
    (GateRule(metric="text.ece", max_increase=0.015), False, 0.018),  # paired difference, upper bound
    (GateRule(metric="text.accuracy", max_drop=0.03), False, 0.035),  # drop = -difference: [0.006, 0.035]
    (GateRule(metric="text.accuracy", max_drop=0.04), True, 0.035),
    (GateRule(metric="text.perplexity", max_ratio=1.07), False, 1.08),
])
def test_gate_decides_on_the_unfavourable_end_of_the_interval(rule, passed, decisive):
    (r,) = check_gates(_with_intervals(), [rule], "fp").results
    assert r.passed is passed and r.decisive == pytest.approx(decisive)
    if rule.bound == "max_drop":
        assert (r.value, r.low, r.high) == pytest.approx((0.02, 0.006, 0.035))
    assert f"= {r.value:.4f} [{r.low:.4f}, {r.high:.4f}]" in r.line()


def test_gate_verdict_as_markdown_and_junit(tmp_path, capsys):
    rules = [GateRule(metric="text.ece", max=0.04), GateRule(metric="text.ece", max=0.05),
             GateRule(metric="text.perplexity", max_ratio=1.07)]
    report = check_gates(_with_intervals(), rules, "fp")
    report.write(tmp_path)
    md = (tmp_path / "gate.md").read_text()
    assert "**FAIL** (1/3 rules)" in md and "| q | `text.ece <= 0.04` | 0.0300 | [0.0200, 0.0450] | FAIL |" in md
    suites = ET.parse(tmp_path / "gate.xml").getroot()
    (suite,) = suites.findall("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["text.ece <= 0.04", "text.ece <= 0.05", "text.perplexity ratio <= 1.07"]
    assert {c.get("classname") for c in cases} == {"calq.gate.q"}
    failed = [c.find("failure") for c in cases]
    assert failed[1] is None
    assert failed[0].get("message") == report.results[0].line() and failed[0].get("message").startswith("FAIL q")
    assert "1.0800" in failed[2].get("message")
    # the CLI writes the same XML from gate.json
    assert main(["gate", str(tmp_path), "--junit", str(tmp_path / "ci" / "junit.xml")]) == 1
    assert ET.parse(tmp_path / "ci" / "junit.xml").getroot().find("testsuite").get("failures") == "2"
    capsys.readouterr()


@pytest.mark.parametrize("family", ["llama"])
def test_gate_fails_an_overconfident_model_and_passes_a_calibrated_one(moderate):  # noqa: F811
    """`moderate` is calibrated on text sampled from itself; dividing its logits by 0.2 keeps every top-1
    but makes it badly over-confident. The same gates pass the first and fail the second."""
    broken = copy.deepcopy(moderate)
    apply_temperature(broken, 0.2)
    preds = collect_text({"fp": moderate, "good": copy.deepcopy(moderate), "broken": broken}, sample_from(moderate),
                         "fp")
    evals = reduce({"text": preds}, EvalConfig(bootstrap=BootstrapConfig(resamples=300)), "fp")
    rules = [GateRule(metric="text.ece", max=0.08), GateRule(metric="text.ece", max_increase=0.03),
             GateRule(metric="text.accuracy", max_drop=0.01), GateRule(metric="text.perplexity", max_ratio=1.1)]
    report = check_gates(evals, rules, "fp")
    by = {(r.variant, r.rule): r for r in report.results}
    assert all(r.passed for r in report.results if r.variant == "good")
    assert not by[("broken", "text.ece <= 0.08")].passed and not by[("broken", "text.ece increase <= 0.03")].passed
    assert not by[("broken", "text.perplexity ratio <= 1.1")].passed
    assert by[("broken", "text.accuracy drop <= 0.01")].passed  # same top-1: accuracy is unchanged
    assert evals["broken"].text["ece"] > 0.2 and evals["good"].text["ece"] < 0.05
    assert evals["broken"].text["accuracy"] == evals["good"].text["accuracy"]


def test_gate_on_unmeasured_metric_names_what_exists():
    from quant.errors import CalqError
    with pytest.raises(ValueError, match="'text.nope' is not one the evaluation reports; choose from text.accuracy"):
        GateRule(metric="text.nope", max=1)
    with pytest.raises(CalqError, match="'mmlu.accuracy' is not measured .* available: none"):  # MMLU was off
        check_gates(_evals(21, 0.02), [GateRule(metric="mmlu.accuracy", min=0.3)], "fp")


def test_nan_metric_fails_the_gate():
    assert not check_gates(_evals(float("nan"), 0.02), RULES[:1], "fp").passed
    nan = {**_with_intervals()}
    nan["q"].intervals["text.ece"] = Estimate(0.03, float("nan"), float("nan"))
    assert not check_gates(nan, [GateRule(metric="text.ece", max=1)], "fp").passed


def test_cli_gate_without_run(tmp_path, capsys):
    assert main(["gate", str(tmp_path)]) == 2
    assert "run `calq run RECIPE` first" in capsys.readouterr().err


def test_gate_on_coverage_refuses_a_mostly_float_model():
    """`{metric: coverage, min: 0.95}` (or coverage.share) bounds the share of matmul weights quantized; a wrong
    coverage metric name is refused when the rule is read."""
    rule = GateRule.model_validate({"metric": "coverage", "min": 0.95})
    assert rule.metric == "coverage.share"
    results = {"fp": ModelEval(coverage={"share": 0.0}), "mostly-float": ModelEval(coverage={"share": 0.42}),
               "full": ModelEval(coverage={"share": 0.97})}
    report = check_gates(results, [rule], "fp")
    assert [(r.variant, r.passed, r.value) for r in report.results] == [("mostly-float", False, 0.42),
                                                                         ("full", True, 0.97)]
    with pytest.raises(ValueError, match="choose from .*coverage.share"):
        GateRule(metric="coverage.layers", min=0.9)
