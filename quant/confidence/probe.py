"""External confidence: a small probe that reads the model's own signals and predicts whether its answer is right.

The model's internal confidence (its top choice probability) is one signal; a probe can also read the entropy and
margin of the choice distribution and the last hidden state at the answer position. A logistic regression (or a
one-hidden-layer MLP) is fitted on labelled items of a fit split, never on the reported ones. It is stored as plain
numbers in probe.json (no pickle) and evaluated with numpy, so it travels with a checkpoint and loads anywhere.
`combined` is the mean of the internal and the probe confidence: no further fit, so nothing is fitted twice on the
same items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field, field_validator

from quant.errors import CalqError
from quant.schema import StrictModel

Signal = Literal["max_prob", "entropy", "margin", "hidden"]
PROBE_FILE = "probe.json"


class ProbeConfig(StrictModel):
    source: str = "mmlu"
    """Where the labelled items come from: `mmlu` (its fit split, scored as the evaluation and `calq ask` score
    letters) or the name of a multiple-choice task in evaluation.tasks (its fit split)."""
    signals: tuple[Signal, ...] = ("max_prob", "entropy", "margin", "hidden")
    """What the probe reads: the top choice probability, the entropy and top-1 minus top-2 margin of the choice
    distribution, and the last hidden state (after the final norm) at the position the answer is scored from."""
    kind: Literal["logistic", "mlp"] = "logistic"
    C: float = Field(0.05, gt=0)
    """Inverse L2 strength (logistic: sklearn's C; mlp: alpha = 1 / C). Small: a few hundred items, hundreds of
    hidden dimensions."""
    hidden_units: int = Field(16, ge=1)
    """mlp: width of its one hidden layer."""
    fit_items: int = Field(256, ge=16)
    """At most this many items of the fit split (MMLU: spread over the subjects)."""
    seed: int = 0

    @field_validator("signals")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"probe signals must be distinct and not empty (got {list(v)})")
        return v


def signal_matrix(probs: ArrayLike, hidden: ArrayLike | None, signals: tuple[str, ...]) -> NDArray[np.float64]:
    """Feature rows (items, features) from choice probabilities (items, choices; padded columns 0) and, when
    `signals` has `hidden`, the hidden states (items, hidden size)."""
    p = np.asarray(probs, dtype=np.float64)
    top2 = -np.sort(-p, axis=1)[:, :2]
    logp = np.log(np.where(p > 0, p, 1.0))
    columns = {"max_prob": top2[:, :1], "entropy": -(p * logp).sum(1, keepdims=True),
               "margin": top2[:, :1] - top2[:, 1:2]}
    if "hidden" in signals:
        if hidden is None:
            raise ValueError("signal 'hidden' asked for but no hidden states given")
        columns["hidden"] = np.asarray(hidden, dtype=np.float64)
    return np.concatenate([columns[s] for s in signals], axis=1)


@dataclass(frozen=True, eq=False)  # holds arrays
class Probe:
    """A fitted probe: standardisation, then dense layers (ReLU between), a sigmoid on the last one's output."""

    signals: tuple[str, ...]
    kind: str
    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    layers: tuple[tuple[NDArray[np.float64], NDArray[np.float64]], ...]
    """(weights (inputs, outputs), bias (outputs,)) per layer; the last has one output."""
    fit_items: int
    fit_accuracy: float
    """Share of the fit items the model answered right (the probe's base rate)."""
    source: str
    scoring: str
    """How the fit items were scored (`calq ask` applies the probe only to answers scored the same way)."""

    def predict(self, features: ArrayLike) -> NDArray[np.float64]:
        """P(answer correct) per row of `features` (signal_matrix with this probe's signals)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"the probe reads {len(self.mean)} features, got shape {x.shape}")
        h = (x - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return 1.0 / (1.0 + np.exp(-h[:, 0]))

    def to_json(self) -> str:
        return json.dumps({"signals": list(self.signals), "kind": self.kind, "mean": self.mean.tolist(),
                           "scale": self.scale.tolist(), "layers": [[w.tolist(), b.tolist()] for w, b in self.layers],
                           "fit_items": self.fit_items, "fit_accuracy": self.fit_accuracy, "source": self.source,
                           "scoring": self.scoring})

    @classmethod
    def from_json(cls, text: str) -> Probe:
        d = json.loads(text)
        return cls(tuple(d["signals"]), d["kind"], np.asarray(d["mean"]), np.asarray(d["scale"]),
                   tuple((np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)) for w, b in d["layers"]),
                   d["fit_items"], d["fit_accuracy"], d["source"], d["scoring"])

    @classmethod
    def load(cls, directory: Path) -> Probe | None:
        """The probe saved with a checkpoint, or None when it has none."""
        path = Path(directory) / PROBE_FILE
        return cls.from_json(path.read_text()) if path.is_file() else None


def fit_probe(features: ArrayLike, correct: ArrayLike, cfg: ProbeConfig, scoring: str = "") -> Probe:
    """Fit a probe predicting `correct` from `features` (signal_matrix rows of fit items); deterministic (cfg.seed)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(correct).astype(bool)
    if y.all() or not y.any():
        raise CalqError(f"all {len(y)} probe fit items are {'right' if y.all() else 'wrong'}: a probe needs both; "
                        "raise probe.fit_items")
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    if cfg.kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=cfg.C, max_iter=2000, random_state=cfg.seed).fit(z, y)
        layers = ((clf.coef_.T.copy(), clf.intercept_.copy()),)
    else:
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier((cfg.hidden_units,), alpha=1.0 / cfg.C, max_iter=2000, random_state=cfg.seed).fit(z, y)
        layers = tuple((w.copy(), b.copy()) for w, b in zip(clf.coefs_, clf.intercepts_))
    return Probe(cfg.signals, cfg.kind, mean, scale, layers, len(y), float(y.mean()), cfg.source, scoring)
