import copy
import importlib

import numpy as np
import pytest
import torch

from quant.confidence import metrics
from quant.data import MCItem
from quant.checks.evaluation import MMLUConfig, collect_mmlu, collect_text
from quant.confidence.lens import layer_calibration
from quant.confidence.recalibrate import (T_BOUNDS, RecalibrateConfig, Tempered, apply_direction, apply_temperature,
                                          calibration_direction, direction_carrier, fit_direction, fit_positions,
                                          fit_rows, fit_temperature, recalibrate, reference_logits, solve_temperature)
from quant.errors import CalqError


def sample_from(model, sequences: int = 24, length: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Sequences sampled from the model itself: the model is calibrated on them by construction."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((sequences, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = model(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return list(ids)


@pytest.fixture
def peaked(tiny_model):
    """A random tiny model's logits are ~0.1 (near-uniform softmax, a flat objective): sharpen them."""
    apply_temperature(tiny_model, 0.05)
    return tiny_model


@pytest.fixture
def sampled_text(peaked):
    return sample_from(peaked)


@pytest.fixture
def moderate(tiny_model):
    """Sharpened less than `peaked`: on its own samples about half its top-1 predictions are right
    (measured for llama: accuracy 0.54, mean confidence 0.56), so over-confidence has room to show."""
    apply_temperature(tiny_model, 0.2)
    return tiny_model


def test_apply_temperature_divides_logits(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 12))
    scaled = copy.deepcopy(tiny_model)
    apply_temperature(scaled, 2.5)
    torch.testing.assert_close(scaled(input_ids=ids).logits, tiny_model(input_ids=ids).logits / 2.5,
                               rtol=1e-4, atol=1e-5)


def test_label_free_recovers_an_injected_temperature_exactly(peaked, sampled_text):
    overconfident = copy.deepcopy(peaked)
    apply_temperature(overconfident, 0.5)  # logits x2
    fit = fit_temperature(overconfident, sampled_text, RecalibrateConfig(method="label_free", positions=512),
                          reference=peaked)
    assert fit.temperature == pytest.approx(2.0, rel=2e-3)
    assert fit.objective_after < fit.objective_before


def _objective(z, target, labelled, temperature):
    """The objective written plainly in float64: mean NLL of the target (labelled) or cross-entropy to p_ref."""
    zt = z.double() / temperature
    lse = zt.logsumexp(-1)
    return float((lse - (zt.gather(-1, target[:, None])[:, 0] if labelled else target.double() / temperature)).mean())


@pytest.mark.parametrize("scale,labelled", [(3.0, True), (3.0, False), (0.05, True), (60.0, False)])
def test_the_newton_solve_finds_the_minimum_a_scalar_search_finds(scale, labelled):
    """Against scipy's bounded search on the float64 objective: the same T to 1e-5, also when the minimum lies
    beyond a bound (the targets follow the logits at T = scale / 1.5: 2 inside the bounds, 0.033 and 40 beyond them)."""
    from scipy.optimize import minimize_scalar

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(300, 50, generator=g) * scale).half()
    p_ref = (z.float() * 1.5 / scale).softmax(-1)  # the logits at T = scale / 1.5 (2 for scale 3)
    target = torch.multinomial(p_ref, 1, generator=g)[:, 0] if labelled else (p_ref * z.float()).sum(-1)
    fit = solve_temperature(z, target, "labelled" if labelled else "label_free")
    lo, hi = np.log(T_BOUNDS)
    best = np.exp(minimize_scalar(lambda lt: _objective(z, target, labelled, np.exp(lt)), bounds=(lo, hi),
                                  method="bounded", options={"xatol": 1e-9}).x)
    assert fit.temperature == pytest.approx(best, rel=1e-5)
    assert fit.objective_before == pytest.approx(_objective(z, target, labelled, 1.0), rel=1e-5)
    assert fit.objective_after == pytest.approx(_objective(z, target, labelled, fit.temperature), rel=1e-5)
    assert fit.at_bound == (scale in (0.05, 60.0))


