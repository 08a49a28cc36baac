import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from quant.ask import ask
from quant.confidence.bands import ABSTAIN, UNSURE, VERY_SURE, BandConfig
from quant.formats.checkpoint import save_quantized
from quant.cli import main
from quant.data import MCItem
from quant.checks.evaluation import MMLUConfig, mmlu_probabilities
from quant.methods import QuantSpec, WeightScheme, quantize_variant
from tests.conftest import tiny_config


@pytest.fixture
def llama(tokenizer):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval().requires_grad_(False)


def test_multiple_choice_scores_letters_like_mmlu_evaluation(llama, tokenizer):
    choices = ["alpha", "beta", "gamma", "delta"]
    item = MCItem("ask", "general knowledge", "Which is first?", tuple(choices), 0)
    probs = mmlu_probabilities({"m": llama}, tokenizer, [item], MMLUConfig())["m"][0]
    answer = ask(llama, tokenizer, "Which is first?", choices, BandConfig(abstain_below=0.0))
    assert answer.confidence == pytest.approx(probs.max(), abs=1e-6)
    assert answer.text == f"{'ABCD'[probs.argmax()]}. {choices[probs.argmax()]}"
    assert answer.band == UNSURE  # a random model is near uniform over 4 letters
    assert len(answer.alternatives) == 3
    assert answer.confidence + sum(p for _, p in answer.alternatives) == pytest.approx(1.0, abs=1e-6)
    assert ask(llama, tokenizer, "Which is first?", choices).text is None  # ~0.25 < 0.40: abstains
    sure = ask(llama, tokenizer, "Which is first?", choices, BandConfig(very_sure=0.2, abstain_below=0.1))
    assert sure.band == VERY_SURE and sure.alternatives == []


def test_free_text_is_banded_by_its_mean_token_probability(llama, tokenizer):
    cfg = BandConfig(very_sure=1.0, abstain_below=0.0)  # always "unsure": alternatives are shown
    answer = ask(llama, tokenizer, "Name a planet.", cfg=cfg, max_new_tokens=6)
    # the same greedy answer by hand: each token's probability under the model, unprocessed
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a planet."}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    token_conf = []
    with torch.inference_mode():
        for _ in range(6):
            p = llama(input_ids=ids).logits[0, -1].softmax(-1)
            token_conf.append(float(p.max()))
            ids = torch.cat([ids, p.argmax()[None, None]], 1)
    assert answer.confidence == pytest.approx(np.mean(token_conf), rel=1e-5)
    assert answer.weakest_confidence == pytest.approx(min(token_conf), rel=1e-5)
    assert answer.band == UNSURE and answer.text is not None
    # the runner-ups at the least confident token, less likely than the token chosen there
    assert len(answer.alternatives) == 3 and all(p <= answer.weakest_confidence for _, p in answer.alternatives)


@pytest.fixture
def run_dir(llama, tokenizer, tmp_path):
    """A run directory holding one saved W4 variant of the tiny model (what `calq run` leaves)."""
    result = quantize_variant(llama, QuantSpec(name="w4", weights=WeightScheme(num_bits=4, group_size=32, symmetric=False)))
    save_quantized(result, tokenizer, tmp_path / "run" / "models" / "w4")
    (tmp_path / "run" / "recipe.json").write_text(json.dumps({"model": {"source": str(tmp_path / "nowhere")}}))
    return tmp_path / "run"


def test_calq_ask_on_a_saved_model(run_dir, capsys):
    argv = ["ask", str(run_dir), "Which is first?", "--variant", "w4", "--choices", "alpha", "beta"]
    assert main([*argv, "--abstain-below", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(("answer: A. alpha\n", "answer: B. beta\n"))
    assert "\nband: " in out and "(withheld)" not in out
    assert main([*argv, "--abstain-below", "0.99", "--very-sure", "1"]) == 0  # 2 choices: max prob < 0.99
    out = capsys.readouterr().out
    assert "answer: (withheld)\n" in out and f"band: {ABSTAIN}\n" in out
    assert main(["ask", str(run_dir / "models" / "w4"), "Name a planet.", "--max-new-tokens", "4",
                 "--abstain-below", "0"]) == 0
    assert "(mean token probability; least confident token '" in capsys.readouterr().out


def test_calq_ask_errors_name_the_fix(run_dir, capsys):
    assert main(["ask", str(run_dir), "Which is first?"]) == 2
    assert "pick a model with --variant (fp, w4)" in capsys.readouterr().err
    assert main(["ask", str(run_dir), "q", "--variant", "w4", "--choices", "only one"]) == 2
    assert "multiple choice takes 2 to 4" in capsys.readouterr().err
    assert main(["ask", str(run_dir), "q", "--variant", "w4", "--abstain-below", "0.9"]) == 2
    assert "must not exceed very_sure" in capsys.readouterr().err
