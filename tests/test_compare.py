import csv
from pathlib import Path

import pytest

from quant.compare import write_comparison
from quant.methods import QuantSpec
from quant.recipe import load_recipe
from tests.checks.test_report import tiny_run  # noqa: F401  (fixture)

COMPARISON = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "compare.yaml").quantize


def _entry(method, ppl, seconds):
    return {"method": method, "text": {"perplexity": ppl, "kl_to_reference": ppl / 100, "top1_agreement": 0.9,
                                       "ece": 0.02}, "mmlu": {"accuracy": 0.3, "ece": 0.2}, "size_mb": 100.0,
            "quantize_seconds": seconds, "quantize_peak_rss_mb": 900.0}


def test_comparison_covers_every_method_and_scheme():
    names = {s.name: s for s in COMPARISON}
    assert {s.method for s in COMPARISON} == {"minmax", "smoothquant", "awq", "gptq"}
    assert {s.weights.group_size for s in COMPARISON if s.weights.num_bits == 4} == {128, 32}
    assert {s.input_activations.mode for s in COMPARISON if s.input_activations} == {"dynamic", "static"}
    assert names["w4a16-g128-awq"].weights == names["w4a16-g128-minmax"].weights


def test_comparison_table_and_plot(tmp_path):
    report = {"reference": "fp", "recipe": {"model": {"source": "m"}},
              "evaluation": {"fp": _entry("none", 20.0, None), "a-minmax": _entry("minmax", 25.0, 1.0),
                             "a-awq": _entry("awq", 22.0, 30.0)}}
    rows = write_comparison(report, tmp_path)
    assert [r["variant"] for r in rows] == ["fp", "a-minmax", "a-awq"]
    assert rows[1]["ppl_increase_pct"] == pytest.approx(25.0) and rows[2]["ppl_increase_pct"] == pytest.approx(10.0)
    with open(tmp_path / "compare.csv") as f:
        back = list(csv.DictReader(f))
    assert float(back[2]["perplexity"]) == 22.0
    assert "| a-awq | awq | 22 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_runs_the_recipes_own_variants_as_they_quantize(tiny_run, tmp_path):  # noqa: F811
    """compare() on the tiny recipe: its variants (plus one more), no re-calibration, logit lens, gates or export."""
    from quant.compare import compare

    recipe = load_recipe(tiny_run.run_dir.parent / "tiny.yaml")
    recipe = recipe.model_copy(update={"quantize": (*recipe.quantize, QuantSpec(name="w8", scheme="W8A8"))})
    result = compare(recipe, tmp_path / "cmp")
    assert set(result.evals) == {"fp", "w4", "w8"} and result.recalibration == {} and result.gates.results == []
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"fp", "w4", "w8"} and rows["w8"]["method"] == "minmax"
    # the comparison's w4 is the run's w4 before re-calibration: same samples, same quantizer, same evaluation
    assert float(rows["w4"]["perplexity"]) == pytest.approx(tiny_run.evals["w4"].text["perplexity"], rel=1e-6)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
