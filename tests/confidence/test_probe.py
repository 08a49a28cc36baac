import numpy as np
import pytest

from quant.confidence import metrics
from quant.confidence.probe import Probe, ProbeConfig, fit_probe, signal_matrix
from quant.errors import CalqError


def _choice_probs(rng, n: int, k: int = 4) -> np.ndarray:
    z = rng.normal(size=(n, k)) * rng.uniform(0.2, 3.0, size=(n, 1))
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_the_probe_recovers_a_signal_the_confidence_does_not_carry():
    """Correctness depends on one hidden feature, not on the choice probabilities: the probe, fitted on one half,
    ranks the other half far better than max-probability does."""
    rng = np.random.default_rng(0)
    n = 600
    probs = _choice_probs(rng, n)
    hidden = rng.normal(size=(n, 8))
    correct = hidden[:, 3] + 0.3 * rng.normal(size=n) > 0
    x = signal_matrix(probs, hidden, ("max_prob", "entropy", "margin", "hidden"))
    fit, rep = slice(0, n // 2), slice(n // 2, n)
    for kind in ("logistic", "mlp"):
        probe = fit_probe(x[fit], correct[fit], ProbeConfig(kind=kind, C=1.0))
        internal, external = metrics.auroc(probs[rep].max(1), correct[rep]), metrics.auroc(probe.predict(x[rep]), correct[rep])
        assert abs(internal - 0.5) < 0.1 and external > 0.85, (kind, internal, external)


def test_a_logistic_probe_on_max_probability_alone_ranks_as_max_probability():
    """One feature, a logistic map: monotone increasing in max-probability (when it predicts right answers from
    high confidence), so the AUROC is the internal one exactly."""
    rng = np.random.default_rng(1)
    probs = _choice_probs(rng, 400)
    conf = probs.max(1)
    correct = rng.uniform(size=400) < conf
    x = signal_matrix(probs, None, ("max_prob",))
    probe = fit_probe(x[:200], correct[:200], ProbeConfig(signals=("max_prob",)))
    assert probe.layers[0][0][0, 0] > 0
    assert metrics.auroc(probe.predict(x[200:]), correct[200:]) == pytest.approx(metrics.auroc(conf[200:], correct[200:]),
                                                                                 abs=1e-12)


def test_signals_are_what_they_say():
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]])  # padded / certain columns: 0 * log 0 = 0
    x = signal_matrix(probs, np.array([[1.0, 2.0], [3.0, 4.0]]), ("margin", "entropy", "max_prob", "hidden"))
    entropy = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2))
    np.testing.assert_allclose(x, [[0.2, entropy, 0.5, 1.0, 2.0], [1.0, 0.0, 1.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match="no hidden states"):
        signal_matrix(probs, None, ("hidden",))


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_a_probe_survives_json_and_is_deterministic(kind):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 5))
    y = x[:, 0] > 0
    cfg = ProbeConfig(kind=kind, signals=("max_prob", "hidden"), seed=3)
    probe = fit_probe(x, y, cfg, "task t, loglikelihood")
    again = Probe.from_json(probe.to_json())
    np.testing.assert_array_equal(again.predict(x), probe.predict(x))
    np.testing.assert_array_equal(fit_probe(x, y, cfg).predict(x), probe.predict(x))
    assert (again.signals, again.scoring, again.fit_items) == (("max_prob", "hidden"), "task t, loglikelihood", 64)


def test_probe_inputs_name_the_problem():
    with pytest.raises(CalqError, match="all 20 probe fit items are right"):
        fit_probe(np.ones((20, 1)), np.ones(20, bool), ProbeConfig())
    with pytest.raises(ValueError, match="distinct"):
        ProbeConfig(signals=("max_prob", "max_prob"))
    probe = fit_probe(np.arange(20.0)[:, None], np.arange(20) > 9, ProbeConfig(signals=("max_prob",)))
    with pytest.raises(ValueError, match="reads 1 features, got shape"):
        probe.predict(np.ones((3, 2)))
