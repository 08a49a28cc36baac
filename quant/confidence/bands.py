"""Confidence bands: calibrated confidence said in words a user can act on, and abstention.

A calibrated probability is only useful if people read it right. Three bands: "very sure" (answer),
"unsure - here are alternatives" (answer, but show the runner-ups), "can't answer safely" (abstain).
Measured on evaluation predictions, each band's share of items and its accuracy tell whether the words
are honest for this model, e.g. "very sure: 12% of tokens, 91% correct".
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field, model_validator

from quant.confidence import metrics
from quant.schema import StrictModel

VERY_SURE, UNSURE, ABSTAIN = "very sure", "unsure - here are alternatives", "can't answer safely"
BANDS = (VERY_SURE, UNSURE, ABSTAIN)


class BandConfig(StrictModel):
    very_sure: float = Field(0.75, gt=0.0, le=1.0)
    """Confidence at or above which the answer is given as is."""
    abstain_below: float = Field(0.40, ge=0.0, le=1.0)
    """Below this the model abstains ("can't answer safely"); 0 never abstains."""

    @model_validator(mode="after")
    def _ordered(self) -> BandConfig:
        if self.abstain_below > self.very_sure:
            raise ValueError(f"abstain_below ({self.abstain_below}) must not exceed very_sure ({self.very_sure})")
        return self


def band_of(confidence: float, cfg: BandConfig = BandConfig()) -> str:
    if confidence >= cfg.very_sure:
        return VERY_SURE
    return UNSURE if confidence >= cfg.abstain_below else ABSTAIN


def band_table(confidence: ArrayLike, correct: ArrayLike, cfg: BandConfig = BandConfig()) -> list[dict]:
    """Per band, highest first: its confidence range [lower, upper), item count, share of items, accuracy and
    mean confidence (None for an empty band). Plain dicts, as they are stored in report.json."""
    conf, corr = metrics.check_predictions(confidence, correct)
    edges = [(cfg.very_sure, np.inf), (cfg.abstain_below, cfg.very_sure), (-np.inf, cfg.abstain_below)]
    rows = []
    for band, (lo, hi) in zip(BANDS, edges):
        mask = (conf >= lo) & (conf < hi)
        n = int(mask.sum())
        rows.append({"band": band, "lower": max(lo, 0.0), "upper": min(hi, 1.0), "n": n, "share": n / len(conf),
                     "accuracy": float(corr[mask].mean()) if n else None,
                     "mean_confidence": float(conf[mask].mean()) if n else None})
    return rows


def markdown(tables: dict[str, list[dict]], unit: str) -> str:
    """One row per band and a last row for answering only above the abstention threshold; one column per
    model: share of items / accuracy."""
    names = list(tables)
    lines = ["| band | " + " | ".join(f"{n}: share of {unit} / correct" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    cell = lambda share, acc: f"{share:.1%} / " + ("-" if acc is None else f"{acc:.1%}")  # noqa: E731
    for i, row in enumerate(tables[names[0]]):
        lines.append(f"| {row['band']} ({row['lower']:.2f}-{row['upper']:.2f}) | "
                     + " | ".join(cell(t[i]["share"], t[i]["accuracy"]) for t in tables.values()) + " |")
    answered = []
    for rows in tables.values():
        kept = [r for r in rows if r["band"] != ABSTAIN and r["n"]]
        n = sum(r["n"] for r in kept)
        accuracy = sum(r["n"] * r["accuracy"] for r in kept) / n if n else None
        answered.append(cell(sum(r["share"] for r in kept), accuracy))
    lines.append(f"| answered (abstaining below {tables[names[0]][-1]['upper']:.2f}) | " + " | ".join(answered) + " |")
    return "\n".join(lines)
