"""Tests of the synthetic abdominal CT phantom (medhpm.data.phantom)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medhpm.data import phantom
from medhpm.data.phantom import BTCV_LABELS, case_seed, generate_case, write_phantom_dataset

SMALL = (64, 64, 32)
PROTOCOL = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    6: "liver",
    7: "stomach",
    8: "aorta",
    11: "pancreas",
}

# Median HU inside each organ for portal-venous contrast CT (issue's ranges; kidney: cortex 120-200
# with a darker medulla, so the whole organ's median may sit a little under the cortex range).
HU_RANGES = {
    "liver": (6, 60, 110),
    "spleen": (1, 50, 100),
    "right kidney": (2, 100, 200),
    "left kidney": (3, 100, 200),
    "aorta": (8, 150, 300),
    "inferior vena cava": (9, 100, 150),
    "gallbladder": (4, 0, 25),
    "pancreas": (11, 40, 100),
}


def _load(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


def _entries(meta):
    return meta["training"] + meta["validation"] + meta["test"]


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """Three cases at the default geometry, as the demo would write them."""
    out = tmp_path_factory.mktemp("phantom_default")
    path = write_phantom_dataset(out, cases=3, seed=11)
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_small")
    path = write_phantom_dataset(out, cases=4, seed=3, size=SMALL)
    return path, json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_arrays_and_other_seeds_differ():
    a = generate_case(7, size=SMALL)
    b = generate_case(7, size=SMALL)
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine)
    c = generate_case(8, size=SMALL)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)
    assert c.image.shape != a.image.shape or not np.array_equal(c.label, a.label)


def test_written_files_are_byte_identical_for_a_seed(tmp_path):
    p1 = write_phantom_dataset(tmp_path / "a", cases=2, seed=5, size=(40, 36, 20))
    p2 = write_phantom_dataset(tmp_path / "b", cases=2, seed=5, size=(40, 36, 20))
    for entry in _entries(json.loads(p1.read_text())):
        for key in ("image", "label"):
            assert (p1.parent / entry[key]).read_bytes() == (p2.parent / entry[key]).read_bytes()
    p3 = write_phantom_dataset(tmp_path / "c", cases=2, seed=6, size=(40, 36, 20))
    first = json.loads(p1.read_text())["training"][0]["image"]
    assert (p1.parent / first).read_bytes() != (p3.parent / first).read_bytes()


def test_case_seeds_depend_on_dataset_seed_and_index():
    seeds = {case_seed(s, i) for s in range(4) for i in range(4)}
    assert len(seeds) == 16
    assert case_seed(2, 3) == case_seed(2, 3)


# ------------------------------------------------------------------------------------------- content


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_cases_contain_the_protocol_organs(seed):
    case = generate_case(seed, size=SMALL)
    present = set(np.unique(case.label).tolist())
    missing = set(PROTOCOL) - present
    assert not missing, f"missing organs {[PROTOCOL[m] for m in missing]}"
    assert present <= set(BTCV_LABELS)


def test_default_cases_have_all_13_btcv_labels_and_plausible_volumes(default_dataset):
    path, meta = default_dataset
    for entry in _entries(meta):
        lab_img, lab = _load(path.parent / entry["label"])
        assert set(np.unique(lab).tolist()) == set(BTCV_LABELS)
        voxel_ml = float(np.prod(lab_img.header.get_zooms()[:3])) / 1000.0
        vol = {n: float((lab == k).sum()) * voxel_ml for k, n in BTCV_LABELS.items()}
        # Adult organ volumes, loosely: a learnable organ must not be a speck, nor swallow the body.
        assert 450 < vol["liver"] < 2500
        assert 60 < vol["spleen"] < 450
        assert 50 < vol["right kidney"] < 300 and 50 < vol["left kidney"] < 300
        assert 10 < vol["gallbladder"] < 100
        assert 20 < vol["pancreas"] < 150
        assert vol["liver"] > vol["spleen"] > vol["gallbladder"]


def test_organ_median_hu_matches_contrast_ct(default_dataset):
    path, meta = default_dataset
    medians = {name: [] for name in HU_RANGES}
    for entry in _entries(meta):
        img_img, img = _load(path.parent / entry["image"])
        assert img_img.get_data_dtype() == np.int16
        _, lab = _load(path.parent / entry["label"])
        for name, (k, lo, hi) in HU_RANGES.items():
            med = float(np.median(img[lab == k]))
            assert lo <= med <= hi, f"{name}: median {med} HU outside [{lo}, {hi}] in {entry['image']}"
            medians[name].append(med)
        # Stomach: wall 60-100 HU and fluid near water; gas is excluded.
        stomach = img[(lab == 7) & (img > -200)]
        assert -10 <= float(np.median(stomach)) <= 100
        # Air around the patient, fat inside, bone brighter than any organ.
        assert abs(float(np.median(img[:3, :3, :])) + 1000) < 30
        body = img > -500
        assert np.percentile(img[body & (lab == 0)], 5) < -60  # fat present
        assert 300 < np.percentile(img, 99.9) < 1500
    # Organ intensities vary from case to case, as contrast timing does.
    for name in ("liver", "spleen", "aorta"):
        assert len(set(medians[name])) > 1


def test_lungs_at_the_top_and_not_at_the_bottom(default_dataset):
    path, meta = default_dataset
    for entry in _entries(meta):
        img = np.asarray(nib.as_closest_canonical(nib.load(str(path.parent / entry["image"]))).dataobj)
        nx, ny, nz = img.shape
        inner = img[nx // 4 : 3 * nx // 4, ny // 4 : 3 * ny // 4]
        lung_top = float((inner[..., -3:] < -600).mean())
        lung_bottom = float((inner[..., :3] < -600).mean())
        assert lung_top > 0.05, "no lung bases in the top slices"
        # Bottom slices may hold bowel gas but far less air than the lung bases.
        assert lung_bottom < lung_top


# ------------------------------------------------------------------------------------------ geometry


def _world_centroid(mask, affine):
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_orientations_and_patient_laterality(default_dataset, small_dataset):
    codes = set()
    for path, meta in (default_dataset, small_dataset):
        for entry in _entries(meta):
            img = nib.load(str(path.parent / entry["image"]))
            lab = nib.load(str(path.parent / entry["label"]))
            codes.add(nib.aff2axcodes(img.affine))
            img_c, lab_c = nib.as_closest_canonical(img), nib.as_closest_canonical(lab)
            assert nib.aff2axcodes(img_c.affine) == ("R", "A", "S")
            im, lb = np.asarray(img_c.dataobj), np.asarray(lab_c.dataobj)
            aff = lab_c.affine
            centre_x = _world_centroid(im > -500, aff)[0]
            x = {k: _world_centroid(lb == k, aff)[0] for k in (1, 2, 3, 6, 8, 9)}
            # RAS+ world: x grows towards the patient's RIGHT (the real CT fixture's liver has x > 0)
            assert x[1] < centre_x < x[6], "liver must be on the patient's right, spleen on the left"
            assert x[3] < centre_x < x[2], "right kidney on the right, left kidney on the left"
            assert x[8] < x[9], "IVC lies to the right of the aorta"
            # Kidneys lie posterior to the liver's centre, the aorta in front of the spine's level.
            y = {k: _world_centroid(lb == k, aff)[1] for k in (2, 6)}
            assert y[2] < y[6]
    assert ("R", "A", "S") in codes and ("L", "P", "S") in codes


def test_lps_and_ras_versions_of_a_case_are_the_same_patient():
    ras = generate_case(21, size=(48, 44, 24), orientation="RAS")
    lps = generate_case(21, size=(48, 44, 24), orientation="LPS")
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert not np.array_equal(ras.label, lps.label)
    a = nib.as_closest_canonical(nib.Nifti1Image(ras.label, ras.affine))
    b = nib.as_closest_canonical(nib.Nifti1Image(lps.label, lps.affine))
    assert np.allclose(a.affine, b.affine)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.array_equal(ras.image, lps.image[::-1, ::-1, :])


def test_default_geometry_is_coarse_abdominal_and_off_multiples_of_16(default_dataset):
    path, meta = default_dataset
    shapes = []
    for entry in _entries(meta):
        img = nib.load(str(path.parent / entry["image"]))
        shape = img.shape
        spacing = np.asarray(img.header.get_zooms()[:3], float)
        assert all(n % 16 for n in shape), f"default size {shape} has a multiple of 16"
        assert 2.3 - 1e-3 <= spacing[0] <= 2.8 + 1e-3 and abs(spacing[0] - spacing[1]) < 1e-3
        assert 2.5 - 1e-3 <= spacing[2] <= 5.0 + 1e-3
        fov = spacing * np.asarray(shape)
        assert 300 <= fov[0] <= 360 and 300 <= fov[1] <= 360
        assert 195 <= fov[2] <= 255
        assert 100 <= shape[0] <= 160 and 35 <= shape[2] <= 105
        shapes.append(shape)
    assert len(set(shapes)) > 1, "spacing should vary between cases"


def test_size_and_spacing_overrides():
    only_size = generate_case(4, size=(40, 36, 20))
    assert only_size.image.shape == (40, 36, 20)
    # The field of view stays that of an abdomen, so the tiny volume still shows the whole body.
    fov = np.asarray(only_size.spacing) * np.array([40, 36, 20])
    assert np.all(fov[:2] > 290) and fov[2] > 190
    img = only_size.image
    assert (img[0] < -900).mean() > 0.8 and (img[-1] < -900).mean() > 0.8

    only_spacing = generate_case(4, spacing=(4.0, 4.0, 6.0))
    assert np.allclose(only_spacing.spacing, (4.0, 4.0, 6.0))
    assert np.allclose(np.abs(np.diag(only_spacing.affine)[:3]), (4.0, 4.0, 6.0))
    fov = np.asarray(only_spacing.image.shape) * 4.0
    assert 300 <= fov[0] <= 360

    both = generate_case(4, size=(30, 30, 10), spacing=(3.0, 3.0, 3.0))
    assert both.image.shape == (30, 30, 10) and np.allclose(both.spacing, 3.0)
    assert both.label.shape == both.image.shape


def test_bad_arguments_raise_value_error(tmp_path):
    for kwargs in (
        {"cases": 0},
        {"cases": -2},
        {"size": (64, 0, 32)},
        {"size": (64, -1, 32)},
        {"spacing": (1.0, 0.0, 2.0)},
        {"spacing": (1.0, -1.0, 2.0)},
        {"spacing": (1.0, float("nan"), 2.0)},
        {"size": (64, 64)},
        {"seed": -1},
        {"split": (0.5, -0.1, 0.6)},
    ):
        with pytest.raises(ValueError):
            write_phantom_dataset(tmp_path / "bad", **kwargs)
    with pytest.raises(ValueError):
        generate_case(0, size=(10.5, 10, 10))
    with pytest.raises(ValueError):
        generate_case(0, orientation="XYZ")
    assert not (tmp_path / "bad" / "dataset.json").exists()


# ------------------------------------------------------------------------------------------- dataset


def test_dataset_json_structure_and_files(small_dataset):
    path, meta = small_dataset
    assert path.name == "dataset.json"
    assert meta["name"] == "medhpm-phantom"
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {str(k): v for k, v in BTCV_LABELS.items()}
    assert meta["labels"]["1"] == "spleen" and meta["labels"]["6"] == "liver"
    assert meta["numTraining"] == len(meta["training"])
    assert all(len(meta[k]) >= 1 for k in ("training", "validation", "test"))
    entries = _entries(meta)
    assert len(entries) == 4
    images = [e["image"] for e in entries]
    assert len(set(images)) == 4
    for entry in entries:
        assert set(entry) >= {"image", "label"}
        for key in ("image", "label"):
            assert not Path(entry[key]).is_absolute()
            assert (path.parent / entry[key]).is_file()
        img = nib.load(str(path.parent / entry["image"]))
        lab = nib.load(str(path.parent / entry["label"]))
        assert entry["image"].startswith("imagesTr/") and entry["label"].startswith("labelsTr/")
        assert img.shape == lab.shape == SMALL
        assert np.allclose(img.affine, lab.affine)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    leftovers = [p for p in path.parent.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers


@pytest.mark.parametrize("cases", [1, 2, 3, 10])
def test_split_sizes(tmp_path, cases):
    # Split bookkeeping does not need anatomy: write 8-voxel cubes.
    path = write_phantom_dataset(tmp_path, cases=cases, seed=1, size=(2, 2, 2))
    meta = json.loads(path.read_text())
    n = [len(meta[k]) for k in ("training", "validation", "test")]
    assert sum(n) == cases
    if cases < 3:
        assert n == [cases, 0, 0]
    else:
        assert min(n) >= 1
    if cases == 10:
        assert abs(n[0] - 6) <= 1 and abs(n[1] - 2) <= 1 and abs(n[2] - 2) <= 1


def test_interrupted_run_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    real = phantom.generate_case
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom.write, "generate_case", failing)  # the name write_phantom_dataset calls
    with pytest.raises(KeyboardInterrupt):
        write_phantom_dataset(tmp_path, cases=3, seed=0, size=(24, 24, 12))
    # No dataset.json: a reader cannot mistake the folder for a finished data set.
    assert not (tmp_path / "dataset.json").exists()
    # What was written is complete and readable.
    for p in tmp_path.rglob("*.nii.gz"):
        assert np.asarray(nib.load(str(p)).dataobj).shape == (24, 24, 12)


def test_failed_write_keeps_neither_partial_file_nor_temp(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_phantom_dataset(tmp_path, cases=1, seed=0, size=(8, 8, 4))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_progress_flag_writes_the_same_data(tmp_path, capsys):
    a = write_phantom_dataset(tmp_path / "a", cases=1, seed=2, size=(16, 16, 8), progress=True)
    b = write_phantom_dataset(tmp_path / "b", cases=1, seed=2, size=(16, 16, 8))
    name = "imagesTr/phantom_000.nii.gz"
    assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
