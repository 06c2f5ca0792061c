"""Normalised surface Dice and ASSD (MONAI) against a brute-force reference written here on an anisotropic
grid; their empty-organ conventions; their place in metrics.json, metrics.csv and table.md."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medhpm.evaluate import evaluate_predictions
from medhpm.evaluate.metrics import compute_case_metrics

SPACING = (0.8, 1.2, 3.0)


def _surface_points(mask, spacing):
    """Surface voxels (the mask minus its face-connected erosion, outside = background), in mm."""
    surf = mask & ~ndimage.binary_erosion(mask)
    return np.argwhere(surf) * np.asarray(spacing)


def _reference(p, g, spacing, tol):
    """Every surface point against every other surface point (no distance transform)."""
    a, b = _surface_points(p, spacing), _surface_points(g, spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    a_to_b, b_to_a = d.min(1), d.min(0)
    nsd = ((a_to_b <= tol).sum() + (b_to_a <= tol).sum()) / (len(a) + len(b))
    assd = (a_to_b.sum() + b_to_a.sum()) / (len(a) + len(b))
    return nsd, assd


def _masks():
    x, y, z = np.meshgrid(*[np.arange(n) for n in (30, 24, 10)], indexing="ij")
    g = ((x - 14) * 0.8) ** 2 + ((y - 11) * 1.2) ** 2 + ((z - 5) * 3.0) ** 2 <= 9.0**2  # a sphere in mm
    p = ((x - 16) * 0.8) ** 2 / 1.2 + ((y - 11) * 1.2) ** 2 + ((z - 4.6) * 3.0) ** 2 <= 8.5**2  # moved, squashed
    return p, g


@pytest.mark.parametrize("tol", [0.0, 1.0, 2.5, 6.0])
def test_surface_dice_and_assd_equal_the_brute_force_reference(tol):
    p, g = _masks()
    label = g.astype(np.uint8) * 3
    pred = p.astype(np.uint8) * 3
    got = compute_case_metrics(pred, label, SPACING, {3: "organ"}, surface_tolerance_mm=tol)[3]
    nsd, assd = _reference(p, g, SPACING, tol)
    assert got["status"] == "ok"
    assert got["surface_dice"] == pytest.approx(nsd, abs=1e-6)
    assert got["assd"] == pytest.approx(assd, rel=1e-5)
    assert 0.0 < got["assd"] and (tol < 6.0 or got["surface_dice"] == pytest.approx(1.0))


def test_empty_organ_conventions_for_the_surface_metrics():
    _, g = _masks()
    g = g.astype(np.uint8)
    z = np.zeros_like(g)
    absent = compute_case_metrics(z, z, SPACING, {1: "x"}, surface_tolerance_mm=1.0)[1]
    missed = compute_case_metrics(z, g, SPACING, {1: "x"}, surface_tolerance_mm=1.0)[1]
    fp = compute_case_metrics(g, z, SPACING, {1: "x"}, surface_tolerance_mm=1.0)[1]
    assert np.isnan(absent["surface_dice"]) and np.isnan(absent["assd"])
    assert missed["surface_dice"] == 0.0 and np.isnan(missed["assd"]) and missed["status"] == "missed"
    assert fp["surface_dice"] == 0.0 and np.isnan(fp["assd"]) and fp["status"] == "false_positive"
    with pytest.raises(ValueError, match="tolerance"):
        compute_case_metrics(g, g, SPACING, {1: "x"}, surface_tolerance_mm=-1)


def test_surface_metrics_in_every_result_file(tmp_path):
    p, g = _masks()
    affine = np.diag([*SPACING, 1.0])
    for name, pred, gt in (("a", p, g), ("b", np.zeros_like(p), g)):  # case b: the organ is missed
        for folder, arr in (("pred", pred), ("gt", gt)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(arr.astype(np.uint8) * 2, affine), str(tmp_path / folder / f"{name}.nii.gz"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--label",
            str(tmp_path / "gt"),
            "--classes",
            "right_kidney=2",
            "--surface-tolerance",
            "2.5",
            "-o",
            str(tmp_path / "ev"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    nsd, assd = _reference(p, g, SPACING, 2.5)
    assert m["surface_tolerance_mm"] == 2.5
    assert {"surface_dice", "assd", "absent", "missed", "false_positive"} <= set(m["conventions"])
    assert "surface_dice = 0" in m["conventions"]["missed"] and "assd = null" in m["conventions"]["missed"]
    a, b = m["cases"]["a"]["2"], m["cases"]["b"]["2"]
    assert a["surface_dice"] == pytest.approx(nsd, abs=1e-6) and a["assd"] == pytest.approx(assd, rel=1e-5)
    assert b["surface_dice"] == 0.0 and b["assd"] is None
    s = m["summary"]["2"]
    assert s["surface_dice_mean"] == pytest.approx(nsd / 2, abs=1e-6) and s["assd_mean"] == pytest.approx(
        assd, rel=1e-5
    )
    assert s["n_assd"] == 1 and m["summary"]["mean"]["surface_dice_mean"] == pytest.approx(nsd / 2, abs=1e-6)
    rows = list(csv.DictReader((tmp_path / "ev" / "metrics.csv").open()))
    assert rows[0]["surface_dice"] and float(rows[0]["assd"]) == pytest.approx(assd, rel=1e-5)
    assert rows[1]["surface_dice"] == "0.000000" and rows[1]["assd"] == ""
    table = (tmp_path / "ev" / "table.md").read_text().splitlines()
    # the paper's columns first and unchanged, then the extra column set
    assert table[0] == "| Method | Avg DSC / HD95 | Kidney(R) | Avg NSD@2.5 mm / ASSD | Kidney(R) NSD |"
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[3] == f"{nsd / 2 * 100:.2f} / {assd:.2f}" and cells[4] == f"{nsd / 2 * 100:.2f}"
    assert cells[1] == f"{s['dice_mean'] * 100:.2f} / {s['hd95_mean']:.2f}"


def test_evaluate_without_a_tolerance_uses_the_configs():
    from medhpm.config import load_config

    assert load_config("demo").finetune.surface_tolerance_mm == 1.0
    import inspect

    assert inspect.signature(evaluate_predictions).parameters["surface_tolerance_mm"].default == 1.0
