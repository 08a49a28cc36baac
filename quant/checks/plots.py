"""Pictures of calibration: reliability diagrams (one panel per model) and confidence histograms
(each variant over the reference)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from quant.confidence import metrics  # noqa: E402
from quant.files import atomic_path  # noqa: E402


def reliability_diagram(predictions: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str,
                        n_bins: int = 15) -> None:
    """`predictions` maps a model name to (confidence, correct). Bars: accuracy per confidence bin;
    the diagonal is perfect calibration; the lower row shows where the confidence mass sits."""
    names = list(predictions)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.6), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for col, name in enumerate(names):
        conf, correct = predictions[name]
        bins = metrics.reliability_bins(conf, correct, n_bins=n_bins)
        centers = (bins.edges[:-1] + bins.edges[1:]) / 2
        width = np.diff(bins.edges)
        top, bottom = axes[0, col], axes[1, col]
        top.bar(centers, np.nan_to_num(bins.accuracy), width=width, edgecolor="black", color="tab:blue",
                label="accuracy")
        top.bar(centers, np.nan_to_num(bins.confidence - bins.accuracy), bottom=np.nan_to_num(bins.accuracy),
                width=width, color="tab:red", alpha=0.35, label="gap")
        top.plot([0, 1], [0, 1], "k--", lw=1)
        top.set_title(f"{name}\nECE {bins.ece():.3f}  acc {np.mean(correct):.3f}", fontsize=9)
        top.set_ylim(0, 1)
        bottom.bar(centers, bins.count / max(bins.count.sum(), 1), width=width, color="gray", edgecolor="black")
        bottom.set_xlabel("confidence")
        if col == 0:
            top.set_ylabel("accuracy")
            bottom.set_ylabel("fraction")
            top.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def confidence_histogram(confidence: dict[str, np.ndarray], reference: str, path: Path, title: str,
                         bins: int = 20) -> None:
    """One panel per variant: its confidence distribution drawn over the reference's, so a shift toward
    over- or under-confidence after quantization (or its repair by re-calibration) shows at a glance."""
    variants = [n for n in confidence if n != reference] or [reference]
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3.2), sharey=True, squeeze=False)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, name in zip(axes[0], variants):
        for label, conf, style in ((reference, confidence[reference], dict(histtype="stepfilled", color="gray",
                                                                           alpha=0.4)),
                                   (name, confidence[name], dict(histtype="step", color="tab:blue", lw=1.6))):
            ax.hist(conf, bins=edges, weights=np.full(len(conf), 1.0 / max(len(conf), 1)),
                    label=f"{label} (mean {np.mean(conf):.3f})", **style)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("confidence")
        ax.legend(fontsize=7, loc="upper center")
    axes[0, 0].set_ylabel("fraction of predictions")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
