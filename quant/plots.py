"""Pictures of calibration: reliability diagrams with confidence histograms, one panel per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from quant import metrics  # noqa: E402
from quant.cache import atomic_path  # noqa: E402


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
