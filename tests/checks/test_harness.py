"""The lm-eval bridge against lm-eval's own HFLM on the same tiny model and a local (offline) task."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from quant.checks import GateRule, check_gates  # noqa: E402
from quant.checks.evaluation import BootstrapConfig, EvalConfig, LMEvalConfig, TextEvalConfig, evaluate  # noqa: E402
from quant.confidence import Tempered, metrics  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "river", "market", "film", "score", "theory", "planet", "music"]

TASK = """task: calq_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.parametrize("family", ["llama"])
def test_the_bridge_reproduces_lm_evals_own_accuracy(tiny_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(0)
    rows = [{"question": " ".join(rng.choice(WORDS, 3)), "choices": [" ".join(rng.choice(WORDS, k)) for k in (1, 2, 3)],
             "answer": int(rng.integers(3))} for _ in range(16)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    theirs = simple_evaluate(model=HFLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=4, device="cpu"),
                             tasks=["calq_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                             log_samples=True, bootstrap_iters=0)
    cfg = EvalConfig(text=TextEvalConfig(windows=1, seq_len=32), mmlu=None, bootstrap=BootstrapConfig(resamples=50),
                     lm_eval=LMEvalConfig(tasks=["calq_tiny_mc"], include_path=str(tmp_path), batch_size=5))
    evals = evaluate({"fp": tiny_model, "fp+T": Tempered("fp", 2.0)}, tokenizer, cfg, "fp")
    want = theirs["results"]["calq_tiny_mc"]
    ours, p = evals["fp"].tasks["calq_tiny_mc"], evals["fp"].task_predictions["calq_tiny_mc"]
    assert ours["n"] == 16 and ours["accuracy"] == pytest.approx(want["acc,none"])
    assert ours["acc"] == pytest.approx(want["acc,none"]) and ours["acc_norm"] == pytest.approx(want["acc_norm,none"])
    # every choice's log-likelihood equals HFLM's, so the confidence is the softmax of lm-eval's own scores
    lls = {s["doc_id"]: np.array([r[0] for r in s["filtered_resps"]]) for s in theirs["samples"]["calq_tiny_mc"]}
    soft = np.array([np.exp(lls[d] - lls[d].max()).max() / np.exp(lls[d] - lls[d].max()).sum() for d in sorted(lls)])
    np.testing.assert_allclose(p.confidence, soft, rtol=1e-4)
    assert metrics.ece(p.confidence, p.correct) == pytest.approx(metrics.ece(soft, p.correct), abs=1e-6)
    # the tempered view is scored in the same pass: log_softmax(z / T) at every token moves every score
    t = evals["fp+T"].task_predictions["calq_tiny_mc"]
    assert len(t.correct) == 16 and np.abs(t.confidence - p.confidence).min() > 1e-7
    est = evals["fp+T"].intervals["task.calq_tiny_mc.ece"]
    assert est.low <= est.value <= est.high
    verdict = check_gates(evals, [GateRule(metric="task.calq_tiny_mc.acc_norm", max_drop=1.0)], "fp")
    assert verdict.passed


@pytest.mark.parametrize("family", ["llama"])
def test_each_request_matches_hflm_including_is_greedy(tiny_model, tokenizer):
    import torch
    from lm_eval.api.instance import Instance

    from quant.checks.harness import CalqLM

    ctx = "Question: alpha beta\nAnswer:"
    ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        best = int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    conts = [tokenizer.decode([best]), " river market", " gamma"]
    reqs = [Instance("loglikelihood", {}, (ctx, c), k, ("t", 0, 1)) for k, c in enumerate(conts)]
    theirs = HFLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=2, device="cpu").loglikelihood(reqs)
    ours = CalqLM({"fp": tiny_model}, tokenizer, batch_size=2).loglikelihood(reqs)
    assert [g for _, g in ours] == [g for _, g in theirs] and ours[0][1] is True
    np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in theirs], rtol=1e-5)
