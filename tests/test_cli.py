"""`calq quantize` (one variant from a preset, no evaluation) and `calq eval` (saved checkpoints against their
reference), on a tiny random model saved to disk."""

import json

import pytest
import torch

import quant
from quant.cli import main
from quant.formats.checkpoint import checkpoint_info
from tests.conftest import _corpus, save_tiny_llama
from tests.checks.test_report import tiny_run  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "model", tokenizer)
    lines = _corpus()
    (root / "text.txt").write_text("\n\n".join(" ".join(lines[i:i + 4]) for i in range(0, len(lines), 4)))
    return root


def test_quantize_writes_one_variant_from_a_preset(saved, capsys):
    out = saved / "w4-awq"
    argv = ["quantize", str(saved / "model"), "--scheme", "W4A16_ASYM", "--group-size", "32", "--method", "awq",
            "--option", "n_grid=4", "--option", "clip_grid=4", "--data", str(saved / "text.txt"),
            "--num-samples", "8", "--seq-len", "64", "--out", str(out)]
    assert main(argv) == 0
    assert "w4-awq: 14 linears quantized, 1 kept (lm_head)" in capsys.readouterr().out
    info = checkpoint_info(out)
    assert (info.spec.method, info.spec.weights.group_size, info.spec.weights.symmetric) == ("awq", 32, False)
    assert info.spec.options["n_grid"] == 4
    model, _ = quant.load(out, device="cpu")
    assert model(input_ids=torch.arange(3, 20)[None]).logits.isfinite().all()
    assert main([*argv[:-2], "--format", "compressed-tensors", "--out", str(saved / "ct")]) == 0
    config = json.loads((saved / "ct" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"


def test_quantize_refuses_bad_arguments_in_one_line(saved, capsys):
    assert main(["quantize", str(saved / "model"), "--scheme", "W8A8", "--method", "awq",
                 "--option", "n_grid=0", "--out", str(saved / "x")]) == 2
    err = capsys.readouterr().err
    assert "options of awq" in err and err.count("\n") == 1
    assert not (saved / "x").exists()


def test_eval_of_a_run_directory_and_of_checkpoints(tiny_run, saved, capsys):  # noqa: F811
    run_dir = tiny_run.run_dir
    assert main(["eval", str(run_dir), "--out", str(saved / "eval.json")]) == 1  # its mmlu.accuracy gate fails
    out = capsys.readouterr().out
    assert "| fp |" in out and "| w4 |" in out and "FAIL w4: mmlu.accuracy" in out
    metrics = json.loads((saved / "eval.json").read_text())
    # the saved (re-calibrated) checkpoint evaluated again: the run's own w4+T numbers
    assert metrics["w4"]["text"]["perplexity"] == pytest.approx(tiny_run.evals["w4+T"].text["perplexity"], rel=1e-5)
    assert metrics["w4"]["tasks"]["mc"]["ece"] == pytest.approx(tiny_run.evals["w4+T"].tasks["mc"]["ece"], rel=1e-5)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert main(["eval", str(run_dir / "models" / "w4"), "--reference", recipe["model"]["source"]]) == 0
    assert main(["eval", str(run_dir / "models" / "w4")]) == 2
    assert "give --reference MODEL" in capsys.readouterr().err


def test_run_fails_by_default_when_a_gate_fails(tiny_run, tmp_path, capsys):  # noqa: F811
    """A release gate that passes by default is a trap in CI: `calq run` exits 1 on a failed gate unless told not to."""
    recipe = tiny_run.run_dir.parent / "tiny.yaml"  # its mmlu.accuracy >= 0.99 gate fails
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 1
    assert "FAIL w4+T: mmlu.accuracy" in capsys.readouterr().out
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-enforce-gates"]) == 0