def test_labelled_fit_undoes_overconfidence(peaked, sampled_text):
    overconfident = copy.deepcopy(peaked)
    apply_temperature(overconfident, 0.5)
    fit = fit_temperature(overconfident, sampled_text, RecalibrateConfig(method="labelled", positions=1500))
    assert fit.temperature == pytest.approx(2.0, rel=0.15)
    calibrated = fit_temperature(peaked, sampled_text, RecalibrateConfig(method="labelled", positions=1500))
    assert calibrated.temperature == pytest.approx(1.0, rel=0.15)


def test_label_free_needs_reference(tiny_model):
    with pytest.raises(ValueError, match="needs the full-precision reference"):
        fit_temperature(tiny_model, [torch.arange(20)], RecalibrateConfig(method="label_free"))


@pytest.mark.parametrize("family", ["llama"])
def test_label_free_recalibration_repairs_an_overconfident_model(moderate):
    """Fit on calibration samples, measured on other (held-out) samples: ECE drops back to the reference's."""
    overconfident = copy.deepcopy(moderate)
    apply_temperature(overconfident, 0.5)  # logits x2
    fit_text, heldout = sample_from(moderate, 16, 48, seed=0), sample_from(moderate, 16, 48, seed=1)
    fixed = recalibrate(overconfident, fit_text, RecalibrateConfig(method="label_free", positions=512),
                        reference=moderate)
    assert fixed.fit.temperature == pytest.approx(2.0, rel=0.05)
    assert overconfident.model.norm.weight is not fixed.model.model.norm.weight  # a copy; the input is untouched
    preds = collect_text({"fp": moderate, "over": overconfident, "fixed": fixed.model}, heldout, "fp")
    ece = {name: metrics.ece(p.confidence, p.correct) for name, p in preds.items()}
    assert ece["over"] > 0.2 and ece["fixed"] < 0.06 and ece["fixed"] == pytest.approx(ece["fp"], abs=0.02)
    np.testing.assert_array_equal(preds["fixed"].prediction, preds["over"].prediction)  # T never changes top-1


def test_tempered_view_evaluates_like_the_folded_checkpoint(moderate, tokenizer):
    """A Tempered entry (read from its base model's pass) gives the metrics of the checkpoint with T folded in,
    on text, MMLU letters and every layer of the logit lens."""
    folded = copy.deepcopy(moderate)
    apply_temperature(folded, 1.7)
    models = {"fp": moderate, "folded": folded, "view": Tempered("fp", 1.7)}
    text = collect_text(models, sample_from(moderate, 4, 40), "fp")
    np.testing.assert_array_equal(text["view"].prediction, text["folded"].prediction)
    np.testing.assert_allclose(text["view"].confidence, text["folded"].confidence, rtol=1e-4, atol=1e-6)
    for key in ("nll", "brier", "kl_to_reference"):
        np.testing.assert_allclose(text["view"].values[key], text["folded"].values[key], rtol=1e-4, atol=1e-5)
    assert text["view"].values["kl_to_reference"].mean() > 0.01  # T = 1.7 does move the distribution
    items = [MCItem(str(i), "s", f"question {i}?", ("alpha", "beta", "gamma", "delta"), i % 4) for i in range(6)]
    mmlu = collect_mmlu(models, tokenizer, items, MMLUConfig(batch_size=4))
    np.testing.assert_allclose(mmlu["view"].confidence, mmlu["folded"].confidence, rtol=1e-4, atol=1e-6)
    lens = layer_calibration(models, sample_from(moderate, 2, 40, seed=3), n_bins=10).layers
    for view_row, folded_row in zip(lens["view"], lens["folded"]):
        assert view_row == pytest.approx(folded_row, abs=1e-5)
    assert lens["view"][-1]["mean_confidence"] < lens["fp"][-1]["mean_confidence"] - 0.01


