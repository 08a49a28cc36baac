"""Confidence-calibration and selective-prediction metrics for comparing a model with its quantized versions.

Quantization can leave accuracy almost unchanged while shifting how far the model's confidence can be
trusted, so besides accuracy we measure calibration (ECE, MCE, reliability bins, Brier, NLL) and how well
confidence ranks right answers above wrong ones (AUROC, risk-coverage, AURC). All functions are pure,
take 1-D arrays (numpy, lists, or CPU torch tensors) and return plain Python floats or numpy arrays.

Inputs: ``confidence`` is the probability the model gave its predicted class (in [0, 1]) and ``correct``
says whether that prediction was right (bool, or 0/1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Binning = Literal["width", "mass"]

__all__ = [
    "ReliabilityBins", "reliability_bins", "ece", "mce", "brier", "nll", "auroc", "risk_coverage", "aurc",
    "selective_at", "check_predictions", "cluster_resamples", "percentile_interval", "summarize", "summarize_batched",
]


# ----------------------------------------------------------------------------------------------
# input checks


def _array(x: Any, name: str) -> np.ndarray:
    """numpy view of x; torch tensors (including bf16) are detached and moved to CPU first."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as an array ({e})") from None


def check_predictions(confidence: ArrayLike, correct: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Validated (confidence as float64, correct as bool), both 1-D of the same non-zero length."""
    conf = _array(confidence, "confidence")
    corr = _array(correct, "correct")
    if conf.ndim != 1 or corr.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D, got shapes {conf.shape} and {corr.shape}")
    if conf.shape[0] != corr.shape[0]:
        raise ValueError(f"length mismatch: confidence has {conf.shape[0]} items, correct has {corr.shape[0]}")
    if conf.shape[0] == 0:
        raise ValueError("empty input: confidence and correct have no items")
    if not (np.issubdtype(conf.dtype, np.floating) or np.issubdtype(conf.dtype, np.integer)):
        raise ValueError(f"confidence must be numeric, got dtype {conf.dtype}")
    conf = conf.astype(np.float64, copy=False)
    # written as a negation so NaN fails too
    if not np.all((conf >= 0.0) & (conf <= 1.0)):
        bad = conf[~((conf >= 0.0) & (conf <= 1.0))][0]
        raise ValueError(f"confidence outside [0, 1] (e.g. {bad!r}); pass probabilities, not logits")
    if corr.dtype != np.bool_:
        if not (np.issubdtype(corr.dtype, np.number) and np.all((corr == 0) | (corr == 1))):
            raise ValueError(f"correct must be bool or 0/1, got dtype {corr.dtype} with other values")
        corr = corr.astype(bool)
    return conf, corr


def _check_bins(n_bins: int, binning: str) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if binning not in ("width", "mass"):
        raise ValueError(f"binning must be 'width' or 'mass', got {binning!r}")


def _check_probs(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    p = _array(probs, "probs")
    y = _array(labels, "labels")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (items, classes), got shape {p.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"length mismatch: probs has {p.shape[0]} items, labels has {y.shape[0]}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"empty input: probs has shape {p.shape}")
    p = p.astype(np.float64, copy=False)
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("probs outside [0, 1]; pass probabilities, not logits")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels outside [0, {p.shape[1] - 1}] (got min {y.min()}, max {y.max()})")
    return p, y.astype(np.intp, copy=False)


# ----------------------------------------------------------------------------------------------
# calibration


def _edges(conf: NDArray[np.float64], n_bins: int, binning: Binning) -> NDArray[np.float64]:
    """Bin edges over [0, 1]: evenly spaced, or at the quantiles of conf so bins hold equal counts."""
    if binning == "width":
        return np.linspace(0.0, 1.0, n_bins + 1)
    edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0  # cover the whole range, as netcal does
    return edges


def _bin_index(conf: NDArray[np.float64], edges: NDArray[np.float64]) -> NDArray[np.intp]:
    """Bins are [lo, hi), except the last, [lo, 1], so a confidence of exactly 1.0 is in the last bin.

    (torchmetrics instead puts exactly-1.0 confidences into an extra bin of their own; results are equal
    whenever no confidence is exactly 1.0.)
    """
    return np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, len(edges) - 2)


@dataclass(frozen=True, eq=False)  # holds arrays, so no field-wise ==
class ReliabilityBins:
    """Per-bin statistics behind a reliability diagram; empty bins have NaN confidence and accuracy."""

    edges: NDArray[np.float64]  # (n_bins + 1,) bin boundaries in [0, 1]
    count: NDArray[np.int64]  # (n_bins,) items per bin
    confidence: NDArray[np.float64]  # (n_bins,) mean confidence per bin
    accuracy: NDArray[np.float64]  # (n_bins,) fraction correct per bin

    @property
    def gap(self) -> NDArray[np.float64]:
        """confidence - accuracy per bin: positive where the model is over-confident."""
        return self.confidence - self.accuracy

    def ece(self) -> float:
        nonempty = self.count > 0
        weights = self.count[nonempty] / self.count.sum()
        return float(np.sum(weights * np.abs(self.gap[nonempty])))

    def mce(self) -> float:
        return float(np.max(np.abs(self.gap[self.count > 0])))


def reliability_bins(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15,
                     binning: Binning = "width") -> ReliabilityBins:
    """Bin items by confidence and report count, mean confidence and accuracy per bin.

    A calibrated model has accuracy == confidence in every bin; plotting one against the other is the
    reliability diagram. Equal-width bins are the convention (comparable across models); equal-mass bins
    put the same number of items in each bin, which avoids nearly-empty bins when confidences cluster near 1.
    """
    _check_bins(n_bins, binning)
    conf, corr = check_predictions(confidence, correct)
    edges = _edges(conf, n_bins, binning)
    idx = _bin_index(conf, edges)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=corr.astype(np.float64), minlength=n_bins) / count
    return ReliabilityBins(edges, count.astype(np.int64), mean_conf, acc)


def ece(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15, binning: Binning = "width") -> float:
    """Expected calibration error: the count-weighted mean over bins of |accuracy - mean confidence|.

    How far, on average, stated confidence is from observed accuracy; 0 for a calibrated model. Equal-width
    binning matches torchmetrics' calibration error with norm="l1" (see `_bin_index` for confidences of 1.0).
    """
    return reliability_bins(confidence, correct, n_bins, binning).ece()


def mce(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15, binning: Binning = "width") -> float:
    """Maximum calibration error: the worst |accuracy - mean confidence| over non-empty bins.

    The worst case hidden by ECE's averaging; noisy when some bins hold few items.
    """
    return reliability_bins(confidence, correct, n_bins, binning).mce()


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score: mean over items of sum over classes of (p - onehot)^2, in [0, 2].

    A proper scoring rule over the whole distribution, not just the top class, so it rewards both accuracy
    and calibration. For two classes it is twice the binary Brier score (sklearn's scale_by_half).
    """
    p, y = _check_probs(probs, labels)
    sq = np.sum(p**2, axis=1) - 2.0 * p[np.arange(len(y)), y] + 1.0
    return float(np.mean(sq))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true class (natural log).

    The proper scoring rule that heavily punishes confident mistakes. Probabilities are clipped below at
    float64 machine epsilon (as sklearn's log_loss does), so a zero probability gives ~36 rather than inf.
    """
    p, y = _check_probs(probs, labels)
    eps = np.finfo(np.float64).eps
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))))


# ----------------------------------------------------------------------------------------------
# ranking / selective prediction


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the ROC curve of confidence as a score for "this prediction is correct".

    0.5 means confidence cannot tell right from wrong answers; 1.0 means every correct item is more confident
    than every wrong one. Independent of calibration (any monotone rescaling leaves it unchanged). NaN when
    all items are correct or all wrong, since it is then undefined.
    """
    conf, corr = check_predictions(confidence, correct)
    if corr.all() or not corr.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(corr, conf))


def risk_coverage(confidence: ArrayLike, correct: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Risk (error rate) of the k most confident items against coverage k/n, for k = 1..n.

    What a model would achieve if it abstained below a confidence threshold. Items with equal confidence
    cannot be ordered, so within a tie the curve uses the expected error count over random orderings of the
    tie (linear interpolation between the tie's ends); this makes the result independent of input order,
    which matters for low-precision models whose confidences often tie (e.g. many at exactly 1.0).
    """
    conf, corr = check_predictions(confidence, correct)
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    cum_err = np.cumsum(~corr[order], dtype=np.float64)
    # group boundaries of equal confidence in the sorted order
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = c[1:] != c[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    group = np.cumsum(new_group) - 1
    err_before = np.where(starts > 0, cum_err[starts - 1], 0.0)
    group_rate = (cum_err[ends - 1] - err_before) / (ends - starts)
    k = np.arange(1, n + 1, dtype=np.float64)
    expected_err = err_before[group] + (k - starts[group]) * group_rate[group]
    return k / n, expected_err / k


def aurc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve: the mean of the risk at coverages 1/n, 2/n, ..., 1. Lower is better.

    Combines accuracy and ranking quality in one number. With a perfect ranking and error rate r it reaches
    its minimum, which approaches r + (1 - r) ln(1 - r) for large n; a random ranking gives about r.
    """
    _, risk = risk_coverage(confidence, correct)
    return float(np.mean(risk))


def selective_at(confidence: ArrayLike, correct: ArrayLike, threshold: float) -> tuple[float, float]:
    """(coverage, accuracy) of the items with confidence >= threshold; accuracy is NaN if none qualify.

    The operating point of a model that answers only when at least this confident.
    """
    conf, corr = check_predictions(confidence, correct)
    keep = conf >= threshold
    coverage = float(np.mean(keep))
    accuracy = float(np.mean(corr[keep])) if keep.any() else float("nan")
    return coverage, accuracy


# ----------------------------------------------------------------------------------------------
# every metric at once, for many resamples: a resample is a row of integer weights (how often each
# item was drawn), so bootstrapping is a few cumulative sums over the items sorted once by confidence


@dataclass(frozen=True, eq=False)
class _Sorted:
    """Items sorted by ascending confidence, with the boundaries of runs of equal confidence (tie groups):
    column indices into cumulative sums, plain slices when there are no ties (views, no copies)."""

    conf: NDArray[np.float64]
    correct: NDArray[np.float64]
    order: NDArray[np.intp]
    group_start: NDArray[np.intp] | slice
    group_end: NDArray[np.intp] | slice

    @classmethod
    def of(cls, conf: NDArray[np.float64], correct: NDArray[np.bool_]) -> _Sorted:
        order = np.argsort(conf, kind="stable")
        c = conf[order]
        start = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        if len(start) == len(c):
            return cls(c, correct[order].astype(np.float64), order, slice(0, len(c)), slice(1, len(c) + 1))
        return cls(c, correct[order].astype(np.float64), order, start, np.r_[start[1:], len(c)])


def _cumsum0(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Cumulative sum along the items with a leading 0, so segment [a, b) sums to out[:, b] - out[:, a]."""
    out = np.zeros((x.shape[0], x.shape[1] + 1))
    np.cumsum(x, axis=1, out=out[:, 1:])
    return out


def _mass_edges(s: _Sorted, cw: NDArray[np.float64], n_bins: int) -> NDArray[np.float64]:
    """np.quantile(..., linspace(0, 1, n_bins + 1)) of every resample (items repeated by their weight)."""
    boots, n_items = cw.shape[0], cw.shape[1] - 1
    total = cw[:, -1]
    h = (total[:, None] - 1) * np.linspace(0.0, 1.0, n_bins + 1)[None, :]
    lo = np.floor(h)
    t = h - lo
    # the item at 0-based position p of a resample is the first whose inclusive cumulative weight exceeds p;
    # rows are made disjoint by an offset so one searchsorted serves all of them
    offset = np.arange(boots)[:, None] * (total.max() + 1)
    flat = (cw[:, 1:] + offset).ravel()

    def value(pos: NDArray[np.float64]) -> NDArray[np.float64]:
        found = np.searchsorted(flat, (pos + offset).ravel(), side="right").reshape(pos.shape)
        return s.conf[np.minimum(found - np.arange(boots)[:, None] * n_items, n_items - 1)]

    a, b = value(lo), value(np.minimum(lo + 1, total[:, None] - 1))
    d = b - a
    edges = np.where(t >= 0.5, b - d * (1 - t), a + d * t)  # numpy's own lerp, so edges match np.quantile
    edges[:, 0], edges[:, -1] = 0.0, 1.0
    return edges


def _calibration(s: _Sorted, cw, cd, edges: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """(ECE, MCE) of every resample for per-resample bin edges (resamples, n_bins + 1); see _bin_index."""
    pos = np.searchsorted(s.conf, edges, side="left")
    pos[:, 0], pos[:, -1] = 0, len(s.conf)
    count = np.diff(np.take_along_axis(cw, pos, axis=1), axis=1)
    gap = np.abs(np.diff(np.take_along_axis(cd, pos, axis=1), axis=1))  # |sum(correct - conf)| per bin
    with np.errstate(invalid="ignore", divide="ignore"):
        return gap.sum(axis=1) / cw[:, -1], np.nanmax(np.where(count > 0, gap / count, np.nan), axis=1)


def _auroc(s: _Sorted, cw, ck) -> NDArray[np.float64]:
    """Mann-Whitney AUROC with ties counted 1/2, as sklearn's roc_auc_score."""
    cn = cw - ck  # cumulative weight of wrong items
    pos_g = ck[:, s.group_end] - ck[:, s.group_start]
    neg_g = cn[:, s.group_end] - cn[:, s.group_start]
    pos, neg = ck[:, -1], cn[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_g * (cn[:, s.group_start] + 0.5 * neg_g)).sum(axis=1) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def _aurc(s: _Sorted, cw, ck) -> NDArray[np.float64]:
    """aurc() in closed form per tie group: in descending confidence, a group of weight m with e errors,
    after s items with E errors, adds sum_{j=1..m} (E + j e/m) / (s + j) = e + (E - s e/m)(H(s+m) - H(s)),
    H the harmonic numbers (weights are integer counts, so a table lookup)."""
    harmonic_numbers = np.r_[0.0, np.cumsum(1.0 / np.arange(1, int(cw[:, -1].max()) + 1))]
    ce = cw - ck  # cumulative errors
    n = cw[:, -1:]
    m = cw[:, s.group_end] - cw[:, s.group_start]
    e = ce[:, s.group_end] - ce[:, s.group_start]
    before = n - cw[:, s.group_end]  # weight of the more confident items
    errors_before = ce[:, -1:] - ce[:, s.group_end]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(m > 0, e / m, 0.0)
    harmonic = harmonic_numbers[(before + m).astype(np.intp)] - harmonic_numbers[before.astype(np.intp)]
    return (e + (errors_before - before * rate) * harmonic).sum(axis=1) / n[:, 0]


def summarize_batched(confidence: ArrayLike, correct: ArrayLike, weights: ArrayLike, n_bins: int = 15,
                      threshold: float = 0.75, means: dict[str, ArrayLike] | None = None) -> dict[str, NDArray]:
    """Every headline metric for each row of `weights` (resamples, items): integer counts of how often each
    item is drawn. Returns arrays of shape (resamples,); see `summarize` for the keys.

    One sort by confidence serves all rows: per-bin, per-tie-group and above-threshold sums are differences
    of cumulative sums, so 1000 resamples of 20k items take about a second.
    """
    _check_bins(n_bins, "width")
    conf, corr = check_predictions(confidence, correct)
    w = _array(weights, "weights").astype(np.float64, copy=False)
    if w.ndim != 2 or w.shape[1] != len(conf):
        raise ValueError(f"weights must have shape (resamples, {len(conf)}), got {w.shape}")
    s = _Sorted.of(conf, corr)
    ws = w[:, s.order]
    cw, ck, cd = _cumsum0(ws), _cumsum0(ws * s.correct), _cumsum0(ws * (s.correct - s.conf))
    n = cw[:, -1]
    width = np.broadcast_to(np.linspace(0.0, 1.0, n_bins + 1), (len(w), n_bins + 1))
    ece_width, mce_width = _calibration(s, cw, cd, width)
    ece_mass, _ = _calibration(s, cw, cd, _mass_edges(s, cw, n_bins))
    above = int(np.searchsorted(s.conf, threshold, side="left"))
    covered = n - cw[:, above]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "n": n,
            "accuracy": ck[:, -1] / n,
            "mean_confidence": ws @ s.conf / n,
            "ece": ece_width,
            "ece_mass": ece_mass,
            "mce": mce_width,
            "auroc": _auroc(s, cw, ck),
            "aurc": _aurc(s, cw, ck),
            "selective_coverage": covered / n,
            "selective_accuracy": np.where(covered > 0, (ck[:, -1] - ck[:, above]) / covered, np.nan),
        }
    for name, values in (means or {}).items():
        v = _array(values, name).astype(np.float64, copy=False)
        if v.shape != conf.shape:
            raise ValueError(f"means[{name!r}] has shape {v.shape}, expected {conf.shape}")
        out[name] = ws @ v[s.order] / n
    return out


def cluster_resamples(cluster: ArrayLike, n_boot: int = 1000, seed: int = 0,
                      max_cells: int = 2_000_000) -> Iterator[NDArray[np.float64]]:
    """Bootstrap resamples as item weights (chunks of rows of shape (resamples, items)).

    Whole clusters are drawn with replacement (cluster[i] is the cluster of item i, e.g. its text window,
    whose tokens are correlated), and each item gets its cluster's draw count. Give every item its own cluster
    for the ordinary bootstrap. The same cluster array and seed always give the same resamples, so models
    evaluated on the same items get the same resamples: their differences are paired.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    ids, inverse = np.unique(_array(cluster, "cluster"), return_inverse=True)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, max_cells // max(len(inverse), 1)))
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=min(chunk, n_boot - start))
        yield counts[:, inverse].astype(np.float64)


def percentile_interval(samples: ArrayLike, alpha: float = 0.05) -> tuple[float, float]:
    """(low, high) percentile interval of bootstrap samples, ignoring NaN ones (NaN if all are)."""
    x = _array(samples, "samples").astype(np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(x, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# report helper


def summarize(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15, threshold: float = 0.75,
              means: dict[str, ArrayLike] | None = None) -> dict[str, float]:
    """The headline numbers for one model: n, accuracy, mean_confidence, ece (equal-width), ece_mass
    (equal-mass), mce, auroc, aurc, selective_coverage and selective_accuracy (confidence >= threshold),
    and the mean of every per-item array in `means` (e.g. per-token NLL).

    mean_confidence - accuracy is the overall over/under-confidence. Computed by the same code as the
    bootstrap resamples (summarize_batched with unit weights), so point and interval always agree in meaning.
    """
    conf, _ = check_predictions(confidence, correct)
    out = summarize_batched(confidence, correct, np.ones((1, len(conf))), n_bins, threshold, means)
    return {k: (int(v[0]) if k == "n" else float(v[0])) for k, v in out.items()}
