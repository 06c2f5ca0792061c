"""`check_dataset` on a clean tiny data set, then with one fault planted per test."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from medhpm.data.check import check_dataset

SHAPE = (40, 40, 24)
ROI = (32, 32, 16)  # fits the clean cases at their own spacing


@pytest.fixture
def clean_dataset(tmp_path, ct_case_writer):
    """MSD data set: 3 labelled training cases, 1 labelled test case; returns the dataset.json path."""
    root = tmp_path / "ds"
    for i, name in enumerate(("a", "b", "c", "t")):
        ct_case_writer(root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz", SHAPE, seed=i)
    js = root / "dataset.json"
    js.write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "organ", "2": "bone"},
                "training": [{"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz"} for n in "abc"],
                "test": [{"image": "imagesTr/t.nii.gz", "label": "labelsTr/t.nii.gz"}],
            }
        )
    )
    return js


def findings_for(report, filename):
    return [f for f in report.findings if Path(f.file).name == filename]


def only_problem(report, filename, severity):
    """The findings of ``severity`` for ``filename``; asserts every other file is clean."""
    others = [f for f in report.findings if Path(f.file).name != filename]
    assert others == [], [f.line() for f in others]
    hits = [f for f in findings_for(report, filename) if f.severity == severity]
    assert hits, report.format()
    return " ".join(f.problem for f in hits)


def test_clean_dataset_passes_with_summary(clean_dataset):
    rep = check_dataset(clean_dataset, num_classes=3, roi=ROI)
    assert rep.ok, rep.format()
    assert rep.findings == []
    s = rep.summary
    assert s["cases"] == {"training": 3, "validation": 0, "test": 1}
    assert s["usable_cases"] == 4
    assert s["shape"] == {"min": list(SHAPE), "max": list(SHAPE)}
    assert s["spacing_mm"]["min"] == pytest.approx([1.5, 1.5, 2.0])
    assert set(s["labels"]) == {0, 1, 2} and all(v["cases"] == 4 for v in s["labels"].values())
    assert sum(v["voxels"] for v in s["labels"].values()) == 4 * np.prod(SHAPE)
    text = rep.format()
    assert "training 3" in text and "OK" in text and "NOT OK" not in text
    d = rep.to_dict()
    json.dumps(d)  # JSON-able
    assert d["ok"] is True and d["errors"] == 0


def test_missing_file(clean_dataset):
    (clean_dataset.parent / "labelsTr" / "b.nii.gz").unlink()
    rep = check_dataset(clean_dataset, roi=ROI)
    assert not rep.ok
    assert "does not exist" in only_problem(rep, "b.nii.gz", "error")
    assert rep.unusable == [("training", "b")]
    assert "NOT OK: 1 of 4" in rep.format()


def test_truncated_nifti_is_an_error_not_a_crash(clean_dataset):
    p = clean_dataset.parent / "imagesTr" / "c.nii.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    rep = check_dataset(clean_dataset, roi=ROI)
    assert not rep.ok
    msg = " ".join(f.problem for f in findings_for(rep, "c.nii.gz") if f.severity == "error")
    assert "unreadable" in msg
    assert rep.unusable == [("training", "c")]
    assert len(rep.cases) == 4  # went on with the other cases


def test_shape_mismatch(clean_dataset, nifti_writer, synthetic_ct):
    _, lab = synthetic_ct((40, 40, 20), seed=1)
    nifti_writer(clean_dataset.parent / "labelsTr" / "b.nii.gz", lab)
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "shape" in only_problem(rep, "b.nii.gz", "error")


def test_geometry_mismatch_same_shape_shifted_affine(clean_dataset, nifti_writer, synthetic_ct):
    _, lab = synthetic_ct(SHAPE, seed=1)
    nifti_writer(clean_dataset.parent / "labelsTr" / "b.nii.gz", lab, origin=(0.0, 3.0, 0.0))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "geometry" in only_problem(rep, "b.nii.gz", "error")


def test_non_integer_labels(clean_dataset, nifti_writer):
    rng = np.random.default_rng(0)
    nifti_writer(clean_dataset.parent / "labelsTr" / "a.nii.gz", rng.random(SHAPE).astype(np.float32) * 2)
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "not integers" in only_problem(rep, "a.nii.gz", "error")


def test_label_values_above_classes(clean_dataset, nifti_writer, synthetic_ct):
    _, lab = synthetic_ct(SHAPE, seed=0)
    lab[:3, :3, :3] = 7
    nifti_writer(clean_dataset.parent / "labelsTr" / "a.nii.gz", lab)
    rep = check_dataset(clean_dataset, num_classes=3, roi=ROI)
    msg = only_problem(rep, "a.nii.gz", "error")
    assert "7" in msg and "3 classes" in msg
    # without num_classes the datalist's labels (0, 1, 2) bound the values
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "not in the datalist's labels" in only_problem(rep, "a.nii.gz", "error")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_intensities(clean_dataset, nifti_writer, synthetic_ct, bad):
    img, _ = synthetic_ct(SHAPE, seed=2)
    img = img.astype(np.float32)
    img[5, 5, 5] = bad
    nifti_writer(clean_dataset.parent / "imagesTr" / "c.nii.gz", img)
    rep = check_dataset(clean_dataset, roi=ROI)
    msg = only_problem(rep, "c.nii.gz", "error")
    assert ("1 NaN" in msg) if np.isnan(bad) else ("1 infinite" in msg)


def test_constant_image(clean_dataset, nifti_writer):
    nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", np.full(SHAPE, 40, np.int16))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "constant" in only_problem(rep, "a.nii.gz", "error")


def test_implausible_spacing(clean_dataset, nifti_writer, synthetic_ct):
    img, lab = synthetic_ct(SHAPE, seed=0)
    # the same header error in image and label (e.g. spacing written in metres), so only spacing is wrong
    nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", img, spacing=(0.0015, 0.0015, 0.002))
    nifti_writer(clean_dataset.parent / "labelsTr" / "a.nii.gz", lab, spacing=(0.0015, 0.0015, 0.002))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "spacing" in only_problem(rep, "a.nii.gz", "error")


def test_intensities_not_like_hu_is_a_warning(clean_dataset, nifti_writer, synthetic_ct):
    img, _ = synthetic_ct(SHAPE, seed=0)
    norm = ((img.astype(np.float32) + 1000) / 1700).clip(0, 1)  # already normalised to [0, 1]
    nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", norm)
    rep = check_dataset(clean_dataset, roi=ROI)
    assert rep.ok
    assert "Hounsfield" in only_problem(rep, "a.nii.gz", "warning")


def test_values_beyond_any_ct_range(clean_dataset, nifti_writer, synthetic_ct):
    img, _ = synthetic_ct(SHAPE, seed=0)
    img = img.astype(np.float32)
    img[0, 0, 0] = 60000.0
    nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", img)
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "not a CT intensity scale" in only_problem(rep, "a.nii.gz", "error")


def test_smaller_than_roi_is_only_a_warning(clean_dataset):
    rep = check_dataset(clean_dataset, roi=(48, 48, 32), spacing=(1.5, 1.5, 2.0))
    assert rep.ok, rep.format()
    warns = rep.warnings
    assert len(warns) == 4 and all("padded" in w.problem for w in warns)
    assert "x 40 < 48" in warns[0].problem and "z 24 < 32" in warns[0].problem
    # at a coarser target spacing the same scans are smaller still
    rep = check_dataset(clean_dataset, roi=ROI, spacing=(3.0, 3.0, 4.0))
    assert rep.ok and len(rep.warnings) == 4
    assert rep.summary["shape_at_target"]["max"] == [20, 20, 12]


def test_2d_image_is_an_error(clean_dataset, nifti_writer):
    nifti_writer(
        clean_dataset.parent / "imagesTr" / "a.nii.gz",
        np.zeros((40, 40), np.int16) - 1000,
        affine=np.diag([1.5, 1.5, 1.0, 1.0]),
    )
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "2D" in " ".join(f.problem for f in findings_for(rep, "a.nii.gz"))
    assert not rep.ok


def test_4d_image_is_an_error_but_trailing_singleton_is_fine(clean_dataset, nifti_writer, synthetic_ct):
    img, _ = synthetic_ct(SHAPE, seed=0)
    nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", img[..., None])
    assert check_dataset(clean_dataset, roi=ROI).ok
    nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", np.stack([img, img], -1))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "4D" in " ".join(f.problem for f in findings_for(rep, "a.nii.gz"))


def test_same_scan_in_training_and_test_is_a_leak(clean_dataset):
    obj = json.loads(clean_dataset.read_text())
    obj["test"].append({"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"})
    clean_dataset.write_text(json.dumps(obj))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert not rep.ok and any("leaks" in f.problem and "a.nii.gz" in f.problem for f in rep.errors)


def test_a_copy_of_a_training_scan_under_another_name_is_a_leak_found_by_its_voxels(clean_dataset, nifti_writer):
    """The test case is training case b saved again as float32 under another name and folder (and b also
    a second time in training): found by content, not by path; across splits an error naming both, within
    a split a warning."""
    import nibabel as nib

    root = clean_dataset.parent
    b = nib.load(str(root / "imagesTr" / "b.nii.gz"))
    nifti_writer(root / "imagesTs" / "new_patient.nii", np.asarray(b.dataobj, np.float32), affine=b.affine)
    again = root / "imagesTr" / "b_again.nii.gz"
    again.write_bytes((root / "imagesTr" / "b.nii.gz").read_bytes())
    obj = json.loads(clean_dataset.read_text())
    obj["test"] = [{"image": "imagesTs/new_patient.nii"}]
    obj["training"].append({"image": "imagesTr/b_again.nii.gz", "label": "labelsTr/b.nii.gz"})
    clean_dataset.write_text(json.dumps(obj))
    rep = check_dataset(clean_dataset, roi=ROI)
    leak = [f for f in rep.errors if Path(f.file).name == "new_patient.nii"]
    assert len(leak) == 1 and "the same scan as case" in leak[0].problem and "b.nii.gz" in leak[0].problem
    assert "two splits" in leak[0].problem and leak[0].split == "test"
    twice = [f for f in findings_for(rep, "b_again.nii.gz") if f.severity == "warning"]
    assert len(twice) == 1 and "counts twice" in twice[0].problem
    assert not any("the same scan" in f.problem for f in rep.findings if Path(f.file).name in ("a.nii.gz", "c.nii.gz"))


def test_all_problems_are_listed_not_only_the_first(clean_dataset, nifti_writer):
    root = clean_dataset.parent
    (root / "imagesTr" / "a.nii.gz").unlink()
    nifti_writer(root / "imagesTr" / "b.nii.gz", np.full(SHAPE, 0, np.int16))
    with gzip.open(root / "labelsTr" / "c.nii.gz", "rb") as fh:
        raw = fh.read()
    (root / "labelsTr" / "c.nii.gz").write_bytes(gzip.compress(raw)[:200])
    rep = check_dataset(clean_dataset, roi=ROI)
    assert {c for _, c in rep.unusable} == {"a", "b", "c"}
    assert rep.summary["usable_cases"] == 1


def test_broken_datalist_is_reported_not_raised(tmp_path):
    js = tmp_path / "dataset.json"
    js.write_text(json.dumps({"training": [{"image": "../../etc/x.nii.gz"}]}))
    rep = check_dataset(js)
    assert not rep.ok and "lead out" in rep.errors[0].problem and str(js) in rep.errors[0].problem


# --------------------------------------------------------------------------------------------------
# One rule set: the loader refuses what the check calls an error, with the same words


def _one_case(root: Path, nifti_writer, synthetic_ct, fault: str) -> Path:
    img, lab = synthetic_ct((24, 24, 12))
    img, lab, spacing = img.astype(np.float32), lab.astype(np.float32), (1.5, 1.5, 2.0)
    if fault == "spacing":
        spacing = (1.5, 1.5, 12.0)
    elif fault == "nan":
        img[3, 3, 3] = np.nan
    elif fault == "scale":
        img[img > 500] = 60000.0
    elif fault == "nonint":
        lab[lab == 1] = 0.5
    elif fault == "negative":
        lab[lab == 2] = -1
    elif fault == "over":
        lab[lab == 2] = 7
    elif fault == "almost_integer":  # a label stored with a float scale factor: rounded, not an error
        lab = lab * np.float32(0.9999999)
    nifti_writer(root / "img.nii.gz", img, spacing)
    nifti_writer(root / "lab.nii.gz", lab, spacing)
    js = root / "dataset.json"
    js.write_text(json.dumps({"training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
    return js


@pytest.mark.parametrize("fault", ["spacing", "nan", "scale", "nonint", "negative", "over", "almost_integer"])
def test_loader_and_check_apply_one_rule_set(tmp_path, nifti_writer, synthetic_ct, fault):
    from medhpm.data.datalist import DataError
    from medhpm.data.ct_reader import LoadCTd

    js = _one_case(tmp_path, nifti_writer, synthetic_ct, fault)
    rep = check_dataset(js, num_classes=3, roi=(8, 8, 4))
    load = LoadCTd(["image", "label"], num_classes=3, classes_key="num_classes", reject_constant=True)
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    if fault == "almost_integer":
        assert rep.ok, rep.format()
        assert set(np.unique(load(item)["label"].numpy()).tolist()) == {0.0, 1.0, 2.0}
        return
    assert len(rep.errors) == 1, rep.format()
    with pytest.raises(DataError) as e:
        load(item)
    assert rep.errors[0].problem in str(e.value) and rep.errors[0].file in str(e.value)


@pytest.mark.filterwarnings("error:Casting complex values")  # the check reports, it does not cast
def test_complex_voxels_are_an_error_for_the_check_and_the_loader(clean_dataset, nifti_writer, synthetic_ct):
    """One rule set (issue 15): what data check calls unusable, the loader at the head of every chain refuses,
    naming the file; before, a complex image was silently cast to its real part."""
    from medhpm.data.ct_reader import LoadCTd
    from medhpm.data.datalist import DataError

    img, _ = synthetic_ct(SHAPE, seed=0)
    path = nifti_writer(clean_dataset.parent / "imagesTr" / "a.nii.gz", img.astype(np.complex64) * (1 + 1j))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert "complex voxel values (complex64)" in only_problem(rep, "a.nii.gz", "error")
    with pytest.raises(DataError, match=r"a\.nii\.gz: complex voxel values"):
        LoadCTd(["image"])({"image": str(path)})


def test_background_only_label_is_a_warning_for_both(clean_dataset, nifti_writer):
    from medhpm.data.ct_reader import DataWarning, LoadCTd

    lab = nifti_writer(clean_dataset.parent / "labelsTr" / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    rep = check_dataset(clean_dataset, roi=ROI)
    assert rep.ok and "background only" in only_problem(rep, "a.nii.gz", "warning")
    img = clean_dataset.parent / "imagesTr" / "a.nii.gz"
    with pytest.warns(DataWarning, match=r"labelsTr/a\.nii\.gz: the label map holds background only"):
        LoadCTd(["image", "label"], label_keys=("label",))({"image": str(img), "label": str(lab)})
