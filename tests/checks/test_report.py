"""`calq run` end to end on a tiny random model saved to disk, with re-calibration on: what is evaluated,
saved, gated and reported (the real-model version is tests/test_pipeline.py, marked slow)."""

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from quant.formats.checkpoint import checkpoint_info, load
from quant.cli import main
from quant.pipeline import run
from quant.recipe import load_recipe
from tests.checks.test_tasks import MC_ROWS
from tests.conftest import _corpus, save_tiny_llama

# What the two tiny recipes share: the tiny model, its calibration and one W4 variant.
MODEL_AND_VARIANT = """
model: {{source: {model}}}
calibration: {{sources: [{text}], num_samples: 8, seq_len: 64, min_len: 32}}
quantize:
  - {{name: w4, scheme: W4A16_ASYM, weights: {{group_size: 32}}}}
"""

RECIPE = "name: tiny" + MODEL_AND_VARIANT + """evaluation:
  text: {{sources: [{text}], windows: 4, seq_len: 64}}
  mmlu: {{per_subject: 1, batch_size: 16}}
  bootstrap: {{resamples: 200}}
  tasks:
    - {{name: facts, kind: free_text, path: builtin:facts, fields: {{id: id}}, max_items: 6, max_new_tokens: 4}}
    - {{name: mc, kind: multiple_choice, path: {mc}, fields: {{id: id}}, normalization: per_char}}
recalibrate: {{method: dual_align, positions: 256, max_samples: 8, profile_positions: 64}}
probe: {{source: mmlu, fit_items: 57, C: 0.5}}
gates:
  - {{metric: text.perplexity, max_ratio: 100}}
  - {{metric: text.ece, max_increase: 0.5}}
  - {{metric: mmlu.accuracy, min: 0.99}}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(root / "model", tokenizer)
    (root / "text.txt").write_text("\n".join(_corpus()))  # a local source keeps selection fast
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (root / "tiny.yaml").write_text(RECIPE.format(model=root / "model", text=root / "text.txt", mc=root / "mc.jsonl"))
    return run(load_recipe(root / "tiny.yaml"), root / "run")


def test_recalibrated_variant_is_evaluated_saved_and_gated(tiny_run, capsys):
    result, run_dir = tiny_run, tiny_run.run_dir
    assert set(result.evals) == {"fp", "w4", "w4+T"}
    fit = result.recalibration["w4"]
    assert fit.method == "dual_align" and 0.25 < fit.temperature < 4 and fit.objective_after <= fit.objective_before
    # the saved checkpoint is the re-calibrated model, with its temperature in the metadata
    assert checkpoint_info(run_dir / "models" / "w4").temperature == fit.temperature
    reloaded, _ = load(run_dir / "models" / "w4", device="cpu")
    ids = torch.arange(5, 40)[None]
    torch.testing.assert_close(reloaded(input_ids=ids).logits,
                               run_models_logits(result, ids), rtol=1e-4, atol=1e-4)
    # gates check the shipped variant only, on intervals
    assert {r.variant for r in result.gates.results} == {"w4+T"} and len(result.gates.results) == 3
    assert [r.passed for r in result.gates.results] == [True, True, False]
    assert all(r.low is not None and r.low <= r.value <= r.high for r in result.gates.results[:2])
    suite = ET.parse(run_dir / "gate.xml").getroot().find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    assert main(["gate", str(run_dir)]) == 1
    capsys.readouterr()


def run_models_logits(result, ids):
    """Logits of the in-memory re-calibrated model: the raw variant's divided by the fitted temperature."""
    raw = result.variants["w4"].model(input_ids=ids).logits
    return raw / result.recalibration["w4"].temperature