def test_tempered_view_needs_a_module_as_base(tiny_model):
    with pytest.raises(ValueError, match="'t' is tempered from 'missing'"):
        collect_text({"fp": tiny_model, "t": Tempered("missing", 2.0)}, [torch.arange(10)], "fp")


def test_dual_align_is_label_free_when_the_models_never_disagree(peaked, sampled_text):
    """A temperature never changes a top token, so the process term is empty and dual_align recovers the injected
    T exactly as label_free does; the divergence profile still sees the temperature at every layer."""
    overconfident = copy.deepcopy(peaked)
    apply_temperature(overconfident, 0.5)  # logits x2, at every layer's readout
    fits = {m: fit_temperature(overconfident, sampled_text, RecalibrateConfig(method=m, positions=512), peaked)
            for m in ("label_free", "dual_align")}
    process = fits["dual_align"].process
    assert process.disagree == 0 and process.rows == 0
    assert fits["dual_align"].temperature == pytest.approx(fits["label_free"].temperature, rel=1e-9)
    assert fits["dual_align"].temperature == pytest.approx(2.0, rel=2e-3)
    assert min(process.js_by_layer) > 0 and 1 <= process.peak_layer <= peaked.config.num_hidden_layers


def _perturbed(model, layer: int, scale: float = 8.0):
    """A stand-in for a quantized model: noise on one decoder layer's MLP output weights (top tokens change)."""
    other = copy.deepcopy(model)
    w = other.model.layers[layer].mlp.down_proj.weight
    w += scale * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    return other


@pytest.mark.parametrize("family", ["llama"])
def test_dual_align_adds_the_disagreeing_positions_after_the_peak_layer(moderate):
    """Noise in the last layer only: the readouts of layers 0..L-1 are identical (divergence 0), so the peak is L
    and the process term is the last layer's cross-entropy on the disagreeing positions. The fit must then be the
    temperature of the two-term objective built here from label_free's rows, and w = 0 must be label_free."""
    samples = sample_from(moderate)
    noisy = _perturbed(moderate, layer=moderate.config.num_hidden_layers - 1)
    cfg = RecalibrateConfig(method="dual_align", positions=4096, profile_positions=1024)
    fit = fit_temperature(noisy, samples, cfg, moderate)
    process = fit.process
    assert max(process.js_by_layer[:-1]) < 1e-6 and process.js_by_layer[-1] > 0.01  # float32 rounding only
    assert process.peak_layer == moderate.config.num_hidden_layers
    assert process.disagree > 50 and process.rows == process.disagree  # one layer after the peak: all fit

    # the same objective from label_free's pieces: every position's final logits, p_ref . z, agreement
    free = RecalibrateConfig(method="label_free", positions=4096)
    picks = fit_positions(samples, free)
    z_all = torch.cat([noisy(input_ids=ids[None, :-1]).logits[0, pos].half() for ids, pos in picks])
    p_ref = torch.cat([moderate(input_ids=ids[None, :-1]).logits[0, pos].softmax(-1) for ids, pos in picks])
    t_all = (p_ref * z_all.float()).sum(-1)
    agree = p_ref.argmax(-1) == z_all.float().argmax(-1)
    assert int((~agree).sum()) == process.disagree
    weights = torch.where(agree, 1 / agree.sum(), 1 / (~agree).sum()).double()
    expected = solve_temperature(z_all, t_all, "label_free", weights / weights.sum())
    assert fit.temperature == pytest.approx(expected.temperature, rel=2e-3)
    label_free = fit_temperature(noisy, samples, free, moderate)
    assert abs(fit.temperature - label_free.temperature) > 0.01  # the process term moved it
    unweighted = fit_temperature(noisy, samples, cfg.model_copy(update={"process_weight": 0.0}), moderate)
    assert unweighted.temperature == pytest.approx(label_free.temperature, rel=1e-9)


