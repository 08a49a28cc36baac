"""quant.metrics against reference implementations (torchmetrics, netcal, sklearn, torch) and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from quant.confidence import metrics as m


def sample(n: int, seed: int = 0, power: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Miscalibrated data: P(correct) = confidence**power, confidence never exactly 0 or 1."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.05, 0.999, n)
    return conf, rng.random(n) < conf**power


def softmax_probs(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, classes))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in probs])  # calibrated labels, then a sharper model
    return probs, labels


# ----------------------------------------------------------------------------------------------
# ECE / MCE against reference implementations


@pytest.mark.parametrize("seed,n_bins", [(0, 15), (1, 10), (2, 7), (3, 1)])
def test_ece_mce_match_torchmetrics_binary(seed, n_bins):
    # torchmetrics' binary version bins preds and compares with the mean target, which is exactly
    # ece(confidence, correct) when preds=confidence and target=correct.
    conf, correct = sample(4000, seed)
    p, t = torch.from_numpy(conf), torch.from_numpy(correct).long()
    assert m.ece(conf, correct, n_bins) == pytest.approx(binary_calibration_error(p, t, n_bins, "l1").item(), abs=1e-6)
    assert m.mce(conf, correct, n_bins) == pytest.approx(binary_calibration_error(p, t, n_bins, "max").item(), abs=1e-6)
    assert m.ece(conf, correct, n_bins) > 0.02  # the data really is miscalibrated, so the match is not 0 == 0


@pytest.mark.parametrize("classes", [2, 5])
def test_ece_mce_match_torchmetrics_multiclass(classes):
    probs, labels = softmax_probs(3000, classes, seed=classes)
    sharp = probs**2 / (probs**2).sum(1, keepdims=True)  # over-confident version of a calibrated model
    p32 = torch.from_numpy(sharp).float()
    # torchmetrics takes max / argmax itself and bins in float32; feed ours the same float32 confidences.
    # Drop rows whose float32 confidence rounds to exactly 1.0 (a few do for 2 classes): torchmetrics puts
    # those in an extra bin (see test_confidence_one_goes_in_last_bin).
    keep = p32.max(1).values < 1.0
    p32, labels = p32[keep], labels[keep.numpy()]
    assert keep.sum() > 2900
    conf32, pred = p32.max(1)
    correct = (pred == torch.from_numpy(labels)).numpy()
    conf = conf32.double().numpy()
    target = torch.from_numpy(labels)
    want_l1 = multiclass_calibration_error(p32, target, classes, 15, "l1").item()
    want_max = multiclass_calibration_error(p32, target, classes, 15, "max").item()
    # torchmetrics' multiclass path sums the per-bin confidences in float32 (~1e-6 off over ~2000 items in
    # one bin); the same top-label data through its binary path in float64 agrees to rounding
    assert m.ece(conf, correct) == pytest.approx(want_l1, abs=1e-5)
    assert m.mce(conf, correct) == pytest.approx(want_max, abs=1e-5)
    t64 = torch.from_numpy(correct).long()
    assert m.ece(conf, correct) == pytest.approx(binary_calibration_error(conf32.double(), t64).item(), abs=1e-9)
    assert m.mce(conf, correct) == pytest.approx(
        binary_calibration_error(conf32.double(), t64, norm="max").item(), abs=1e-9)
    assert want_l1 > 0.05


def test_torchmetrics_docstring_example():
    conf = [0.25, 0.25, 0.55, 0.75, 0.75]
    correct = [0, 0, 1, 1, 1]
    # bin [0, .5): conf .25, acc 0 -> .25 ; bin [.5, 1]: conf 2.05/3, acc 1 -> .95/3 ; weights 2/5, 3/5
    assert m.ece(conf, correct, n_bins=2) == pytest.approx(0.4 * 0.25 + 0.6 * (0.95 / 3), abs=1e-12)
    assert m.ece(conf, correct, n_bins=2) == pytest.approx(0.29, abs=1e-12)
    assert m.mce(conf, correct, n_bins=2) == pytest.approx(0.95 / 3, abs=1e-12)


def test_confidence_one_goes_in_last_bin():
    # [0, .5) holds 0.2 (wrong); [.5, 1] holds 0.95 (right) and 1.0 (wrong): |.5 - .975| = .475
    conf, correct = [1.0, 0.95, 0.2], [False, True, False]
    assert m.ece(conf, correct, n_bins=2) == pytest.approx((2 * 0.475 + 0.2) / 3, abs=1e-12)
    assert m.mce(conf, correct, n_bins=2) == pytest.approx(0.475, abs=1e-12)
    bins = m.reliability_bins(conf, correct, n_bins=2)
    np.testing.assert_array_equal(bins.count, [1, 2])
    # torchmetrics 1.9 instead gives 1.0 a bin of its own ((1 + .05 + .2) / 3); documented, not followed
    tm = binary_calibration_error(torch.tensor(conf, dtype=torch.float64), torch.tensor([0, 1, 0]), 2, "l1").item()
    assert tm == pytest.approx(1.25 / 3, abs=1e-12)


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_ece_mce_match_netcal(binning):
    netcal = pytest.importorskip("netcal.metrics")
    conf, correct = sample(3001, seed=7)
    equal = binning == "width"
    want_ece = netcal.ECE(bins=15, equal_intervals=equal).measure(conf, correct.astype(int))
    want_mce = netcal.MCE(bins=15, equal_intervals=equal).measure(conf, correct.astype(int))
    assert m.ece(conf, correct, 15, binning) == pytest.approx(want_ece, abs=1e-6)
    assert m.mce(conf, correct, 15, binning) == pytest.approx(want_mce, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# ECE behaviour on synthetic data with a known answer


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_perfectly_calibrated_sample_has_small_ece(binning):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.0, 1.0, 200_000)
    correct = rng.random(conf.size) < conf
    assert m.ece(conf, correct, binning=binning) < 0.01
    assert m.mce(conf, correct, binning=binning) < 0.03


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_overconfident_sample_ece_is_the_gap(binning):
    rng = np.random.default_rng(1)
    n = 200_000
    conf = np.clip(rng.normal(0.9, 0.02, n), 0, 1)  # says ~90%
    correct = rng.random(n) < 0.5  # is right half the time
    assert m.ece(conf, correct, binning=binning) == pytest.approx(0.4, abs=0.01)
    assert m.summarize(conf, correct)["mean_confidence"] - m.summarize(conf, correct)["accuracy"] == pytest.approx(
        0.4, abs=0.01)


def test_reliability_bins_structure():
    conf, correct = sample(5000, seed=3)
    conf = conf[conf < 0.6]  # leaves the upper bins empty
    correct = correct[: conf.size]
    b = m.reliability_bins(conf, correct, n_bins=10)
    np.testing.assert_allclose(b.edges, np.linspace(0, 1, 11), atol=0)
    assert b.count.sum() == conf.size
    assert (b.count[6:] == 0).all() and np.isnan(b.accuracy[6:]).all() and np.isnan(b.confidence[6:]).all()
    full = b.count > 0
    assert ((b.confidence[full] >= b.edges[:-1][full]) & (b.confidence[full] < b.edges[1:][full])).all()
    i = 3  # one bin by hand
    in_bin = (conf >= 0.3) & (conf < 0.4)
    assert b.count[i] == in_bin.sum()
    assert b.accuracy[i] == pytest.approx(correct[in_bin].mean(), abs=1e-12)
    assert b.confidence[i] == pytest.approx(conf[in_bin].mean(), abs=1e-12)
    assert b.ece() == pytest.approx(m.ece(conf, correct, 10), abs=1e-15)
    np.testing.assert_allclose(b.gap[full], b.confidence[full] - b.accuracy[full])


def test_equal_mass_bins_hold_equal_counts():
    conf, correct = sample(3000, seed=4)
    b = m.reliability_bins(conf, correct, n_bins=15, binning="mass")
    assert b.count.sum() == 3000
    assert b.count.min() >= 199 and b.count.max() <= 201
    assert b.edges[0] == 0.0 and b.edges[-1] == 1.0 and (np.diff(b.edges) > 0).all()


# ----------------------------------------------------------------------------------------------
# Brier and NLL


@pytest.mark.parametrize("classes", [2, 4, 10])
def test_brier_matches_torch_formula_and_sklearn(classes):
    probs, labels = softmax_probs(2000, classes, seed=classes)
    onehot = F.one_hot(torch.from_numpy(labels), classes).double()
    want = ((torch.from_numpy(probs) - onehot) ** 2).sum(1).mean().item()
    assert m.brier(probs, labels) == pytest.approx(want, abs=1e-12)
    # sklearn >= 1.7 computes the multiclass score; for 2 classes it halves it by default (binary convention)
    sk = brier_score_loss(labels, probs, labels=list(range(classes)), scale_by_half=False)
    assert m.brier(probs, labels) == pytest.approx(sk, abs=1e-12)


def test_brier_known_values():
    assert m.brier([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0
    assert m.brier([[0.0, 1.0]], [0]) == pytest.approx(2.0)
    assert m.brier([[0.25] * 4], [2]) == pytest.approx(0.75**2 + 3 * 0.25**2)


@pytest.mark.parametrize("classes", [2, 4])
def test_nll_matches_torch_and_sklearn(classes):
    rng = np.random.default_rng(classes)
    logits = torch.from_numpy(rng.normal(0, 3, (1500, classes)))
    labels = torch.from_numpy(rng.integers(0, classes, 1500))
    probs = torch.softmax(logits, 1)
    want = F.cross_entropy(logits, labels).item()
    assert m.nll(probs.numpy(), labels.numpy()) == pytest.approx(want, abs=1e-9)
    assert m.nll(probs, labels) == pytest.approx(F.nll_loss(probs.log(), labels).item(), abs=1e-9)  # tensors in
    assert m.nll(probs.numpy(), labels.numpy()) == pytest.approx(
        log_loss(labels.numpy(), probs.numpy(), labels=list(range(classes))), abs=1e-9)


def test_nll_zero_probability_is_finite():
    assert m.nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(np.finfo(np.float64).eps))
    assert m.nll([[0.5, 0.5]], [0]) == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------------------------
# ranking and selective prediction


def test_auroc_matches_sklearn_and_edge_cases():
    conf, correct = sample(3000, seed=5)
    assert m.auroc(conf, correct) == pytest.approx(roc_auc_score(correct, conf), abs=1e-12)
    assert 0.6 < m.auroc(conf, correct) < 0.9
    assert m.auroc(conf**3, correct) == pytest.approx(m.auroc(conf, correct), abs=1e-12)  # rank-based
    assert m.auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert m.auroc([0.9, 0.8, 0.3, 0.1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(m.auroc([0.9, 0.5], [True, True]))
    assert math.isnan(m.auroc([0.9, 0.5], [False, False]))


def test_risk_coverage_by_hand():
    cov, risk = m.risk_coverage([0.9, 0.3, 0.7, 0.5], [True, False, False, True])
    # order 0.9 (ok), 0.7 (wrong), 0.5 (ok), 0.3 (wrong)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    assert m.aurc([0.9, 0.3, 0.7, 0.5], [True, False, False, True]) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_risk_coverage_ties_are_order_independent():
    rng = np.random.default_rng(6)
    conf = rng.choice([0.5, 0.75, 1.0], 500)  # heavy ties, like low-precision confidences
    correct = rng.random(500) < conf
    _, risk = m.risk_coverage(conf, correct)
    perm = rng.permutation(500)
    np.testing.assert_allclose(m.risk_coverage(conf[perm], correct[perm])[1], risk, atol=1e-12)
    assert risk[-1] == pytest.approx(1 - correct.mean(), abs=1e-12)
    # all tied: every prefix has the expected (overall) error rate
    _, flat = m.risk_coverage(np.full(8, 0.7), [1, 0, 0, 1, 1, 1, 0, 1])
    np.testing.assert_allclose(flat, 3 / 8, atol=1e-12)


@pytest.mark.parametrize("n,n_correct", [(1000, 700), (10, 3), (5, 5), (5, 0)])
def test_aurc_perfect_ranking_is_analytic(n, n_correct):
    conf = np.linspace(1.0, 0.0, n)  # distinct, descending
    correct = np.arange(n) < n_correct  # every right answer more confident than every wrong one
    harmonic = lambda k: sum(1 / i for i in range(1, k + 1))  # noqa: E731
    # risk at k > n_c is (k - n_c) / k, zero before
    want = ((n - n_correct) - n_correct * (harmonic(n) - harmonic(n_correct))) / n
    assert m.aurc(conf, correct) == pytest.approx(want, abs=1e-12)


def test_aurc_limits():
    n, r = 100_000, 0.3
    correct = np.arange(n) >= int(r * n)  # the first 30% are wrong...
    conf = np.linspace(0.0, 1.0, n)  # ...and least confident: perfect ranking
    assert m.aurc(conf, correct) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-4)  # Geifman et al.
    # worst ranking, wrong answers first: risk 1 up to coverage r, then r / coverage
    assert m.aurc(1 - conf, correct) == pytest.approx(r + r * math.log(1 / r), abs=1e-4)
    rng = np.random.default_rng(7)
    assert m.aurc(rng.random(n), correct) == pytest.approx(r, abs=0.01)  # uninformative confidence


def test_selective_at():
    conf = [0.95, 0.9, 0.8, 0.6, 0.4]
    correct = [True, True, False, True, False]
    assert m.selective_at(conf, correct, 0.85) == (0.4, 1.0)
    cov, acc = m.selective_at(conf, correct, 0.6)  # >= includes the threshold itself
    assert cov == pytest.approx(0.8) and acc == pytest.approx(0.75)
    assert m.selective_at(conf, correct, 0.0) == (1.0, 0.6)
    cov, acc = m.selective_at(conf, correct, 0.99)
    assert cov == 0.0 and math.isnan(acc)


# ----------------------------------------------------------------------------------------------
# bootstrap


def interval(key: str, conf, correct, n_boot: int, seed: int = 0, cluster=None) -> tuple[float, float, float]:
    """(point, low, high) of one summarize() metric, the way the evaluation bootstraps it."""
    point = m.summarize(conf, correct)[key]
    cluster = np.arange(len(conf)) if cluster is None else cluster
    resampled = np.concatenate([m.summarize_batched(conf, correct, w)[key]
                                for w in m.cluster_resamples(cluster, n_boot, seed)])
    return (point, *m.percentile_interval(resampled))


def test_bootstrap_contains_point_and_is_deterministic():
    conf, correct = sample(5000, seed=8)
    point, low, high = interval("ece", conf, correct, n_boot=500, seed=3)
    assert point == pytest.approx(m.ece(conf, correct), abs=1e-12)
    assert low < point < high
    assert 0.002 < high - low < 0.05
    assert interval("ece", conf, correct, n_boot=500, seed=3) == (point, low, high)
    assert interval("ece", conf, correct, n_boot=500, seed=4) != (point, low, high)


def test_bootstrap_narrows_with_more_data():
    widths = []
    for n in (2000, 32_000):
        conf, correct = sample(n, seed=9)
        _, low, high = interval("aurc", conf, correct, n_boot=200)
        widths.append(high - low)
    assert widths[0] / widths[1] == pytest.approx(4.0, rel=0.35)  # width ~ 1/sqrt(n)


def test_bootstrap_skips_nan_resamples():
    # tiny sample: some resamples are all-correct, where AUROC is NaN; those are skipped
    _, low, high = interval("auroc", [0.9, 0.8, 0.3, 0.2], [1, 1, 1, 0], n_boot=200)
    assert 0.0 <= low <= high <= 1.0
    assert all(np.isnan(m.percentile_interval(np.array([np.nan, np.nan]))))


# ----------------------------------------------------------------------------------------------
# summary and validation


def test_summarize():
    conf, correct = sample(4000, seed=13)
    nll = -np.log(np.where(correct, conf, 1 - conf))
    s = m.summarize(conf, correct, n_bins=10, threshold=0.8, means={"nll": nll})
    assert set(s) == {"n", "accuracy", "mean_confidence", "ece", "ece_mass", "mce", "auroc", "aurc",
                      "selective_coverage", "selective_accuracy", "nll"}
    assert s["n"] == 4000
    assert s["accuracy"] == pytest.approx(correct.mean()) and s["mean_confidence"] == pytest.approx(conf.mean())
    assert s["ece"] == pytest.approx(m.ece(conf, correct, 10), abs=1e-12)
    assert s["ece_mass"] == pytest.approx(m.ece(conf, correct, 10, "mass"), abs=1e-12)
    assert s["mce"] == pytest.approx(m.mce(conf, correct, 10), abs=1e-12)
    assert s["auroc"] == pytest.approx(roc_auc_score(correct, conf), abs=1e-12)
    assert s["aurc"] == pytest.approx(m.aurc(conf, correct), abs=1e-12)
    assert (s["selective_coverage"], s["selective_accuracy"]) == pytest.approx(m.selective_at(conf, correct, 0.8))
    assert s["nll"] == pytest.approx(nll.mean())


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_rows_equal_the_metrics_of_repeated_items(ties):
    """A resample row of integer weights means "item i drawn w_i times": every batched metric must equal
    the plain metric on the explicitly repeated items (ties included: equal-mass edges, AUROC, AURC)."""
    rng = np.random.default_rng(15)
    conf, correct = sample(700, seed=15)
    if ties:
        conf = np.round(conf * 4) / 4  # 5 distinct values, many exactly 1.0
    weights = rng.integers(0, 4, (6, conf.size))
    batched = m.summarize_batched(conf, correct, weights, n_bins=12, threshold=0.7)
    for row, w in enumerate(weights):
        rep = np.repeat(np.arange(conf.size), w)
        c, k = conf[rep], correct[rep]
        want = {"ece": m.ece(c, k, 12), "ece_mass": m.ece(c, k, 12, "mass"), "mce": m.mce(c, k, 12),
                "auroc": roc_auc_score(k, c), "aurc": m.aurc(c, k), "accuracy": k.mean(), "n": len(rep),
                "selective_coverage": m.selective_at(c, k, 0.7)[0], "selective_accuracy": m.selective_at(c, k, 0.7)[1]}
        for key, value in want.items():
            assert batched[key][row] == pytest.approx(value, abs=1e-12), (key, row)


def test_cluster_bootstrap_is_wider_for_correlated_items():
    """Tokens of one window share its difficulty: resampling items as if independent understates the
    uncertainty; resampling whole windows does not."""
    rng = np.random.default_rng(16)
    windows, per = 40, 500
    difficulty = np.repeat(rng.uniform(0.2, 0.8, windows), per)  # per-window accuracy
    conf = np.clip(difficulty + rng.normal(0, 0.05, difficulty.size), 0.01, 0.99)
    correct = rng.random(difficulty.size) < difficulty
    cluster = np.repeat(np.arange(windows), per)
    _, lo_i, hi_i = interval("accuracy", conf, correct, n_boot=300)
    _, lo_c, hi_c = interval("accuracy", conf, correct, n_boot=300, cluster=cluster)
    assert (hi_c - lo_c) > 4 * (hi_i - lo_i)
    # the cluster interval covers the window-level spread: sd of 40 window means ~ 0.173 / sqrt(40)
    assert (hi_c - lo_c) == pytest.approx(2 * 1.96 * difficulty[::per].std() / np.sqrt(windows), rel=0.3)


def test_cluster_resamples_draw_whole_clusters_deterministically():
    cluster = np.array([5, 5, 5, 9, 9, 2])
    rows = np.concatenate(list(m.cluster_resamples(cluster, n_boot=50, seed=1, max_cells=60)))  # 5 chunks
    assert rows.shape == (50, 6)
    assert (rows[:, 0] == rows[:, 1]).all() and (rows[:, 1] == rows[:, 2]).all() and (rows[:, 3] == rows[:, 4]).all()
    np.testing.assert_array_equal(rows[:, [0, 3, 5]].sum(1), 3)  # 3 clusters drawn per resample
    again = np.concatenate(list(m.cluster_resamples(cluster, n_boot=50, seed=1, max_cells=60)))
    np.testing.assert_array_equal(rows, again)


def test_torch_inputs():
    conf, correct = sample(1000, seed=14)
    got = m.ece(torch.from_numpy(conf).to(torch.bfloat16), torch.from_numpy(correct))
    assert got == pytest.approx(m.ece(torch.from_numpy(conf).to(torch.bfloat16).double().numpy(), correct), abs=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda: m.ece([0.5, 0.6], [True]), "length mismatch"),
    (lambda: m.ece([], []), "empty"),
    (lambda: m.ece([0.5, 1.2], [True, False]), r"outside \[0, 1\]"),
    (lambda: m.ece([0.5, -0.1], [True, False]), r"outside \[0, 1\]"),
    (lambda: m.ece([0.5, float("nan")], [True, False]), r"outside \[0, 1\]"),
    (lambda: m.aurc([0.5, 0.6], [1, 2]), "bool or 0/1"),
    (lambda: m.ece([[0.5]], [[True]]), "1-D"),
    (lambda: m.ece([0.5], [True], n_bins=0), "n_bins"),
    (lambda: m.ece([0.5], [True], binning="quantile"), "binning"),
    (lambda: m.selective_at([0.5], [True, False], 0.5), "length mismatch"),
    (lambda: m.brier([0.5, 0.5], [0, 1]), "2-D"),
    (lambda: m.brier([[0.5, 0.5]], [2]), "labels outside"),
    (lambda: m.nll([[0.5, 0.5]], [0, 1]), "length mismatch"),
    (lambda: m.nll([[2.0, -1.0]], [0]), "not logits"),
])
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
