"""Confidence-calibration and selective-prediction metrics for comparing a model with its quantized versions.

Quantization can leave accuracy almost unchanged while shifting how far the model's confidence can be
trusted, so besides accuracy we measure calibration (ECE, MCE, reliability bins, Brier, NLL) and how well
confidence ranks right answers above wrong ones (AUROC, risk-coverage, AURC). All functions are pure,
take 1-D arrays (numpy, lists, or CPU torch tensors) and return plain Python floats or numpy arrays.

Inputs: ``confidence`` is the probability the model gave its predicted class (in [0, 1]) and ``correct``
says whether that prediction was right (bool, or 0/1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Binning = Literal["width", "mass"]

__all__ = [
    "ReliabilityBins", "reliability_bins", "ece", "mce", "brier", "nll", "auroc", "risk_coverage", "aurc",
    "selective_at", "bootstrap_ci", "summarize",
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


def _check(confidence: ArrayLike, correct: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
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
    conf, corr = _check(confidence, correct)
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
    conf, corr = _check(confidence, correct)
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
    conf, corr = _check(confidence, correct)
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
    conf, corr = _check(confidence, correct)
    keep = conf >= threshold
    coverage = float(np.mean(keep))
    accuracy = float(np.mean(corr[keep])) if keep.any() else float("nan")
    return coverage, accuracy


# ----------------------------------------------------------------------------------------------
# uncertainty of the estimates


def _calibration_batched(idx: NDArray[np.intp], confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15,
                         binning: Binning = "width", *, norm: str) -> NDArray[np.float64]:
    """ECE (norm="l1") or MCE (norm="max") of every resample idx[b] at once, for equal-width bins.

    Bin membership does not depend on the resample, so one bincount over (resample, bin) pairs does it.
    Uses sum_bin(correct - conf) / count = accuracy - mean confidence.
    """
    conf, corr = _check(confidence, correct)
    boots, n = idx.shape
    bins = _bin_index(conf, _edges(conf, n_bins, "width"))
    keys = (bins[idx] + n_bins * np.arange(boots)[:, None]).ravel()
    diff = np.bincount(keys, weights=(corr - conf)[idx].ravel(), minlength=boots * n_bins).reshape(boots, n_bins)
    if norm == "l1":
        return np.abs(diff).sum(axis=1) / n
    count = np.bincount(keys, minlength=boots * n_bins).reshape(boots, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmax(np.abs(diff) / count, axis=1)  # empty bins are 0/0 = NaN and skipped


_BATCHED: dict[Callable[..., float], Callable[..., NDArray[np.float64]]] = {
    ece: functools.partial(_calibration_batched, norm="l1"),
    mce: functools.partial(_calibration_batched, norm="max"),
}


def _batched(metric_fn: Callable[..., float]) -> Callable[..., NDArray[np.float64]] | None:
    """The vectorised twin of metric_fn (ece / mce, bare or as functools.partial with keywords), if any."""
    kwargs: dict[str, Any] = {}
    fn = metric_fn
    if isinstance(fn, functools.partial):
        if fn.args:
            return None
        fn, kwargs = fn.func, dict(fn.keywords)
    if fn not in _BATCHED or kwargs.get("binning", "width") != "width":
        return None
    return functools.partial(_BATCHED[fn], **kwargs)


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: ArrayLike, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap confidence interval of metric_fn(*arrays).

    Items are resampled with replacement, jointly across the arrays (the same rows of each), so paired
    inputs stay paired. The same seed gives the same interval. ece and mce with equal-width bins (bare, or
    functools.partial with keyword arguments) are computed for all resamples at once; any other metric is
    called once per resample. Resamples where the metric is NaN are ignored.

    Caveat: ECE is biased upward in small samples and resampling adds more of that bias, so for a nearly
    calibrated model the interval can sit above the point estimate; it is meant for comparing models.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    data = [_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    lengths = {a.shape[0] if a.ndim else -1 for a in data}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(f"length mismatch: arrays have lengths {[a.shape[0] if a.ndim else None for a in data]}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("empty input: arrays have no items")

    point = float(metric_fn(*data))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bounds the (chunk, n) index matrix to ~16 MB
    batched = _batched(metric_fn)
    stats = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.int32 if n < 2**31 else np.int64)
        if batched is not None:
            stats[start:stop] = batched(idx, *data)
        else:
            stats[start:stop] = [metric_fn(*(a[row] for a in data)) for row in idx]
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return point, float("nan"), float("nan")
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(low), float(high)


# ----------------------------------------------------------------------------------------------
# report helper


def summarize(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> dict[str, float]:
    """The headline numbers for one model: n, accuracy, mean_confidence, ece, ece_mass, mce, auroc, aurc.

    mean_confidence - accuracy is the overall over/under-confidence; ece is equal-width, ece_mass equal-mass.
    """
    conf, corr = _check(confidence, correct)
    width = reliability_bins(conf, corr, n_bins, "width")
    return {
        "n": len(conf),
        "accuracy": float(np.mean(corr)),
        "mean_confidence": float(np.mean(conf)),
        "ece": width.ece(),
        "ece_mass": ece(conf, corr, n_bins, "mass"),
        "mce": width.mce(),
        "auroc": auroc(conf, corr),
        "aurc": aurc(conf, corr),
    }
