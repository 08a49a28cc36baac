"""End to end on the REAL default model (SmolLM2-135M-Instruct from its registry wheel) and real data,
at a reduced size so CI stays fast. The full default recipe is run by `make run` (see README)."""

import json

import pytest

from quant.cli import main
from quant.recipe import load_recipe

RECIPE = """
name: ci
model: {source: smollm2-135m-instruct}
calibration: {sources: [wikipedia, news, reviews], num_samples: 24, seq_len: 256}
quantize:
  - {name: w8a8, scheme: W8A8}
  - {name: w4a16-g128, scheme: W4A16_ASYM}
recalibrate: {method: label_free, positions: 1024, max_samples: 8}
evaluation:
  text: {sources: [wikipedia], windows: 6, seq_len: 512}
  mmlu: {per_subject: 1, chat_template: true}
  logit_lens: {windows: 1, seq_len: 128}
gates:
  - {metric: text.perplexity, max_ratio: 1.05}
  - {metric: text.ece, max_increase: 0.02}
"""


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path, capsys):
    recipe_path = tmp_path / "ci.yaml"
    recipe_path.write_text(RECIPE)
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe_path), "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    ev = report["evaluation"]
    fp, w8, w4 = ev["fp"]["text"], ev["w8a8"]["text"], ev["w4a16-g128"]["text"]
    # the reference protocol measured 19.7 on 40 windows; 6 windows are a subset of the same text
    assert 10 < fp["perplexity"] < 40
    assert abs(w8["perplexity"] / fp["perplexity"] - 1) < 0.05, (fp, w8)
    assert w4["perplexity"] > w8["perplexity"] and w4["kl_to_reference"] > w8["kl_to_reference"]
    # measured on these 6 windows: W8A8 agreement 0.90 (+3.1% ppl), W4A16 g128 0.72 (+38% ppl)
    assert w8["top1_agreement"] > 0.85 and 0.5 < w4["top1_agreement"] < w8["top1_agreement"]
    assert ev["w4a16-g128"]["layers_quantized"] == 30 * 7  # ragged group 128 on 576-wide inputs too
    assert ev["w4a16-g128"]["size_mb"] < 0.6 * ev["fp"]["size_mb"]
    assert sum(ev["fp"]["answer_distribution"].values()) == 57
    gate = json.loads((run_dir / "gate.json").read_text())
    assert gate["passed"] is False or all(r["passed"] for r in gate["results"])
    assert sum(report["calibration"]["per_source"].values()) == 24
    assert len(report["calibration"]["per_source"]) == 3
    # label-free re-calibration: T near 1 (quantization barely moves confidence on this model), top-1 unchanged
    for name in ("w8a8", "w4a16-g128"):
        fitted = ev[name + "+T"]
        assert fitted["temperature"] == report["recalibration"][name]["temperature"]
        assert 0.8 < fitted["temperature"] < 1.25
        assert fitted["text"]["accuracy"] == ev[name]["text"]["accuracy"]
        assert abs(fitted["text"]["ece"] - fp["ece"]) < 0.02
    assert {r["variant"] for r in gate["results"]} == {"w8a8+T", "w4a16-g128+T"}
    lens = report["logit_lens"]["layers"]
    assert set(lens) == set(ev) and len(lens["fp"]) == 31  # embeddings + 30 decoder layers
    assert lens["fp"][-1]["accuracy"] > lens["fp"][10]["accuracy"]
    for name in ["report.md", "gate.json", "layerwise.png", "calibration/manifest.json", "stats/stats.safetensors",
                 "models/w4a16-g128/model.safetensors", "models/w8a8/model.safetensors"]:
        assert (run_dir / name).exists(), name
    assert main(["gate", str(run_dir)]) == (0 if gate["passed"] else 1)

    # a rerun resumes from the cached selection and statistics (their files are not rewritten)
    stamp = (run_dir / "stats" / "stats.safetensors").stat().st_mtime_ns
    assert main(["run", str(recipe_path), "--out", str(run_dir)]) == 0
    assert (run_dir / "stats" / "stats.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run_dir / "report.json").read_text())["timings"]["activation_stats"] < 5
    capsys.readouterr()


def test_missing_model_path_is_a_clear_error(tmp_path, capsys):
    recipe_path = tmp_path / "bad.yaml"
    recipe_path.write_text(RECIPE.replace("source: smollm2-135m-instruct", f"source: {tmp_path}/no-such-model"))
    load_recipe(recipe_path)  # valid schema; the path is checked when the model loads
    assert main(["run", str(recipe_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
