"""Dice / HD95 against a slow, independent NumPy/SciPy reference; empty-mask conventions; classes; tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medhpm.evaluate import BTCV8, BTCV13, aggregate_seeds, compute_case_metrics, paper_table, parse_classes, summarize
from medhpm.evaluate.classes import display_name

SPACING = (0.8, 1.2, 3.0)


# ---------------------------------------------------------------- reference (written from the definition)
def ref_dice(p: np.ndarray, g: np.ndarray) -> float:
    return 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


def _surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m)  # boundary voxels; outside the array is background


def ref_hd95(p: np.ndarray, g: np.ndarray, spacing) -> float:
    sp, sg = _surface(p), _surface(g)
    dist_to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)  # mm to the nearest GT surface voxel
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return max(np.percentile(dist_to_g[sp], 95), np.percentile(dist_to_p[sg], 95))


def ellipsoid(shape, center_mm, radii_mm, spacing=SPACING) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((x - c) / r) ** 2 for x, c, r in zip(grids, center_mm, radii_mm)) <= 1.0


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


SHAPE = (48, 40, 16)
CASES = {
    "spheres_offset": (ellipsoid(SHAPE, (18, 24, 22), (9, 9, 12)), ellipsoid(SHAPE, (21, 22, 25), (8, 10, 10))),
    "cubes_shifted": (box(SHAPE, (10, 8, 3), (22, 20, 9)), box(SHAPE, (12, 8, 4), (24, 19, 10))),
    "touching_border": (box(SHAPE, (0, 0, 0), (15, 12, 6)), box(SHAPE, (2, 0, 0), (18, 10, 5))),
    "far_outlier": (  # prediction with a distant speck: HD95 is pulled by the far voxels
        ellipsoid(SHAPE, (18, 24, 22), (9, 9, 12)) | box(SHAPE, (40, 30, 11), (48, 40, 16)),
        ellipsoid(SHAPE, (18, 24, 22), (9, 9, 12)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dice_hd95_match_reference(name):
    p, g = CASES[name]
    out = compute_case_metrics(p.astype(np.uint8) * 3, g.astype(np.uint8) * 3, SPACING, {3: "organ"})
    assert out[3]["status"] == "ok"
    assert out[3]["dice"] == pytest.approx(ref_dice(p, g), abs=1e-6)
    assert out[3]["hd95"] == pytest.approx(ref_hd95(p, g, SPACING), abs=1e-3)


def test_multilabel_each_label_independent_and_unlisted_labels_ignored():
    p1, g1 = CASES["spheres_offset"]
    p2, g2 = box(SHAPE, (30, 2, 1), (40, 10, 8)), box(SHAPE, (31, 3, 1), (42, 10, 7))
    pred = np.zeros(SHAPE, np.int16)
    label = np.zeros(SHAPE, np.int16)
    pred[p1], label[g1] = 1, 1
    pred[p2], label[g2] = 6, 6
    pred[0:3, 36:40, 12:16] = 9  # a label the class set does not list must not matter
    out = compute_case_metrics(pred, label, SPACING, {1: "a", 6: "b"})
    assert set(out) == {1, 6}
    for v in (1, 6):
        p, g = pred == v, label == v
        assert out[v]["dice"] == pytest.approx(ref_dice(p, g), abs=1e-6)
        assert out[v]["hd95"] == pytest.approx(ref_hd95(p, g, SPACING), abs=1e-3)


@pytest.mark.parametrize("axis,expected_mm", [(0, 2 * 0.8), (1, 2 * 1.2), (2, 2 * 3.0)])
def test_spacing_applies_per_axis(axis, expected_mm):
    # Two single voxels two steps apart along one axis: the distance is exactly 2 * that axis' spacing.
    g = np.zeros((7, 7, 7), np.uint8)
    p = np.zeros_like(g)
    g[3, 3, 3] = 1
    idx = [3, 3, 3]
    idx[axis] += 2
    p[tuple(idx)] = 1
    out = compute_case_metrics(p, g, SPACING, {1: "x"})
    assert out[1]["dice"] == 0.0
    assert out[1]["hd95"] == pytest.approx(expected_mm, abs=1e-5)


def test_identical_masks():
    g = CASES["spheres_offset"][1].astype(np.uint8)
    out = compute_case_metrics(g, g, SPACING, {1: "x"})
    assert out[1] == {"dice": pytest.approx(1.0), "hd95": pytest.approx(0.0), "status": "ok"}


def test_empty_conventions():
    g = box((10, 10, 10), (2, 2, 2), (6, 6, 6)).astype(np.uint8)
    z = np.zeros_like(g)
    both = compute_case_metrics(z, z, SPACING, {1: "x"})[1]
    assert both["status"] == "absent" and math.isnan(both["dice"]) and math.isnan(both["hd95"])
    missed = compute_case_metrics(z, g, SPACING, {1: "x"})[1]
    assert missed["status"] == "missed" and missed["dice"] == 0.0 and math.isnan(missed["hd95"])
    fp = compute_case_metrics(g, z, SPACING, {1: "x"})[1]
    assert fp["status"] == "false_positive" and fp["dice"] == 0.0 and math.isnan(fp["hd95"])


def test_float_label_maps_accepted_probabilities_rejected():
    p, g = CASES["cubes_shifted"]
    out = compute_case_metrics(p.astype(np.float32) * 2, g.astype(np.float64) * 2, SPACING, {2: "x"})
    assert out[2]["dice"] == pytest.approx(ref_dice(p, g), abs=1e-6)
    with pytest.raises(ValueError, match="non-integer"):
        compute_case_metrics(p * 0.7, g.astype(np.uint8), SPACING, {1: "x"})


def test_bad_inputs():
    g = np.zeros((5, 5, 5), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(np.zeros((5, 5, 4), np.uint8), g, SPACING, {1: "x"})
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(g, g, (1.0, 0.0, 1.0), {1: "x"})
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(g, g, (1.0, 1.0), {1: "x"})
    with pytest.raises(ValueError, match="negative"):
        compute_case_metrics(g.astype(np.int8) - 1, g, SPACING, {1: "x"})


# ---------------------------------------------------------------- summaries
def test_summarize_means_stds_and_counts():
    nan = math.nan
    cases = {
        "a": {1: {"dice": 0.9, "hd95": 2.0, "status": "ok"}, 2: {"dice": nan, "hd95": nan, "status": "absent"}},
        "b": {1: {"dice": 0.7, "hd95": 6.0, "status": "ok"}, 2: {"dice": 0.0, "hd95": nan, "status": "missed"}},
        "c": {
            1: {"dice": 0.0, "hd95": None, "status": "false_positive"},
            2: {"dice": 0.5, "hd95": 4.0, "status": "ok"},
        },
    }
    s = summarize(cases, {1: "x", 2: "y"})
    assert s["1"]["dice_mean"] == pytest.approx((0.9 + 0.7 + 0.0) / 3)
    assert s["1"]["dice_std"] == pytest.approx(np.std([0.9, 0.7, 0.0], ddof=1))
    assert s["1"]["hd95_mean"] == pytest.approx(4.0)
    assert (s["1"]["n"], s["1"]["n_hd95"], s["1"]["n_false_positive"]) == (3, 2, 1)
    assert s["2"]["dice_mean"] == pytest.approx(0.25)
    assert s["2"]["hd95_mean"] == pytest.approx(4.0) and math.isnan(s["2"]["hd95_std"])
    assert (s["2"]["n"], s["2"]["n_absent"], s["2"]["n_missed"]) == (2, 1, 1)
    assert s["mean"]["dice_mean"] == pytest.approx(((0.9 + 0.7) / 3 + 0.25) / 2)
    assert s["mean"]["hd95_mean"] == pytest.approx(4.0)
    # string label keys (as read back from metrics.json) and a subset of classes
    s1 = summarize({k: {str(label): e for label, e in v.items()} for k, v in cases.items()}, {1: "x"})
    assert list(s1) == ["1", "mean"] and s1["mean"]["dice_mean"] == pytest.approx(s["1"]["dice_mean"])


# ---------------------------------------------------------------- classes
def test_parse_classes_presets_and_lists():
    assert parse_classes("BTCV8") == {
        1: "spleen",
        2: "right_kidney",
        3: "left_kidney",
        4: "gallbladder",
        6: "liver",
        7: "stomach",
        8: "aorta",
        11: "pancreas",
    }
    assert list(parse_classes("btcv13")) == list(range(1, 14))
    assert parse_classes("btcv13")[10] == "portal_splenic_vein"
    assert parse_classes(" liver=6, spleen=1 ,") == {1: "spleen", 6: "liver"}
    assert parse_classes({"1": "spleen", 6: "liver"}) == {1: "spleen", 6: "liver"}
    assert parse_classes({"background": 0, "spleen": 1, "liver": 6}) == {1: "spleen", 6: "liver"}
    assert BTCV8 == {k: BTCV13[k] for k in (1, 2, 3, 4, 6, 7, 8, 11)}


@pytest.mark.parametrize(
    "spec,token",
    [
        ("btcv9", "btcv9"),
        ("spleen=1,liver", "liver"),
        ("spleen=1,liver=x", "liver=x"),
        ("spleen=0", "spleen=0"),
        ("spleen=1,liver=1", "given twice"),
        ("spleen=1,spleen=2", "spleen"),
        ("1=spleen", "1=spleen"),
        ("spl een=1", "spl een"),
        ({"spleen": -2}, "-2"),
    ],
)
def test_parse_classes_errors_name_token(spec, token):
    with pytest.raises(ValueError) as e:
        parse_classes(spec)
    assert token in str(e.value)


def test_display_names():
    assert display_name("right_kidney") == "Kidney(R)"
    assert display_name("spleen") == "Spleen"
    assert display_name("left_lung") == "Left Lung"


# ---------------------------------------------------------------- tables
def _summary(dice: dict[int, float], hd: dict[int, float]) -> dict:
    out = {str(k): {"dice_mean": dice[k], "hd95_mean": hd[k]} for k in dice}
    out["mean"] = {"dice_mean": float(np.mean(list(dice.values()))), "hd95_mean": float(np.mean(list(hd.values())))}
    return out


def test_paper_table_single_run_layout_and_values():
    classes = {1: "spleen", 2: "right_kidney", 11: "pancreas"}
    s = _summary({1: 0.95123, 2: 0.8, 11: 0.61}, {1: 2.0, 2: 4.5, 11: 9.25})
    lines = paper_table({"UNETR + HPM": s}, classes).strip().splitlines()
    assert lines[0] == "| Method | Avg DSC / HD95 | Spleen | Kidney(R) | Pancreas |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    avg_dice = (0.95123 + 0.8 + 0.61) / 3 * 100
    avg_hd = (2.0 + 4.5 + 9.25) / 3
    assert cells == ["UNETR + HPM", f"{avg_dice:.2f} / {avg_hd:.2f}", "95.12", "80.00", "61.00"]


def test_paper_table_subset_and_nulls():
    s = _summary({1: 0.9, 2: 0.5, 3: 0.7}, {1: 1.0, 2: 3.0, 3: 5.0})
    s["3"]["dice_mean"] = None
    s["3"]["hd95_mean"] = None
    row = paper_table({"m": s}, {1: "spleen", 3: "left_kidney"}).splitlines()[2]
    assert row == "| m | 90.00 / 1.00 | 90.00 | n/a |"
    with pytest.raises(ValueError, match="11"):
        paper_table({"m": s}, {1: "spleen", 11: "pancreas"})


def test_aggregate_seeds_mean_std_and_table():
    rng = np.random.default_rng(1)
    labels = (1, 2, 6)
    seeds = [
        _summary({k: float(rng.uniform(0.6, 0.9)) for k in labels}, {k: float(rng.uniform(1, 9)) for k in labels})
        for _ in range(3)
    ]
    agg = aggregate_seeds(seeds)
    d1 = [s["1"]["dice_mean"] for s in seeds]
    assert agg["1"]["dice_mean"] == pytest.approx(np.mean(d1))
    assert agg["1"]["dice_std"] == pytest.approx(np.std(d1, ddof=1))
    assert agg["mean"]["hd95_mean"] == pytest.approx(np.mean([s["mean"]["hd95_mean"] for s in seeds]))
    # table over a subset: Avg is averaged within each seed, then mean ± std over seeds
    sub = {1: "spleen", 6: "liver"}
    per_seed_avg = [np.mean([s["1"]["dice_mean"], s["6"]["dice_mean"]]) * 100 for s in seeds]
    per_seed_hd = [np.mean([s["1"]["hd95_mean"], s["6"]["hd95_mean"]]) for s in seeds]
    row = paper_table({"HPM": agg}, sub).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == (
        f"{np.mean(per_seed_avg):.2f} ± {np.std(per_seed_avg, ddof=1):.2f} / "
        f"{np.mean(per_seed_hd):.2f} ± {np.std(per_seed_hd, ddof=1):.2f}"
    )
    assert cells[2] == f"{np.mean(d1) * 100:.2f} ± {np.std(d1, ddof=1) * 100:.2f}"
    with pytest.raises(ValueError, match="same classes"):
        aggregate_seeds([seeds[0], _summary({1: 0.5}, {1: 1.0})])
