from pathlib import Path

import pytest

from quant.errors import CalqError
from quant.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_default_recipe_loads():
    r = load_recipe(ROOT / "recipes" / "default.yaml")
    assert r.model.source == "smollm2-135m-instruct"
    assert r.calibration.num_samples == 128 and r.calibration.seq_len == 512
    assert [q.name for q in r.quantize] == ["w8a8", "w4a16-g64-awq"]
    assert r.quantize[1].weights.group_size == 64 and r.quantize[0].input_activations.mode == "dynamic"
    assert r.quantize[1].method == "awq" and r.recalibrate.method == "label_free"
    assert {(e.variant, e.format) for e in r.export} == {
        ("w8a8", "compressed-tensors"), ("w8a8", "gguf"), ("w4a16-g64-awq", "compressed-tensors"),
        ("w4a16-g64-awq", "awq"), ("w4a16-g64-awq", "gguf")}
    assert r.run_dir == Path("runs/default")


@pytest.mark.parametrize("text,message", [
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\ncalibraton: {}\n", "unknown recipe key 'calibraton'"),
    ("name: x\nquantize: [{name: a, weights: {num_bits: 3}}]\n", "recipe key 'quantize.0.weights.num_bits'"),
    ("name: x\nquantize: [{name: a, weights: {bits: 4}}]\n", "'bits' was renamed: use num_bits"),
    ("name: x\nquantize: [{name: a, scheme: W8A8, activations: {mode: static}}]\n", "use input_activations"),
    ("name: x\nquantize: [{name: a}]\n", "no weights: give a scheme"),
    ("name: x\nquantize: [{name: a, scheme: W4A8}]\n", "unknown scheme 'W4A8'"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\ncalibration: {num_samples: many}\n", "calibration.num_samples"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\ngates: [{metric: text.ece, max: 1, max_increase: 1}]\n",
     "exactly one of"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}, {name: a, scheme: W8A8}]\n", "unique"),
    ("name: x\nquantize: [{name: ../../x, scheme: W8A8}]\n", "not a plain directory name"),
    ("- just a list\n", "YAML mapping"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\nprobe: {source: nope}\n",
     "probe.source 'nope' is neither mmlu nor a multiple-choice task of evaluation.tasks \\(none\\)"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\nprobe: {source: facts}\nevaluation: {tasks: [{name: facts, "
     "kind: free_text, path: 'builtin:facts', fields: {id: id}}]}\n", "probe.source 'facts' is neither mmlu"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\nprobe: {}\nevaluation: {mmlu: null}\n",
     "probe.source mmlu but evaluation.mmlu is off"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\nprobe: {signals: []}\n", "probe.signals.*distinct and not empty"),
    ("name: x\nquantize: [{name: a, scheme: W8A8}]\nprobe: {signals: [logits]}\n", "probe.signals.0"),
])
def test_bad_recipes_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(CalqError, match=message) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(CalqError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_a_gate_metric_typo_fails_at_load_with_the_choices(tmp_path):
    path = _write(tmp_path, "name: x\nquantize: [{name: a, scheme: W8A8}]\ngates: [{metric: text.perplexty, max: 30}]\n")
    with pytest.raises(CalqError, match=r"'text.perplexty' is not one the evaluation reports; choose from .*text.perplexity"):
        load_recipe(path)
    path = _write(tmp_path, "name: x\nquantize: [{name: a, scheme: W8A8}]\nevaluation: {mmlu: null}\n"
                            "gates: [{metric: mmlu.accuracy, min: 0.3}]\n")
    with pytest.raises(CalqError, match="gate on mmlu.accuracy but evaluation.mmlu is off"):
        load_recipe(path)


def test_every_problem_of_a_recipe_is_in_one_message(tmp_path):
    path = _write(tmp_path, "name: x\nquantize: [{name: a, scheme: W4A16, weights: {group_size: 24}}]\n"
                            "calibration: {num_samples: many}\ngates: [{metric: text.ec, max: 1}]\n")
    with pytest.raises(CalqError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message
    for part in ("calibration.num_samples", "group_size 24: calq's CUDA kernels take multiples of 16", "text.ec"):
        assert part in message, part


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny Gemma3 saved to disk (hidden size 96, bfloat16): config.json is all the load-time checks read."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    AutoModelForCausalLM.from_config(tiny_config("gemma3", len(tokenizer)), dtype=torch.bfloat16).save_pretrained(
        tmp_path / "gemma")
    return tmp_path / "gemma"


def test_what_the_models_shapes_rule_out_fails_at_load(tmp_path, model_dir, monkeypatch):
    """Before any weight loads: an export its 96-wide inputs cannot take (groups of 64) and SmoothQuant on (1 + w)
    norms held in bfloat16; GGUF of gemma3_text is llama.cpp's gemma3 architecture, no longer refused."""
    import quant.recipe

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    path = _write(tmp_path, f"""
name: x
model: {{source: {model_dir}, dtype: bfloat16}}
quantize:
  - {{name: w4, scheme: W4A16_ASYM, weights: {{group_size: 64}}}}
  - {{name: sq, scheme: W8A8, method: smoothquant}}
export:
  - {{format: compressed-tensors, variant: w4}}
  - {{format: gguf, variant: w4}}
""")
    with pytest.raises(CalqError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "variant sq: SmoothQuant folds scales into model.layers.0.input_layernorm" in message
    assert "export compressed-tensors of w4: compressed-tensors needs group_size 64 to divide every input size" in message
    assert "export gguf" not in message
    assert quant.recipe.model_problems(load_recipe.__globals__["Recipe"].model_validate(
        {"name": "ok", "model": {"source": str(model_dir)}, "quantize": [{"name": "w8", "scheme": "W8A8"}]})) == []


def test_a_missing_task_file_or_field_fails_at_load_in_seconds(tmp_path):
    """Checked before any model is loaded: the recipe names a model that does not exist either, which would fail later."""
    import time
    head = "name: x\nmodel: {source: /nonexistent/model}\nquantize: [{name: a, scheme: W8A8}]\nevaluation:\n  tasks:\n"
    t0 = time.perf_counter()
    with pytest.raises(CalqError, match=r"r.yaml: .*task qa: task file .*nope.jsonl does not exist"):
        load_recipe(_write(tmp_path, head + f"    - {{name: qa, kind: free_text, path: {tmp_path}/nope.jsonl}}\n"))
    (tmp_path / "qa.jsonl").write_text('{"q": "Capital of France?", "answer": "Paris"}\n')
    with pytest.raises(CalqError, match=r"qa.jsonl:1: no field 'question' \(fields present: q, answer\)") as err:
        load_recipe(_write(tmp_path, head + f"    - {{name: qa, kind: free_text, path: {tmp_path}/qa.jsonl}}\n"))
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 10


def test_task_gates_are_checked_against_the_tasks(tmp_path):
    head = "name: x\nquantize: [{name: a, scheme: W8A8}]\nevaluation:\n  tasks:\n" \
           "    - {name: qa, kind: free_text, path: builtin:facts, fields: {id: id}}\n"
    with pytest.raises(CalqError, match=r"gate on task.qb.ece: no such task section; evaluation.tasks has task.qa, "
                                        r"task.qa.mean_token"):
        load_recipe(_write(tmp_path, head + "gates: [{metric: task.qb.ece, max: 0.1}]\n"))
    with pytest.raises(CalqError, match=r"gate on task.qa.acc_norm: task.qa reports accuracy"):
        load_recipe(_write(tmp_path, head + "gates: [{metric: task.qa.acc_norm, max_drop: 0.1}]\n"))
    with pytest.raises(CalqError, match=r"task gates are task.<name>.<metric>"):
        load_recipe(_write(tmp_path, head + "gates: [{metric: task.qa, max: 0.1}]\n"))
    r = load_recipe(_write(tmp_path, head + "gates: [{metric: task.qa.mean_token.ece, max: 0.3}, "
                                            "{metric: task.qa.accuracy, max_drop: 0.1}]\n"))
    assert [g.metric for g in r.gates] == ["task.qa.mean_token.ece", "task.qa.accuracy"]


def test_lm_eval_task_gates_are_checked_at_load(tmp_path):
    head = "name: x\nquantize: [{name: a, scheme: W8A8}]\nevaluation: {lm_eval: {tasks: [arc_easy]}}\n"
    r = load_recipe(_write(tmp_path, head + "gates: [{metric: task.arc_easy.acc_norm, max_drop: 0.05}]\n"))
    assert r.evaluation.lm_eval.tasks == ("arc_easy",)
    with pytest.raises(CalqError, match=r"gate on task.arc_easy.truncated: task.arc_easy reports accuracy"):
        load_recipe(_write(tmp_path, head + "gates: [{metric: task.arc_easy.truncated, max: 0.05}]\n"))
    with pytest.raises(CalqError, match=r"lm-eval task name 'mmlu.x'"):
        load_recipe(_write(tmp_path, "name: x\nquantize: [{name: a, scheme: W8A8}]\n"
                                     "evaluation: {lm_eval: {tasks: [mmlu.x]}}\n"))


def test_a_probe_on_a_task_with_too_few_fit_items_fails_at_load(tmp_path):
    rows = "".join(f'{{"id": "q{i}", "question": "q{i}?", "choices": ["a", "b"], "answer": 0}}\n' for i in range(20))
    (tmp_path / "mc.jsonl").write_text(rows)
    text = (f"name: x\nquantize: [{{name: a, scheme: W8A8}}]\nprobe: {{source: mc}}\nevaluation:\n  tasks:\n"
            f"    - {{name: mc, kind: multiple_choice, path: {tmp_path}/mc.jsonl, fields: {{id: id}}}}\n")
    with pytest.raises(CalqError, match=r"probe.source mc: only \d+ items in its fit split, a probe needs 16"):
        load_recipe(_write(tmp_path, text))
