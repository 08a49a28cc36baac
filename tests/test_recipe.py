from pathlib import Path

import pytest

from quant.errors import CalqError
from quant.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_default_recipe_loads():
    r = load_recipe(ROOT / "recipes" / "default.yaml")
    assert r.model.source == "smollm2-135m-instruct"
    assert r.calibration.num_samples == 256 and r.calibration.seq_len == 512
    assert [q.name for q in r.quantize] == ["w8a8", "w4a16-g128", "w4a16-g64-awq"]
    assert r.quantize[1].weights.group_size == 128 and r.quantize[0].input_activations.mode == "dynamic"
    assert r.quantize[2].method == "awq" and r.recalibrate.method == "label_free"
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
