"""Task scoring against hand computations: every number recomputed from single, unpadded forward passes."""

import copy
import json

import numpy as np
import pytest
import torch

from quant.checks import GateRule, check_gates
from quant.checks.evaluation import BootstrapConfig, EvalConfig, TextEvalConfig, evaluate
from quant.checks.tasks import collect_tasks, matches, normalize_answer, task_context
from quant.confidence import Tempered, metrics
from quant.data.tasks import TaskConfig, load_task

MC_ROWS = [
    {"id": "q1", "question": "alpha beta", "choices": ["gamma", "delta river", "the"], "answer": 0},
    {"id": "q2", "question": "river market", "choices": ["film", "score"], "answer": "score"},
    {"id": "q3", "question": "theory of", "choices": ["planet music", "history", "a", "quantum"], "answer": "C"},
    {"id": "q4", "question": "music history", "choices": ["alpha", "beta"], "answer": 1},
    {"id": "q5", "question": "the planet", "choices": ["river", "market", "film"], "answer": 2},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ll(model, tok, context: str, continuation: str) -> float:
    """Log-likelihood of a continuation from one unpadded forward pass of context + continuation."""
    ctx = tok(context, add_special_tokens=True)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
    return float(sum(logp[k - 1, whole[k]] for k in range(len(ctx), len(whole))))


@pytest.mark.parametrize("family", ["llama"])
def test_multiple_choice_loglikelihood_matches_a_hand_computation(tiny_model, tokenizer, tmp_path):
    cfg = TaskConfig(name="x", path=_jsonl(tmp_path / "mc.jsonl", MC_ROWS), kind="multiple_choice",
                     fields={"id": "id"}, batch_size=3)
    task = load_task(cfg)
    models = {"fp": tiny_model, "fp+T": Tempered("fp", 2.0)}
    preds = collect_tasks(models, tokenizer, [task])["task.x"]
    labels = np.array([it.answer for it in task.items])
    assert [it.item_id for it in task.items] == ["q2", "q3", "q4", "q5"] and task.held_out == 1  # q1: fit split
    assert list(labels) == [1, 2, 1, 2]  # choice text, letter, index
    for name, temperature in (("fp", 1.0), ("fp+T", 2.0)):
        p = preds[name]
        acc, acc_norm, conf, nll = [], [], [], []
        for it in task.items:
            ctx = f"Question: {it.question}\nAnswer:"
            if temperature == 1.0:
                ll = np.array([_ll(tiny_model, tokenizer, ctx, f" {c}") for c in it.choices])
            else:  # a tempered view: log_softmax(z / T) at every continuation token
                ll = []
                for c in it.choices:
                    n = len(tokenizer(ctx)["input_ids"])
                    whole = tokenizer(ctx + f" {c}")["input_ids"]
                    with torch.no_grad():
                        lp = (tiny_model(input_ids=torch.tensor([whole])).logits[0] / temperature).log_softmax(-1)
                    ll.append(float(sum(lp[k - 1, whole[k]] for k in range(n, len(whole)))))
                ll = np.array(ll)
            soft = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
            acc.append(ll.argmax() == it.answer)
            acc_norm.append((ll / [len(c) for c in it.choices]).argmax() == it.answer)
            conf.append(soft.max())
            nll.append(-np.log(soft[it.answer]))
        np.testing.assert_allclose(p.confidence, conf, rtol=1e-4)
        np.testing.assert_array_equal(p.correct, acc)
        np.testing.assert_array_equal(p.values["acc_norm"], np.array(acc_norm, float))
        np.testing.assert_allclose(p.values["nll"], nll, rtol=1e-4)
    assert not np.allclose(preds["fp"].confidence, preds["fp+T"].confidence)


@pytest.mark.parametrize("family", ["llama"])
def test_letter_scoring_with_shots_and_the_chat_template(tiny_model, tokenizer, tmp_path):
    rows = [dict(r, split="dev" if k >= 3 else "test") for k, r in enumerate(MC_ROWS + [
        {"id": "d1", "question": "gamma delta", "choices": ["alpha", "beta"], "answer": 0}])]
    cfg = TaskConfig(name="letters", path=_jsonl(tmp_path / "l.jsonl", rows), kind="multiple_choice",
                     fields={"id": "id", "split": "split"}, scoring="letters", shots=2, seed=1, chat_template=True)
    task = load_task(cfg)
    assert {s.item_id for s in task.shots} <= {"q4", "q5", "d1"} and len(task.shots) == 2
    assert task.shots == load_task(cfg).shots  # seeded
    p = collect_tasks({"fp": tiny_model}, tokenizer, [task])["task.letters"]["fp"]
    for k, it in enumerate(task.items):
        prompt = task_context(task, it, tokenizer)
        assert prompt.count("<|im_start|>user") == 3 and prompt.endswith("<|im_start|>assistant\n")
        assert f"{task.shots[0].question}\nA. " in prompt
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        letters = [tokenizer.encode(x, add_special_tokens=False)[0] for x in "ABCD"[:len(it.choices)]]
        with torch.no_grad():
            probs = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1, letters].softmax(-1).numpy()
        assert p.confidence[k] == pytest.approx(probs.max(), rel=1e-4)
        assert p.prediction[k] == probs.argmax() and p.correct[k] == (probs.argmax() == it.answer)


