"""Organ statistics (volume in mL, HU mean/std inside the mask) against a slow reference written here, on a
planted mask with anisotropic and oblique voxel grids."""

from __future__ import annotations

import csv
import io
import itertools
import math

import numpy as np
import pytest

from medhpm.evaluate.organ_stats import organ_statistics, statistics_csv


def _slow(image, label, spacing_mm, value):
    """Voxel by voxel: count, sum, then the squared deviations; volume = count x product of spacings."""
    hits = [float(image[i, j, k]) for i, j, k in itertools.product(*map(range, label.shape)) if label[i, j, k] == value]
    n = len(hits)
    if not n:
        return 0, 0.0, None, None
    mean = sum(hits) / n
    std = math.sqrt(sum((h - mean) ** 2 for h in hits) / n)
    return n, n * spacing_mm[0] * spacing_mm[1] * spacing_mm[2] / 1000.0, mean, std


@pytest.mark.parametrize("oblique", [False, True])
def test_statistics_equal_the_slow_reference_on_anisotropic_grids(oblique):
    rng = np.random.default_rng(0)
    shape, spacing = (17, 13, 9), (0.7, 1.3, 3.5)
    image = rng.normal(40, 25, shape).astype(np.float32)
    image[2:9, 3:10, 1:6] += 60  # a brighter organ
    label = np.zeros(shape, np.uint8)
    label[2:9, 3:10, 1:6] = 6  # 7 x 7 x 5 = 245 voxels
    label[12:15, 1:4, 2:8] = 1  # 54 voxels
    affine = np.diag([*spacing, 1.0])
    if oblique:  # a rotation about z keeps the voxel volume: the axes stay orthogonal, lengths unchanged
        c, s = math.cos(0.4), math.sin(0.4)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
        affine[:3, 3] = (-100.0, 20.0, 300.0)
    stats = organ_statistics(image, label, affine, {1: "spleen", 6: "liver", 2: "right_kidney"})
    assert list(stats) == ["1", "2", "6"]
    for v in (1, 6, 2):
        n, ml, mean, std = _slow(image, label, spacing, v)
        got = stats[str(v)]
        assert got["voxels"] == n and got["volume_ml"] == pytest.approx(ml, rel=1e-9)
        if n:
            assert got["hu_mean"] == pytest.approx(mean, abs=1e-4) and got["hu_std"] == pytest.approx(std, abs=1e-4)
        else:
            assert got["hu_mean"] is None and got["hu_std"] is None
    assert stats["6"]["volume_ml"] == pytest.approx(245 * 0.7 * 1.3 * 3.5 / 1000)
    rows = list(csv.DictReader(io.StringIO(statistics_csv({"case": stats}))))
    assert [r["label"] for r in rows] == ["1", "2", "6"] and rows[1]["hu_mean"] == ""
    assert float(rows[2]["volume_ml"]) == pytest.approx(stats["6"]["volume_ml"], rel=1e-6)


def test_statistics_refuse_an_image_off_the_label_grid():
    with pytest.raises(ValueError, match="differs from label map shape"):
        organ_statistics(np.zeros((4, 4, 4)), np.zeros((4, 4, 3), np.uint8), np.eye(4), {1: "a"})
