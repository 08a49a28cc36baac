import copy
import math

import numpy as np
import pytest
import torch

from quant.confidence import metrics
from quant.data import MCItem, load_mmlu, special_prefix
from quant.checks.evaluation import (BootstrapConfig, Estimate, EvalConfig, MMLUConfig, Predictions, TextEvalConfig,
                                       collect_text, eval_windows, evaluate, letter_token_ids, mmlu_probabilities,
                                       mmlu_prompt, reduce, stratified_items)
from quant.methods import QuantSpec, WeightScheme, quantize_variant

CFG = EvalConfig(text=TextEvalConfig(windows=2, seq_len=64), mmlu=MMLUConfig(per_subject=1, batch_size=16))


def test_evaluate_pairs_models_on_real_heldout_data(tiny_model, tokenizer):
    q = quantize_variant(tiny_model, QuantSpec(name="w4", weights=WeightScheme(num_bits=4, group_size=32, symmetric=False))).model
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
        m = r.mmlu_predictions
        assert r.mmlu["accuracy"] == pytest.approx(m.correct.mean()) and r.mmlu["nll"] == pytest.approx(m.values["nll"].mean())
        # every metric has an interval around its point; text resamples whole windows
        for key in ("text.ece", "text.ece_mass", "text.mce", "text.brier", "text.nll", "text.auroc", "text.aurc",
                    "text.selective_accuracy", "text.selective_coverage", "text.accuracy", "text.perplexity",
                    "mmlu.accuracy", "mmlu.ece", "mmlu.brier", "mmlu.aurc"):
            est = r.intervals[key]
            assert est.value == pytest.approx(getattr(r, key.split(".")[0])[key.split(".")[1]], nan_ok=True)
            assert est.low <= est.high or math.isnan(est.value), key  # a random model is never 75% sure: NaN
        assert r.intervals["text.accuracy"].low <= r.text["accuracy"] <= r.intervals["text.accuracy"].high
        np.testing.assert_array_equal(np.unique(r.token_predictions.cluster), [0, 1])
    assert fp.vs_reference == {}
    d = w4.vs_reference["text.nll"]["difference"]
    assert d.value == pytest.approx(w4.text["nll"] - fp.text["nll"])
    assert w4.vs_reference["text.perplexity"]["ratio"].value == pytest.approx(w4.text["perplexity"] / fp.text["perplexity"])


def _preds(conf, correct, cluster, nll):
    return Predictions(np.asarray(conf, float), np.asarray(correct), np.zeros(len(conf), int), np.asarray(cluster),
                       {"nll": np.asarray(nll, float)})


def test_paired_interval_is_narrower_than_the_two_separate_ones():
    """A variant whose per-window NLL moves with the reference's: the paired bootstrap of the difference
    cancels the shared window-to-window variation, so its interval is much narrower than the marginal ones."""
    rng = np.random.default_rng(0)
    windows, per = 30, 100
    cluster = np.repeat(np.arange(windows), per)
    hard = np.repeat(rng.uniform(1, 5, windows), per)  # shared difficulty per window
    nll_fp = hard + rng.normal(0, 0.2, hard.size)
    nll_q = nll_fp + 0.1 + rng.normal(0, 0.05, hard.size)
    conf = rng.uniform(0.2, 0.9, hard.size)
    correct = rng.random(hard.size) < conf
    preds = {"fp": _preds(conf, correct, cluster, nll_fp), "q": _preds(conf, correct, cluster, nll_q)}
    res = reduce({"text": preds}, EvalConfig(bootstrap=BootstrapConfig(resamples=400)), "fp")
    diff = res["q"].vs_reference["text.nll"]["difference"]
    assert diff.value == pytest.approx(0.1, abs=0.01) and diff.low < 0.1 < diff.high
    assert 0 < diff.high - diff.low < 0.1 * (res["q"].intervals["text.nll"].high - res["q"].intervals["text.nll"].low)
    ratio = res["q"].vs_reference["text.perplexity"]["ratio"]
    assert ratio.value == pytest.approx(np.exp(0.1), abs=0.02) and ratio.low < ratio.value < ratio.high
    # same confidences: the calibration difference is exactly 0 in every resample
    assert res["q"].vs_reference["text.ece"]["difference"] == Estimate(0.0, 0.0, 0.0)
    # deterministic by seed; a shard-wise collection concatenated reduces to the same numbers
    again = reduce({"text": {k: Predictions.concatenate([_preds(p.confidence[:1500], p.correct[:1500],
                                                                 p.cluster[:1500], p.values["nll"][:1500]),
                                                         _preds(p.confidence[1500:], p.correct[1500:],
                                                                p.cluster[1500:] - 15, p.values["nll"][1500:])])
                             for k, p in preds.items()}}, EvalConfig(bootstrap=BootstrapConfig(resamples=400)), "fp")
    assert again["q"].intervals == res["q"].intervals and again["q"].vs_reference == res["q"].vs_reference


