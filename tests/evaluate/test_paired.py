"""Paired differences over seeds against a plain reference: hand arithmetic and printed t quantiles."""

import math

import pytest

from medhpm.evaluate.paired import paired_difference

# two-sided 95 % quantiles of Student's t from a printed table: df 1, 2, 4
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_paired_difference_against_hand_arithmetic():
    a = {0: 0.80, 1: 0.75, 2: 0.90}
    b = {0: 0.70, 1: 0.72, 2: 0.78, 7: 0.99}  # seed 7 has no partner and is left out
    r = paired_difference(a, b)
    d = [0.10, 0.03, 0.12]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
    assert r["mean"] == pytest.approx(mean) and r["std"] == pytest.approx(sd)
    assert r["lo"] == pytest.approx(mean - T975[2] * sd / math.sqrt(3), abs=1e-4)
    assert r["hi"] == pytest.approx(mean + T975[2] * sd / math.sqrt(3), abs=1e-4)
    assert r["lo"] < 0 < r["hi"] or r["lo"] > 0  # the interval is what the numbers give, nothing more


def test_the_pairing_cancels_a_shared_seed_effect():
    # each seed shifts both methods by the same luck; the method effect is a constant 0.02
    luck = {0: -0.2, 1: 0.1, 2: 0.3, 3: -0.05, 4: 0.15}
    a = {s: 0.7 + v + 0.02 + 0.001 * s for s, v in luck.items()}
    b = {s: 0.7 + v for s, v in luck.items()}
    r = paired_difference(a, b)
    assert r["n"] == 5 and r["lo"] > 0.015 and r["hi"] < 0.03  # unpaired, the luck would swamp 0.02
    sd = r["std"]
    assert r["hi"] - r["lo"] == pytest.approx(2 * T975[4] * sd / math.sqrt(5), abs=1e-5)


def test_one_seed_has_no_interval_and_nan_is_left_out():
    r = paired_difference({0: 0.5, 1: float("nan")}, {0: 0.4, 1: 0.3})
    assert r["n"] == 1 and r["mean"] == pytest.approx(0.1) and math.isnan(r["lo"]) and math.isnan(r["hi"])
    assert paired_difference({}, {0: 1.0})["n"] == 0
    with pytest.raises(ValueError, match="confidence"):
        paired_difference({0: 1}, {0: 1}, confidence=1.5)
