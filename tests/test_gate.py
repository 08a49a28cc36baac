import pytest

from quant.cli import main
from quant.evaluate import ModelEval
from quant.gate import GateRule, check_gates


def _evals(ppl_q: float, ece_q: float):
    return {"fp": ModelEval(text={"perplexity": 20.0, "ece": 0.02, "accuracy": 0.42}),
            "q": ModelEval(text={"perplexity": ppl_q, "ece": ece_q, "accuracy": 0.40})}


RULES = [GateRule(metric="text.perplexity", max_ratio=1.1), GateRule(metric="text.ece", max=0.05),
         GateRule(metric="text.ece", max_increase=0.01), GateRule(metric="text.accuracy", max_drop=0.05)]


def test_gate_passes_and_fails_on_the_right_rules(tmp_path, capsys):
    good = check_gates(_evals(21.0, 0.025), RULES, "fp")
    assert good.passed and len(good.results) == 4
    bad = check_gates(_evals(23.0, 0.06), RULES, "fp")
    assert [r.passed for r in bad.results] == [False, False, False, True]
    assert bad.results[0].value == pytest.approx(1.15)
    assert bad.results[2].value == pytest.approx(0.04)
    assert bad.results[0].line().startswith("FAIL q: text.perplexity ratio = 1.1500 <= 1.1")
    bad.save(tmp_path / "gate.json")
    assert main(["gate", str(tmp_path)]) == 1
    assert "gate: FAIL (1/4)" in capsys.readouterr().out
    good.save(tmp_path / "gate.json")
    assert main(["gate", str(tmp_path)]) == 0


def test_gate_on_unmeasured_metric_names_what_exists():
    from quant.cache import CalqError
    with pytest.raises(CalqError, match="available: text.perplexity"):
        check_gates(_evals(21, 0.02), [GateRule(metric="text.nope", max=1)], "fp")


def test_nan_metric_fails_the_gate():
    assert not check_gates(_evals(float("nan"), 0.02), RULES[:1], "fp").passed


def test_cli_gate_without_run(tmp_path, capsys):
    assert main(["gate", str(tmp_path)]) == 2
    assert "run `calq run RECIPE` first" in capsys.readouterr().err