@pytest.mark.parametrize("family", ["llama"])
def test_free_text_confidence_is_the_answers_probability(tiny_model, tokenizer, tmp_path):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    questions = ["alpha beta gamma", "river market film", "theory of music"]
    # what greedy decoding says, so one item can be made right and one wrong
    said = []
    for q in questions:
        ids = plain(f"Question: {q}\nAnswer:")["input_ids"]
        out = tiny_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=0)
        said.append(out[0, len(ids):].tolist())
    # the random model repeats one token; make the third answer's its end-of-sequence token, so that answer is empty,
    # ended by a stop, while the first runs to max_new_tokens
    stop = said[2][0]
    assert stop not in said[0]
    tiny_model.generation_config.eos_token_id = stop
    said[2] = [stop]
    text0 = plain.decode(said[0], skip_special_tokens=True)
    rows = [{"question": questions[0], "answer": [text0.strip(), "nothing"]},
            {"question": questions[1], "answer": "zzz"}, {"question": questions[2], "answer": "qqq"}]
    cfg = TaskConfig(name="ft", path=_jsonl(tmp_path / "ft.jsonl", rows), kind="free_text", max_new_tokens=6,
                     match="exact", batch_size=2)
    task = load_task(cfg)
    assert [it.question for it in task.items] == [questions[0], questions[2]]  # row:1 is in the fit split
    out = collect_tasks({"fp": tiny_model}, plain, [task])
    seq, mean = out["task.ft"]["fp"], out["task.ft.mean_token"]["fp"]
    np.testing.assert_array_equal(seq.correct, [True, False])
    for k, row in enumerate([0, 2]):
        ids = plain(f"Question: {questions[row]}\nAnswer:")["input_ids"]
        toks = said[row]
        newline = next((j for j, t in enumerate(toks) if "\n" in plain.decode([t]) or t in (0, stop)), None)
        answer = toks if newline is None else toks[:newline]
        scored = toks if newline is None else toks[:newline + 1]
        with torch.no_grad():
            p = tiny_model(input_ids=torch.tensor([ids + scored])).logits[0].softmax(-1)
        tok_p = np.array([float(p[len(ids) + j - 1, t]) for j, t in enumerate(scored)])
        assert seq.confidence[k] == pytest.approx(tok_p.prod(), rel=1e-3)
        assert mean.confidence[k] == pytest.approx(tok_p[:max(len(answer), 1)].mean(), rel=1e-3)
        assert seq.values["truncated"][k] == float(newline is None) and (newline is not None) == (row == 2)
        right = seq.correct[k]
        assert seq.values["brier"][k] == pytest.approx((seq.confidence[k] - right) ** 2)


def test_answer_matching():
    assert normalize_answer("The  Eiffel tower!") == "eiffel tower"
    assert matches("Paris", ("Paris",), "exact") and not matches("paris.", ("Paris",), "exact")
    assert matches("paris.", ("Paris",), "normalized") and not matches("It is Paris.", ("Paris",), "normalized")
    assert matches("It is Paris.", ("Paris",), "contains") and not matches("Parisian", ("Paris",), "contains")


@pytest.mark.parametrize("family", ["llama"])
def test_tasks_get_every_metric_with_intervals_and_gates(tiny_model, tokenizer, tmp_path):
    cfg = EvalConfig(text=TextEvalConfig(windows=1, seq_len=32), mmlu=None, bootstrap=BootstrapConfig(resamples=50),
                     tasks=[TaskConfig(name="x", path=_jsonl(tmp_path / "mc.jsonl", MC_ROWS),
                                       kind="multiple_choice", fields={"id": "id"}, normalization="per_char")])
    evals = evaluate({"fp": tiny_model, "fp+T": Tempered("fp", 0.5)}, tokenizer, cfg, "fp")
    t, p = evals["fp+T"].tasks["x"], evals["fp+T"].task_predictions["x"]
    assert t["n"] == 4 and t["accuracy"] == pytest.approx(p.correct.mean())
    assert t["acc_norm"] == pytest.approx(p.correct.mean())  # per_char: the prediction is acc_norm's
    assert t["ece"] == pytest.approx(metrics.ece(p.confidence, p.correct, 15))
    assert t["brier"] == pytest.approx(p.values["brier"].mean())
    est = evals["fp+T"].intervals["task.x.ece"]
    assert est.low <= est.value <= est.high
    assert evals["fp+T"].vs_reference["task.x.accuracy"]["difference"].value == pytest.approx(0)  # T keeps argmax
    verdict = check_gates(evals, [GateRule(metric="task.x.accuracy", max_drop=0.0),
                                  GateRule(metric="task.x.ece", max=-1.0)], "fp")
    assert [r.passed for r in verdict.results] == [True, False]
