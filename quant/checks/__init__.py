"""Evaluation: full precision against every variant on the same held-out data (evaluation, distributed), the
release gate, the report and its plots."""

from quant.checks.evaluation import REFERENCE, EvalConfig, ModelEval, eval_windows, evaluate
from quant.checks.gate import GateReport, GateRule, check_gates

__all__ = ["REFERENCE", "EvalConfig", "GateReport", "GateRule", "ModelEval", "check_gates", "eval_windows", "evaluate"]
