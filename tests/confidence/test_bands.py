import numpy as np
import pytest

from quant.confidence.bands import ABSTAIN, UNSURE, VERY_SURE, BandConfig, band_of, band_table, markdown


def test_band_boundaries_and_abstention_threshold():
    assert [band_of(c) for c in (1.0, 0.75, 0.7499, 0.40, 0.3999, 0.0)] == \
        [VERY_SURE, VERY_SURE, UNSURE, UNSURE, ABSTAIN, ABSTAIN]
    never = BandConfig(abstain_below=0.0)
    assert band_of(0.0, never) == UNSURE  # abstain_below 0 never abstains
    assert band_of(0.85, BandConfig(very_sure=0.9, abstain_below=0.6)) == UNSURE
    with pytest.raises(ValueError, match="must not exceed very_sure"):
        BandConfig(very_sure=0.5, abstain_below=0.6)


def test_band_table_shares_and_accuracy():
    rows = band_table([0.9, 0.8, 0.5, 0.45, 0.1], [1, 0, 1, 1, 0])
    assert [(r["band"], r["n"], r["share"], r["accuracy"]) for r in rows] == [
        (VERY_SURE, 2, 0.4, 0.5), (UNSURE, 2, 0.4, 1.0), (ABSTAIN, 1, 0.2, 0.0)]
    assert rows[0]["mean_confidence"] == pytest.approx(0.85)
    empty = band_table(np.array([0.9, 0.95]), np.array([True, True]))
    assert empty[2]["n"] == 0 and empty[2]["accuracy"] is None
    table = markdown({"fp": rows, "w4": empty}, "tokens")
    assert "| answered (abstaining below 0.40) | 80.0% / 75.0% | 100.0% / 100.0% |" in table
    assert "| can't answer safely (0.00-0.40) | 20.0% / 0.0% | 0.0% / - |" in table