@pytest.mark.parametrize("family", ["llama"])
def test_dual_align_profile_starts_where_the_models_part(moderate):
    samples = sample_from(moderate, sequences=8)
    rows = fit_rows(_perturbed(moderate, layer=0), samples, RecalibrateConfig(method="dual_align", positions=1024),
                    moderate)
    js = rows.process.js_by_layer
    assert js[0] < 1e-6 and js[1] > 1e-3  # embeddings identical, layer 0's output not
    assert rows.weights is not None and float(rows.weights.sum()) == pytest.approx(1.0)
    agree = len(rows.z) - rows.process.rows  # the confidence rows come first, weighted 1 / their count
    assert rows.process.rows > 0 and agree + rows.process.disagree == 8 * 63  # every position of 8 x 64 tokens
    assert float(rows.weights[:agree].sum()) == pytest.approx(0.5) and rows.process.rows <= 1024


@pytest.mark.parametrize("family", ["llama"])
def test_reference_logits_are_computed_once_for_many_fits(peaked, sampled_text):
    """Precomputed reference logits give the fit that the reference model gives, and are refused for other
    samples (whose positions differ)."""
    cfg = RecalibrateConfig(method="label_free", positions=512)
    overconfident = copy.deepcopy(peaked)
    apply_temperature(overconfident, 0.5)
    cached = reference_logits(peaked, sampled_text, cfg)
    assert fit_temperature(overconfident, sampled_text, cfg, cached) == fit_temperature(
        overconfident, sampled_text, cfg, peaked)
    with pytest.raises(ValueError, match="other samples or another recalibrate config"):
        fit_temperature(overconfident, sampled_text[:5], cfg, cached)


@pytest.mark.parametrize("model_type, after", [("gemma2", {"final_logit_softcapping": 0.05}),
                                               ("cohere", {"logit_scale": 0.25}), ("granite", {"logits_scaling": 4.0})])
def test_a_folded_temperature_is_exact_after_scaling_and_soft_capping(model_type, after):
    """Soft-capping: the norm takes 1/T and the cap becomes cap / T, so logits are exactly the old ones / T (a cap
    far below the logits' range, so a fold that ignored it would be far off); constant scales commute with T."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, **after)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (1, 12), device="cpu")
    with torch.no_grad():
        before = model(ids).logits
        apply_temperature(model, 2.5)
        torch.testing.assert_close(model(ids).logits, before / 2.5, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Calibration direction
# ------------------------------------------------------------------------------------------------------------------

DIRECTION = RecalibrateConfig(method="direction", positions=1024, max_top1_change=1.0)


def _stepped(model, samples, cfg, size: float):
    """A stand-in for a quantized model: the reference moved `size` typical residual norms along its own
    calibration direction, at the residual stream entering the final norm. Returns it and the step added."""
    states = reference_logits(model, samples, cfg)
    direction, _ = calibration_direction(states.residual)
    norm = float(torch.cat([r[-1] for r in states.residual]).float().norm(dim=-1).median())
    moved = copy.deepcopy(model)
    apply_direction(moved, size * norm * direction, direction_carrier(moved))
    return moved, size * norm * direction, states


@pytest.mark.parametrize("family", ["llama"])
def test_direction_recovers_an_injected_step(moderate):
    """A step injected along the direction is undone exactly: full precision's distribution is reached again, so
    the label-free objective falls to full precision's entropy."""
    samples = sample_from(moderate, sequences=16)
    moved, injected, states = _stepped(moderate, samples, DIRECTION, 0.3)
    fit = fit_direction(moved, samples, DIRECTION, states)
    assert float((fit.vector + injected).abs().max()) < 2e-3 * float(injected.abs().max())
    assert fit.objective_after < fit.objective_before and not fit.shortened and not fit.at_bound
    assert fit.layers == moderate.config.num_hidden_layers and 0 < fit.explained <= 1
    assert fit.layer == "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("family", ["llama"])
def test_direction_takes_no_step_on_full_precision_itself(moderate):
    samples = sample_from(moderate, sequences=8)
    fit = fit_direction(moderate, samples, DIRECTION, moderate)
    assert abs(fit.alpha) < 2e-3 and fit.objective_after == pytest.approx(fit.objective_before, abs=1e-6)