def test_report_shows_intervals_recalibration_and_plots(tiny_run):
    run_dir = tiny_run.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    ev = report["evaluation"]
    assert ev["w4+T"]["temperature"] == report["recalibration"]["w4"]["temperature"] and ev["w4"]["temperature"] is None
    est = ev["w4+T"]["intervals"]["text.ece"]
    assert est["value"] == ev["w4+T"]["text"]["ece"] and est["low"] <= est["high"]
    assert set(ev["w4+T"]["vs_reference"]["text.perplexity"]) == {"difference", "ratio"}
    md = (run_dir / "report.md").read_text()
    assert "## Re-calibration" in md and "| w4 | dual_align |" in md and "## Gate: FAIL" in md
    process = report["recalibration"]["w4"]["process"]  # dual_align's process half, in the report
    assert len(process["js_by_layer"]) == 3 and 1 <= process["peak_layer"] <= 2
    assert f"w4 (dual_align): peak divergence layer {process['peak_layer']}" in md
    assert f"{est['value']:.4f} [{est['low']:.4f}, {est['high']:.4f}]" in md
    for name in ("reliability_token.png", "reliability_mmlu.png", "confidence_token.png", "confidence_mmlu.png",
                 "gate.json", "gate.md", "gate.xml"):
        assert (run_dir / name).stat().st_size > 100, name


def test_the_report_shows_skipped_work_and_a_temperature_at_its_bound(tiny_run):
    import copy

    from quant.checks.report import markdown

    report = copy.deepcopy(tiny_run.report)
    assert "## Work a method left undone" not in markdown(report)
    report["evaluation"]["w4"]["skipped"] = {f"model.layers.{i}.self_attn.v_proj -> self_attn.o_proj": "GQA" for i in (0, 1)}
    report["recalibration"]["w4"]["at_bound"] = True
    text = markdown(report)
    assert "- w4: 2 skipped (GQA), e.g. model.layers.0.self_attn.v_proj -> self_attn.o_proj" in text
    assert "(at the search bound)" in text
    assert "## Cached stages" in text and "calibration samples: computed" in text
    # every quantized linear's kernel path is said: 14 W4A16 linears on the CPU path the dispatch chose
    (path, count), = report["kernels"]["paths"]["w4"].items()
    assert path.startswith("w4a16: CPU ") and count == 14 and "CPU kernels: capability" in report["kernels"]["cpu"]
    assert "## Kernels" in text


def test_the_report_has_a_coverage_line_naming_what_was_kept(tiny_run):
    """Share of matmul weights quantized: the tiny llama's decoder linears (2 x 73,728 weights) of those plus its
    lm_head (338 x 96, kept by the recipe's ignore), and the kept one named with its reason."""
    report = json.loads((tiny_run.run_dir / "report.json").read_text())
    line = report["evaluation"]["w4"]["coverage"]
    assert line.startswith(f"{2 * 73728 / (2 * 73728 + 338 * 96):.1%} of matmul weights quantized (147,456 of 179,904)")
    assert "1 kept: ignored by recipe" in line
    md = (tiny_run.run_dir / "report.md").read_text()
    assert "## Coverage (matmul weights quantized)" in md and f"- w4: {line}" in md


def test_every_task_is_reported_with_intervals_and_a_reliability_diagram(tiny_run):
    run_dir = tiny_run.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    ev = report["evaluation"]
    assert set(ev["w4+T"]["tasks"]) == {"facts", "facts.mean_token", "mc"}
    assert ev["fp"]["tasks"]["facts"]["n"] == 6 and ev["fp"]["tasks"]["mc"]["n"] == 3  # mc: 2 of 5 in the fit split
    est = ev["w4+T"]["intervals"]["task.mc.ece"]
    assert est["value"] == ev["w4+T"]["tasks"]["mc"]["ece"]
    md = (run_dir / "report.md").read_text()
    assert "### task.mc" in md and "### task.facts.mean_token" in md
    assert "log-likelihoods per character" in md and "3 report items (2 held out for fitting)" in md
    assert f"| ECE | {ev['fp']['intervals']['task.mc.ece']['value']:.4f} [" in md
    assert "| answers cut at max_new_tokens |" in md and "| MMLU zero-shot accuracy |" in md
    for section in ("facts", "facts.mean_token", "mc"):
        assert (run_dir / f"reliability_task_{section}.png").stat().st_size > 100