def test_mmlu_subset_is_stratified_and_stable(tokenizer):
    items = load_mmlu("report")
    a = stratified_items(items, 3, seed=0)
    assert len(a) == 57 * 3 and len({it.subject for it in a}) == 57
    assert [it.item_id for it in a] == [it.item_id for it in stratified_items(items, 3, seed=0)]
    assert [it.item_id for it in a] != [it.item_id for it in stratified_items(items, 3, seed=1)]
    fit = {it.item_id for it in load_mmlu("fit")}
    assert not fit & {it.item_id for it in a}  # temperatures are never fitted on reported items
    prompt = mmlu_prompt(a[0], tokenizer, use_template=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "A. " in prompt and "D. " in prompt
    assert len(set(letter_token_ids(tokenizer, True))) == 4


def test_too_few_eval_windows_is_a_clear_error(tiny_model, tokenizer):
    from quant.errors import CalqError
    cfg = EvalConfig(text=TextEvalConfig(windows=100_000, seq_len=512), mmlu=None)
    with pytest.raises(CalqError, match="lower evaluation.text.windows"):
        evaluate({"fp": tiny_model}, tokenizer, cfg, reference="fp")


def test_mmlu_without_a_chat_template_scores_the_letters_that_follow_answer(tiny_model, tokenizer):
    """A base model's tokenizer has no chat template: the prompt ends in "Answer:", so the letters scored are " A",
    " B", ... (one decision drives both), and the prompt gets the tokenizer's own special tokens."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    item = MCItem("t", "general knowledge", "Which is first?", ("alpha", "beta", "gamma", "delta"), 0)
    probs = mmlu_probabilities({"m": tiny_model}, plain, [item], MMLUConfig(chat_template=True))["m"][0]
    prompt = mmlu_prompt(item, plain, use_template=False)
    assert prompt.endswith("\nAnswer:")
    logits = tiny_model(input_ids=torch.tensor([plain(prompt)["input_ids"]])).logits[0, -1]
    letters = [plain.encode(f" {letter}", add_special_tokens=False)[0] for letter in "ABCD"]
    assert letter_token_ids(plain, False) == letters != letter_token_ids(plain, True)
    np.testing.assert_allclose(probs, logits[letters].softmax(-1).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_windows_start_with_the_tokenizers_bos_which_is_never_a_target(tiny_model, bos_tokenizer, tokenizer):
    bos = bos_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special_prefix(bos_tokenizer) == [bos] and special_prefix(tokenizer) == []
    cfg = TextEvalConfig(windows=3, seq_len=64)
    with_bos, plain = eval_windows(bos_tokenizer, cfg), eval_windows(tokenizer, cfg)
    assert all(len(w) == 64 and w[0] == bos and (w[1:] != bos).all() for w in with_bos)
    assert torch.equal(with_bos[0][1:], plain[0][:63])  # the same text, shifted by the BOS
    preds = collect_text({"fp": tiny_model}, with_bos, "fp")["fp"]
    assert len(preds.correct) == 3 * 63  # every text token is a target, the BOS none


def test_mmlu_k_shot_uses_the_standard_prompt_with_examples_from_the_fit_split(tiny_model, tokenizer):
    from quant.checks.evaluation import mmlu_shots

    cfg = MMLUConfig(per_subject=1, shots=5, chat_template=False, batch_size=4)
    assert cfg.mode == "5-shot" and MMLUConfig().mode == "zero-shot"
    with pytest.raises(ValueError, match="k-shot uses the standard plain prompt"):
        MMLUConfig(shots=5)
    shots = mmlu_shots(cfg)
    fit = {it.item_id for it in load_mmlu("fit")}
    assert len(shots) == 57 and all(len(v) == 5 and {s.item_id for s in v} <= fit for v in shots.values())
    assert all(s.subject == subject for subject, v in shots.items() for s in v)
    item = stratified_items(load_mmlu("report"), 1, 0)[0]
    prompt = mmlu_prompt(item, tokenizer, False, shots[item.subject])
    first = shots[item.subject][0]
    assert prompt.startswith(f"The following are multiple choice questions (with answers) about "
                             f"{item.subject.replace('_', ' ')}.\n\n{first.question}\nA. {first.choices[0]}\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith(f"D. {item.choices[3]}\nAnswer:")
    assert f"Answer: {'ABCD'[first.answer]}\n\n" in prompt
    probs = mmlu_probabilities({"m": tiny_model}, tokenizer, [item], cfg)["m"][0]
    logits = tiny_model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
    letters = [tokenizer.encode(f" {x}", add_special_tokens=False)[0] for x in "ABCD"]
    np.testing.assert_allclose(probs, logits[letters].softmax(-1).detach().numpy(), rtol=1e-4, atol=1e-6)
