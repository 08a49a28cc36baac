import math

import numpy as np
import pytest
import torch

from quant import metrics
from quant.evaluate import EvalConfig, MMLUConfig, TextEvalConfig, evaluate, letter_token_ids, mmlu_prompt, stratified_items
from quant.data import load_mmlu
from quant.methods import QuantSpec
from quant.quantize import WeightScheme, quantize

CFG = EvalConfig(text=TextEvalConfig(windows=2, seq_len=64), mmlu=MMLUConfig(per_subject=1, batch_size=16))


def test_evaluate_pairs_models_on_real_heldout_data(tiny_model, tokenizer):
    q = quantize(tiny_model, QuantSpec(name="w4", weights=WeightScheme(bits=4, group_size=32))).model
    res = evaluate({"fp": tiny_model, "w4": q}, tokenizer, CFG, reference="fp")
    fp, w4 = res["fp"], res["w4"]
    assert fp.text["kl_to_reference"] == pytest.approx(0, abs=1e-6) and fp.text["top1_agreement"] == 1.0
    assert w4.text["kl_to_reference"] > 1e-6 and w4.text["top1_agreement"] > 0.5
    assert np.abs(fp.token_predictions.confidence - w4.token_predictions.confidence).max() > 1e-4
    for r in (fp, w4):
        assert r.text["n"] == 2 * 63
        assert r.text["perplexity"] == pytest.approx(math.exp(r.text["nll"]))
        assert 30 < r.text["perplexity"] < 3000  # a random model over a 338-token vocabulary
        p = r.token_predictions
        assert r.text["ece"] == pytest.approx(metrics.ece(p.confidence, p.correct, 15))
        assert r.text["accuracy"] == pytest.approx(p.correct.mean())
        assert sum(r.answer_distribution.values()) == 57 == r.mmlu["n"]
        assert 0 <= r.mmlu["brier"] <= 2 and 0.25 <= r.mmlu["mean_confidence"] <= 1


def test_mmlu_subset_is_stratified_and_stable(tokenizer):
    items = load_mmlu("report")
    a = stratified_items(items, 3, seed=0)
    assert len(a) == 57 * 3 and len({it.subject for it in a}) == 57
    assert [it.item_id for it in a] == [it.item_id for it in stratified_items(items, 3, seed=0)]
    assert [it.item_id for it in a] != [it.item_id for it in stratified_items(items, 3, seed=1)]
    fit = {it.item_id for it in load_mmlu("fit")}
    assert not fit & {it.item_id for it in a}  # temperatures are never fitted on reported items
    prompt = mmlu_prompt(a[0], tokenizer, chat_template=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "A. " in prompt and "D. " in prompt
    assert len(set(letter_token_ids(tokenizer, True))) == 4


def test_too_few_eval_windows_is_a_clear_error(tiny_model, tokenizer):
    from quant.cache import CalqError
    cfg = EvalConfig(text=TextEvalConfig(windows=100_000, seq_len=512), mmlu=None)
    with pytest.raises(CalqError, match="lower evaluation.text.windows"):
        evaluate({"fp": tiny_model}, tokenizer, cfg, reference="fp")