def test_the_probe_is_fitted_saved_reported_and_used_by_calq_ask(tiny_run, capsys):
    """Fitted on 57 MMLU fit-split items, the shipped (re-calibrated) variant's probe saved in its checkpoint; the report
    compares internal / probe / combined on the 57 reported items; the exports are said not to carry it."""
    from quant.confidence.probe import PROBE_FILE
    from quant.formats import load_probe

    run_dir = tiny_run.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    pr = report["probe"]
    assert (pr["source"], pr["fit_items"], pr["report_items"]) == ("mmlu", 57, 57)
    assert set(pr["models"]) == {"fp", "w4", "w4+T"} and pr["saved"] == ["models/w4/probe.json"]
    internal = pr["models"]["w4+T"]["internal"]
    assert internal["auroc"]["value"] == pytest.approx(report["evaluation"]["w4+T"]["mmlu"]["auroc"])
    assert set(report["confidence_bands"]["probe.mmlu"]) == {"fp", "w4", "w4+T"}
    assert "probe_fit" in report["timings"] and "probe_report" in report["timings"]
    probe = load_probe(run_dir, "w4")
    assert probe.scoring == "MMLU letters, zero-shot, chat template" and probe.fit_items == 57
    assert PROBE_FILE in json.loads((run_dir / "models" / "w4" / "manifest.json").read_text())["sha256"]
    md = (run_dir / "report.md").read_text()
    assert "## External confidence (probe on mmlu)" in md and "| w4+T | probe - internal |" in md
    assert "## Confidence bands (probe.mmlu)" in md
    assert main(["ask", str(run_dir), "Which is first?", "--variant", "w4", "--choices", "alpha", "beta",
                 "--abstain-below", "0"]) == 0
    assert "(probe; the model's own: " in capsys.readouterr().out


DIRECTION_RECIPE = "name: tiny-direction" + MODEL_AND_VARIANT + """evaluation:
  text: {{sources: [{text}], windows: 4, seq_len: 64}}
  mmlu: null
  tasks: []
  bootstrap: {{resamples: 100}}
recalibrate: {{method: direction, positions: 256, max_samples: 8}}
gates:
  - {{metric: text.ece, max_increase: 0.5}}
"""


def test_a_calibration_direction_is_fitted_saved_evaluated_and_reported(tmp_path, tokenizer):
    """`recalibrate: {method: direction}` end to end: the shipped variant is the stepped model, evaluated by its own
    forward pass, saved with the step as the last down projection's bias (and `calq_direction` in the metadata),
    gated and reported."""
    from safetensors import safe_open
    save_tiny_llama(tmp_path / "model", tokenizer)
    (tmp_path / "text.txt").write_text("\n".join(_corpus()))
    (tmp_path / "r.yaml").write_text(DIRECTION_RECIPE.format(model=tmp_path / "model", text=tmp_path / "text.txt"))
    result = run(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    fit = result.recalibration["w4"]
    assert fit.method == "direction" and fit.top1_changed == 0 and fit.objective_after <= fit.objective_before
    assert set(result.evals) == {"fp", "w4", "w4+T"} and {r.variant for r in result.gates.results} == {"w4+T"}
    directory = tmp_path / "run" / "models" / "w4"
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["calq_direction"])
    assert meta["alpha"] == fit.alpha and meta["layer"] == "model.layers.1.mlp.down_proj"
    reloaded, _ = load(directory, device="cpu")
    assert torch.equal(reloaded.get_submodule(fit.layer).bias, fit.vector)
    ids = torch.arange(5, 40)[None]
    torch.testing.assert_close(reloaded(input_ids=ids).logits, fit.fold(result.variants["w4"].model)(input_ids=ids).logits,
                               rtol=0, atol=0)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["evaluation"]["w4+T"]["temperature"] is None and "vector" not in report["recalibration"]["w4"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"| w4 | direction | step {fit.alpha:+.4f} x {fit.scale:.2f} |" in md
    assert f"w4 (direction, label_free): the top direction of full precision's updates in its last 2 layers" in md
    assert "top-1 changed on 0.00% of the fit positions" in md
    from quant.checks.report import markdown
    report["recalibration"]["w4"].update(shortened=True, optimum=[-0.1, 0.146])  # as on the default model's W4
    assert "(the optimum, -0.1000, changed 14.60%: step shortened to the allowed share)" in markdown(report)
    # the evaluation ran the stepped model, not the raw one
    assert result.evals["w4+T"].text["nll"] != result.evals["w4"].text["nll"]
