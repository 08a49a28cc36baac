import csv
from pathlib import Path

import pytest

from quant.compare import write_comparison
from quant.recipe import load_recipe

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
