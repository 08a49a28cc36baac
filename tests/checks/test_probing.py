"""The probe on real (tiny) models: fitted on a task's fit split, reported on its report split beside the evaluation's
own numbers, saved with the checkpoint and used by `calq ask`."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from quant.ask import ask
from quant.checks.evaluation import EvalConfig, reduce
from quant.checks.probing import fit_probes, last_hidden, probe_report
from quant.checks.tasks import collect_tasks
from quant.confidence import Tempered
from quant.confidence.probe import PROBE_FILE, ProbeConfig
from quant.data.tasks import TaskConfig, load_task
from quant.errors import CalqError
from quant.formats import load_probe, save_quantized
from quant.methods import QuantSpec, WeightScheme, quantize_variant
from tests.conftest import tiny_config

WORDS = ["alpha", "beta", "gamma", "delta", "river", "market", "film", "score", "theory", "planet"]


@pytest.fixture
def llama(tokenizer):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval().requires_grad_(False)


@pytest.fixture
def task_cfg(tmp_path) -> TaskConfig:
    rng = np.random.default_rng(0)
    rows = [{"id": f"q{i}", "question": " ".join(rng.choice(WORDS, 6)), "choices": list(rng.choice(WORDS, 4)),
             "answer": int(rng.integers(4))} for i in range(96)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskConfig(name="mc", kind="multiple_choice", path=str(path), fields={"id": "id"}, batch_size=16)


def test_hidden_states_of_a_padded_batch_are_those_of_each_prompt_alone(llama, tokenizer):
    prompts = [tokenizer("alpha beta gamma delta river")["input_ids"], tokenizer("film")["input_ids"],
               tokenizer("the theory of music and history")["input_ids"]]
    batched = last_hidden({"m": llama}, tokenizer, prompts, batch_size=3)["m"]
    alone = np.concatenate([last_hidden({"m": llama}, tokenizer, [p], batch_size=1)["m"] for p in prompts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_probes_are_fitted_on_the_fit_split_and_reported_beside_the_evaluation(llama, tokenizer, task_cfg, tmp_path):
    w4 = quantize_variant(llama, QuantSpec(name="w4", weights=WeightScheme(num_bits=4, group_size=32)))
    models = {"fp": llama, "w4": w4.model, "w4+T": Tempered("w4", 0.7)}
    eval_cfg = EvalConfig(mmlu=None, tasks=(task_cfg,), bootstrap={"resamples": 50})
    cfg = ProbeConfig(source="mc", C=0.5)
    task = load_task(task_cfg)
    assert len(task.fit) >= 16 and not {it.item_id for it in task.fit} & {it.item_id for it in task.items}
    probes = fit_probes(models, tokenizer, eval_cfg, cfg)
    assert set(probes) == set(models) and all(p.fit_items == len(task.fit) for p in probes.values())
    assert probes["w4"].scoring == "task mc, loglikelihood"
    evals = reduce(collect_tasks(models, tokenizer, [task]), eval_cfg, "fp")
    out = probe_report(models, tokenizer, evals, eval_cfg, cfg, probes)
    assert out["report_items"] == len(task.items) and out["fit_items"] == len(task.fit)
    assert out["probe_ms_per_answer"] > 0 and out["hidden_ms_per_answer"] > 0
    for name in models:
        rows = out["models"][name]
        # internal is the evaluation's own confidence: the same AUROC and ECE as the task section
        assert rows["internal"]["auroc"]["value"] == pytest.approx(evals[name].tasks["mc"]["auroc"])
        assert rows["internal"]["ece"]["value"] == pytest.approx(evals[name].tasks["mc"]["ece"])
        for row in ("probe", "combined"):
            e = rows[row]["auroc"]
            assert e["low"] <= e["value"] <= e["high"]
            d = rows["change"][row]["auroc"]
            assert d["value"] == pytest.approx(e["value"] - rows["internal"]["auroc"]["value"])
        assert sum(b["n"] for b in out["bands"][name]) == len(task.items)

    # the probe travels in the checkpoint, hash-checked, and `calq ask` bands by it when the scoring matches
    directory = tmp_path / "ckpt"
    save_quantized(w4, tokenizer, directory, probe=probes["w4"])
    loaded = load_probe(directory)
    x = np.random.default_rng(1).normal(size=(5, len(loaded.mean)))
    np.testing.assert_array_equal(loaded.predict(x), probes["w4"].predict(x))
    assert json.loads((directory / "manifest.json").read_text())["sha256"][PROBE_FILE]
    answer = ask(w4.model, tokenizer, "Which is first?", ["alpha", "beta"], probe=loaded)
    assert answer.internal is None and "not applied: fitted on task mc, loglikelihood" in answer.probe_note
    (directory / PROBE_FILE).write_text((directory / PROBE_FILE).read_text().replace('"kind"', '"kind" '))
    with pytest.raises(CalqError, match="probe.json: hash mismatch"):
        load_probe(directory)
    save_quantized(w4, tokenizer, directory)
    assert load_probe(directory) is None


def test_calq_ask_bands_by_a_probe_fitted_on_letters_scored_as_it_scores_them(llama, tokenizer):
    from quant.checks.evaluation import MMLUConfig, letter_scoring, mmlu_encoded, mmlu_probabilities
    from quant.confidence.probe import fit_probe, signal_matrix
    from quant.data import MCItem

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 1 + llama.config.hidden_size))
    signals = ("max_prob", "hidden")
    probe = fit_probe(x, x[:, 5] > 0, ProbeConfig(signals=signals), letter_scoring("zero-shot", True))
    choices = ["alpha", "beta", "gamma"]
    item = MCItem("ask", "general knowledge", "Which is first?", tuple(choices), 0)
    probs = mmlu_probabilities({"m": llama}, tokenizer, [item], MMLUConfig())["m"][:, :3]
    probs = probs / probs.sum(1, keepdims=True)
    hidden = last_hidden({"m": llama}, tokenizer, mmlu_encoded(tokenizer, [item], MMLUConfig()), 1)["m"]
    answer = ask(llama, tokenizer, "Which is first?", choices, probe=probe)
    assert answer.internal == pytest.approx(probs.max(), abs=1e-6) and answer.probe_note is None
    assert answer.confidence == pytest.approx(probe.predict(signal_matrix(probs, hidden, signals))[0], abs=1e-5)
    assert ask(llama, tokenizer, "Name a planet.", probe=probe, max_new_tokens=2).probe_note.endswith("free text")