@pytest.mark.parametrize("family", ["llama"])
def test_direction_keeps_every_top1_token_of_the_fit_positions(moderate):
    """The unconstrained optimum changes some top-1 tokens; with max_top1_change 0 the step is shortened until none
    change, in the folded model's own forward pass, and still improves the objective. On other text (sampled with
    another seed) it keeps at least 99% of them."""
    samples = sample_from(moderate, sequences=16)
    moved, _, states = _stepped(moderate, samples, DIRECTION, 0.3)
    cfg = DIRECTION.model_copy(update={"max_top1_change": 0.0})
    free = fit_direction(moved, samples, DIRECTION, states)
    fit = fit_direction(moved, samples, cfg, states)
    assert free.top1_changed > 0 and fit.shortened and fit.top1_changed == 0
    assert fit.optimum == (free.alpha, free.top1_changed)  # what the step would have been, in the report
    assert 0 < abs(fit.alpha) < abs(free.alpha) and fit.objective_after < fit.objective_before
    repaired = fit.fold(moved)
    for ids, pos in fit_positions(samples, cfg):
        before, after = (m(input_ids=ids[None, :-1]).logits[0, pos].argmax(-1) for m in (moved, repaired))
        assert torch.equal(before, after)
    other = torch.stack(sample_from(moderate, sequences=8, seed=1))
    kept = (moved(input_ids=other).logits.argmax(-1) == repaired(input_ids=other).logits.argmax(-1)).float().mean()
    assert kept >= 0.99


@pytest.mark.parametrize("family", ["llama"])
def test_labelled_direction_fits_the_next_token(moderate):
    """Labelled: the objective is the next token's NLL on every fit position, lowered by the fitted step."""
    samples = sample_from(moderate, sequences=8)
    moved, _, states = _stepped(moderate, samples, DIRECTION, 0.3)
    fit = fit_direction(moved, samples, DIRECTION.model_copy(update={"direction_target": "labelled"}), states)
    assert fit.target == "labelled" and fit.positions == sum(len(p) for _, p in fit_positions(samples, DIRECTION))
    assert fit.objective_after < fit.objective_before


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_direction_is_refused_where_the_checkpoint_cannot_carry_it(tiny_model):
    with pytest.raises(CalqError, match=r"has no mlp_bias switch in its config.*use recalibrate.method: label_free"):
        fit_direction(tiny_model, [torch.arange(40)], DIRECTION, tiny_model)


def test_calibration_direction_is_the_final_layers_dominant_update():
    """Updates h_{l+1} - h_l made of one direction u (with positive weights) plus small noise: the direction is u,
    signed along the updates, and carries nearly all their energy."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    start = torch.randn(50, 32, generator=g)
    steps = [torch.rand(50, 1, generator=g) * u + 0.01 * torch.randn(50, 32, generator=g) for _ in range(3)]
    residual = torch.stack([start + sum(steps[:i], torch.zeros(32)) for i in range(4)])  # (4, positions, hidden)
    direction, explained = calibration_direction([residual[:, :25], residual[:, 25:]])
    assert float(direction @ u) > 0.999 and explained > 0.99


@pytest.mark.parametrize("family", ["llama"])
def test_a_bias_that_does_not_reach_the_final_norm_unchanged_is_refused(moderate, monkeypatch):
    """The fit checks the folded model's own forward against the step it fitted: a carrier whose output goes
    through another layer first (here the first layer's down projection) is refused, not shipped."""
    monkeypatch.setattr(importlib.import_module("quant.confidence.recalibrate"), "direction_carrier", lambda model: "model.layers.0.mlp.down_proj")
    samples = sample_from(moderate, sequences=4)
    moved, _, states = _stepped(moderate, samples, DIRECTION, 0.3)
    with pytest.raises(CalqError, match="does not reach LlamaForCausalLM's final norm unchanged"):
        fit_direction(moved, samples, DIRECTION, states)
