import copy

import pytest
import torch

from quant.recalibrate import RecalibrateConfig, apply_temperature, fit_temperature


@pytest.fixture
def peaked(tiny_model):
    """A random tiny model's logits are ~0.1 (near-uniform softmax, a flat objective): sharpen them."""
    apply_temperature(tiny_model, 0.05)
    return tiny_model


@pytest.fixture
def sampled_text(peaked):
    """Sequences sampled from the model itself: the model is calibrated on them by construction."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros((24, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(63):
            probs = peaked(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return list(ids)


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


def test_labelled_fit_undoes_overconfidence(peaked, sampled_text):
    overconfident = copy.deepcopy(peaked)
    apply_temperature(overconfident, 0.5)
    fit = fit_temperature(overconfident, sampled_text, RecalibrateConfig(method="labelled", positions=1500))
    assert fit.temperature == pytest.approx(2.0, rel=0.15)
    calibrated = fit_temperature(peaked, sampled_text, RecalibrateConfig(method="labelled", positions=1500))
    assert calibrated.temperature == pytest.approx(1.0, rel=0.15)


def test_label_free_needs_reference(tiny_model, sampled_text):
    with pytest.raises(ValueError, match="needs the full-precision reference"):
        fit_temperature(tiny_model, sampled_text, RecalibrateConfig(method="label_free"))
