"""Wide phantom variability (issue 14): seeded, within CT's ranges, and the standard phantoms unchanged."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from medhpm.config import load_config
from medhpm.data.phantom import generate_case, write_phantom_dataset
from medhpm.data.phantom.params import _draw_params
from medhpm.data.phantom.variability import PHASE_HU, PHASE_ODDS, PHASES, _draw_wide
from medhpm.data.sources import resolve_dataset

SMALL = (48, 48, 32)


def _md5(a: np.ndarray) -> str:
    return hashlib.md5(a.tobytes()).hexdigest()


def _wide_params(seed: int) -> dict:
    """The parameters ``generate_case(seed, variability="wide")`` paints with (the same streams)."""
    ss_params, _, _, ss_wide = np.random.SeedSequence(seed).spawn(4)
    p = _draw_params(np.random.default_rng(ss_params))
    _draw_wide(np.random.default_rng(ss_wide), p)
    return p


def test_standard_phantoms_are_those_of_earlier_versions():
    """Recorded with medhpm before the variability knob existed (commit 9412060): standard cases must not move."""
    c = generate_case(7, size=(40, 40, 24))
    assert _md5(c.image) == "37aef6a44129498070bb8b8a25dae446"
    assert _md5(c.label) == "b9e06a71ff98e883ffdf5f2192d387c0"
    assert c.variation == {}


def test_wide_cases_are_deterministic_for_a_seed_and_differ_from_standard():
    a = generate_case(3, size=SMALL, variability="wide")
    b = generate_case(3, size=SMALL, variability="wide")
    assert _md5(a.image) == _md5(b.image) and _md5(a.label) == _md5(b.label)
    assert a.variation == b.variation and a.variation["phase"] in PHASES
    other = generate_case(4, size=SMALL, variability="wide")
    assert _md5(other.image) != _md5(a.image)
    std = generate_case(3, size=SMALL)
    assert _md5(std.image) != _md5(a.image)


def test_bad_variability_is_refused(tmp_path):
    with pytest.raises(ValueError, match="variability must be one of standard, wide, got 'huge'"):
        generate_case(0, size=SMALL, variability="huge")
    with pytest.raises(ValueError, match="variability"):
        write_phantom_dataset(tmp_path / "p", cases=1, variability="huge")
    assert not (tmp_path / "p").exists()


def test_drawn_knobs_stay_in_their_documented_ranges_and_phases_follow_their_odds():
    n = 600
    phases = Counter()
    partial = 0
    for seed in range(n):
        p = _wide_params(seed)
        phases[p["phase"]] += 1
        for tissue, (lo, hi) in PHASE_HU[p["phase"]].items():
            assert lo <= p["hu"][tissue] <= hi, (seed, tissue)
        assert -20 <= p["hu_offset"] <= 20 and 6 <= p["noise_hu"] <= 40 and 0.4 <= p["blur_vox"] <= 1.2
        assert 3 <= p["fat_mm"] <= 35 and 6 <= p["muscle_mm"] <= 15
        assert 0.76 <= p["scale"][0] <= 1.06 and 0.78 <= p["scale"][1] <= 1.08 and 0.88 <= p["scale"][2] <= 1.10
        for scale, shift in p["jitter"].values():
            assert np.all((scale >= 0.8 * 0.9) & (scale <= 1.2 * 1.1)) and np.all(np.abs(shift) <= 12)
        assert len(p["lesions"]) <= 3
        for les in p["lesions"]:
            assert 4 <= les["radius_mm"] <= 15 and les["organ"] in ("liver", "spleen", "kidney_r", "kidney_l")
        if p["partial_fov"]:
            partial += 1
            assert 40 <= p["fov_z"] <= 120
        else:
            assert 205 <= p["fov_z"] <= 245
    # Binomial counts: within 4.5 standard deviations of the stated odds.
    for phase, odds in zip(PHASES, PHASE_ODDS):
        assert abs(phases[phase] - n * odds) < 4.5 * np.sqrt(n * odds * (1 - odds)), (phase, phases)
    assert abs(partial - 0.3 * n) < 4.5 * np.sqrt(n * 0.21)


@pytest.mark.parametrize("seed", range(8))
def test_wide_images_stay_in_ct_ranges_with_the_phase_of_their_draw(seed):
    c = generate_case(seed, variability="wide")
    p = _wide_params(seed)
    assert c.variation["phase"] == p["phase"]
    img, lab = c.image.astype(float), c.label
    assert c.image.dtype == np.int16 and img.min() >= -1024 and img.max() <= 3071
    # The cranio-caudal extent is the drawn field of view (a thin slab when partial).
    assert abs(img.shape[2] * c.spacing[2] - p["fov_z"]) <= c.spacing[2] + 1e-6
    # Aorta and liver (eroded, away from partial volume) have medians of their phase's HU plus the offset.
    lo_hi = {t: PHASE_HU[p["phase"]].get(t) for t in ("aorta", "liver")}
    std_table = {"aorta": (190, 260), "liver": (80, 100)}  # portal-venous: params.py's table
    for tissue, label in (("aorta", 8), ("liver", 6)):
        mask = ndimage.binary_erosion(lab == label, iterations=1)
        if mask.sum() < 20:
            continue
        lo, hi = lo_hi[tissue] or std_table[tissue]
        med = np.median(img[mask])
        slack = 25 if tissue == "liver" else 35  # liver: vessels and lesions; aorta: blur of a thin tube
        assert lo + p["hu_offset"] - slack <= med <= hi + p["hu_offset"] + slack, (tissue, med, p["phase"])
    body = img > -500
    assert body.mean() > 0.1  # a body, not air (a small patient in a 350 mm field of view fills 19 %)


def test_a_planted_liver_cyst_is_dark_and_keeps_the_liver_label():
    """Seed 2 (wide) draws a 15 mm cyst in the liver: a dark blob inside the liver's label; the standard
    case of the same seed has none."""

    def dark_blob(c):
        img = ndimage.median_filter(c.image.astype(np.float32), size=3)
        liver = ndimage.binary_erosion(c.label == 6, iterations=2)
        dark, n = ndimage.label(liver & (img < 35))
        sizes = ndimage.sum(np.ones_like(dark), dark, range(1, n + 1)) if n else [0]
        return float(np.max(sizes)) * float(np.prod(c.spacing))  # mm^3

    assert any(
        les["kind"] == "cyst" and les["organ"] == "liver" and les["radius_mm"] > 14
        for les in _wide_params(2)["lesions"]
    )
    wide = dark_blob(generate_case(2, variability="wide"))
    std = dark_blob(generate_case(2))
    assert wide > 0.25 * 4 / 3 * np.pi * 15**3, wide
    assert std < 200, std


def test_dataset_json_records_each_wide_case_and_the_config_key_reaches_the_generator(tmp_path):
    cfg = load_config("demo", ["data.phantom_cases=3", "data.phantom_variability=wide"])
    path = resolve_dataset(cfg.data, tmp_path)
    meta = json.loads(path.read_text())
    assert meta["variability"] == "wide"
    entries = meta["training"] + meta["validation"] + meta["test"]
    assert len(entries) == 3 and all(e["phantom"]["phase"] in PHASES for e in entries)
    assert json.loads((tmp_path / "phantom" / "phantom.json").read_text())["variability"] == "wide"
    # Standard data sets are written as before: no variability entry.
    std = json.loads(write_phantom_dataset(tmp_path / "std", cases=1, size=SMALL).read_text())
    assert "variability" not in std and "phantom" not in std["training"][0]


def test_phantom_command_takes_the_variability(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "medhpm", "phantom", str(tmp_path / "w"), "--cases", "1", "--size", "32,32,24"]
    r = subprocess.run(cmd + ["--variability", "wide"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "w" / "dataset.json").read_text())["variability"] == "wide"
    r = subprocess.run(
        cmd[:4] + [str(tmp_path / "bad")] + cmd[5:] + ["--variability", "huge"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--variability must be standard or wide, not 'huge'" in r.stderr
    assert not (tmp_path / "bad").exists()
