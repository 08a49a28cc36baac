"""Adding a method is one file and one table entry: here a whole (trivial) method, registered in the table for the
test, runs through recipes, the walk and the quantizer like the built-in ones."""

import pytest
import torch

from quant.methods import METHODS, QuantSpec, quantize_variant
from quant.methods.awq import clip_weight
from quant.methods.quantizer import is_ignored
from quant.methods.schemes import quantize_weight
from quant.methods.step import LayerCall, LayerChange, Method
from quant.recipe import Recipe
from quant.schema import StrictModel
from tests.conftest import dequantized


# --- the method's whole file: 12 lines --------------------------------------------------------------------------
class ShrinkConfig(StrictModel):
    factor: float = 0.9
    """Every group's range is shrunk by this factor before rounding."""


@torch.no_grad()
def shrink_layer(call: LayerCall) -> LayerChange:
    for rel, lin in call.layer.module.named_modules():
        if isinstance(lin, torch.nn.Linear) and not is_ignored(f"{call.layer.name}.{rel}", call.ignore):
            lin.weight.copy_(clip_weight(lin.weight, call.weights, torch.tensor(call.options.factor)))
    return LayerChange()


SHRINK = Method("shrink", ShrinkConfig, shrink_layer)
# -----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def shrink(monkeypatch):
    monkeypatch.setitem(METHODS, "shrink", SHRINK)  # the one table entry


@pytest.mark.parametrize("family", ["llama"])
def test_a_new_method_is_one_file_and_one_entry(shrink, tiny_model):
    recipe = Recipe.model_validate({"name": "r", "quantize": [
        {"name": "s", "scheme": "W4A16_ASYM", "weights": {"group_size": 32}, "method": "shrink",
         "options": {"factor": 0.8}}]})
    spec = recipe.quantize[0]
    assert spec.config == ShrinkConfig(factor=0.8)
    result = quantize_variant(tiny_model, spec)
    name = "model.layers.1.mlp.down_proj"
    q, scale, zero = quantize_weight(tiny_model.get_submodule(name).weight, spec.weights, 0.8)
    expected = (q.reshape(q.shape[0], -1, 32) - zero[..., None]) * scale[..., None]
    torch.testing.assert_close(dequantized(result.model.get_submodule(name)), expected.reshape(q.shape[0], -1),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="options of shrink"):
        QuantSpec(name="s", scheme="W4A16", method="shrink", options={"factor": "much"})


def test_every_built_in_method_is_in_the_table():
    assert list(METHODS) == ["minmax", "smoothquant", "awq", "gptq"]
    assert [m.needs_inputs for m in METHODS.values()] == [False, False, True, True]
    assert [m.needs_stats for m in METHODS.values()] == [False, True, False, False]
