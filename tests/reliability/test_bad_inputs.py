"""Bad data and bad configs, through the command line a user types.

Every fault must give an ``error:`` message that names the file (or config key) and what is wrong, exit
non-zero, show no Python traceback (unless ``--debug``), and leave nothing that looks like a finished
output. The training commands catch what a NIfTI header shows (unreadable file, 2D/4D image, a label map
off its image's grid) before training starts; what needs the voxels (a truncated voxel block, NaN,
constant images, label values) is caught when the case is first loaded, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rel_helpers import (
    assert_clean_error,
    assert_nothing_complete,
    ct_volume,
    dataset_with,
    medhpm,
    tiny,
    truncate,
    write_cases,
    write_datalist,
    write_nifti,
)


def _pretrain(dataset, out: Path, *more: str):
    return medhpm("pretrain", *tiny(dataset, *more), "--out", out)


def _finetune(dataset, out: Path, *more: str):
    return medhpm("finetune", *tiny(dataset, *more), "--init", "none", "--out", out)


# ============================================================================================ data faults
def test_missing_image_file(tmp_path):
    dl = write_datalist(tmp_path / "data", write_cases(tmp_path / "data", 3))
    gone = tmp_path / "data" / "imagesTr" / "c1.nii.gz"
    gone.unlink()
    res = _pretrain(dl, tmp_path / "run")
    assert_clean_error(res, dl, "do not exist", "c1 image", gone)
    assert_nothing_complete(tmp_path / "run")


def test_truncated_nifti(tmp_path):
    dl = dataset_with(tmp_path / "data")
    bad = truncate(tmp_path / "data" / "imagesTr" / "c1.nii.gz")  # header intact, voxel block cut in half
    res = _pretrain(dl, tmp_path / "run")
    msg = assert_clean_error(res, bad, "unreadable")
    assert "applying transform" not in msg  # MONAI's wrapper is not what the user reads
    assert_nothing_complete(tmp_path / "run")


def test_corrupt_nifti_header_is_caught_before_training(tmp_path):
    dl = dataset_with(tmp_path / "data")
    bad = tmp_path / "data" / "labelsTr" / "c2.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 10)
    res = _finetune(dl, tmp_path / "run")
    assert_clean_error(res, bad, "unreadable", "nothing was trained")
    assert "epoch" not in res.stdout
    assert_nothing_complete(tmp_path / "run")


def test_dicom_folder_with_two_series(tmp_path, dicom_series_writer):
    folder = tmp_path / "dicom"
    vol = ct_volume((32, 32, 8))[0]
    dicom_series_writer(folder, vol, series_uid="1.2.826.0.1.3680043.8.498.1")
    dicom_series_writer(folder, vol, series_uid="1.2.826.0.1.3680043.8.498.2")
    res = _pretrain(folder, tmp_path / "run", "data.format=folder")
    assert_clean_error(
        res,
        f"DICOM folder {folder}",
        "holds 2 series",
        "1.2.826.0.1.3680043.8.498.1",
        "1.2.826.0.1.3680043.8.498.2",
        "its own folder",
    )
    assert_nothing_complete(tmp_path / "run")


def _enhanced_ct(series_folder: Path, out: Path) -> Path:
    """One multi-frame file (Enhanced CT Image Storage, NumberOfFrames) holding the frames of a series."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(series_folder.iterdir())
    slices = [pydicom.dcmread(str(f)) for f in files]
    ds = slices[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slices)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    out.mkdir(parents=True)
    ds.save_as(str(out / "enhanced.dcm"), enforce_file_format=True)
    return out / "enhanced.dcm"


@pytest.mark.parametrize("kind", ["multi-frame", "MR"])
def test_a_dicom_object_that_is_not_a_ct_series_of_slices_is_refused(tmp_path, dicom_series_writer, kind):
    """An Enhanced CT (multi-frame) file alone in a folder was read as a volume off its grid and trained /
    segmented with exit 0; an MR series was read as CT. Both are refused, naming the file and why."""
    import pydicom

    vol = ct_volume((32, 32, 8))[0]
    if kind == "multi-frame":
        dicom_series_writer(tmp_path / "classic", vol)
        bad = _enhanced_ct(tmp_path / "classic", tmp_path / "data" / "case0")
        why = ["a multi-frame DICOM object (8 frames, Enhanced CT Image Storage)", "off its grid", "dcm2niix"]
    else:
        dicom_series_writer(tmp_path / "data" / "case0", vol)
        for f in (tmp_path / "data" / "case0").iterdir():
            ds = pydicom.dcmread(str(f))
            ds.Modality = "MR"
            ds.save_as(str(f))
        bad = sorted((tmp_path / "data" / "case0").iterdir())[0]
        why = ["Modality MR is not CT", "not read"]
    res = _pretrain(tmp_path / "data", tmp_path / "run", "data.format=folder")
    msg = assert_clean_error(res, *why)
    assert str(bad.parent) in msg
    assert_nothing_complete(tmp_path / "run")


def test_label_of_another_shape_is_caught_before_training(tmp_path):
    dl = dataset_with(tmp_path / "data", bad_label=ct_volume((48, 48, 40))[1])
    res = _finetune(dl, tmp_path / "run")
    lab = tmp_path / "data" / "labelsTr" / "c1.nii.gz"
    assert_clean_error(
        res,
        lab,
        "label shape (48, 48, 40) differs from the image's (48, 48, 48)",
        tmp_path / "data" / "imagesTr" / "c1.nii.gz",
        "nothing was trained",
    )
    assert "epoch" not in res.stdout
    assert_nothing_complete(tmp_path / "run")


def test_label_with_the_same_shape_but_other_geometry(tmp_path):
    dl = dataset_with(tmp_path / "data", bad_label=ct_volume()[1], origin=(0.0, 0.0, 30.0))
    res = _finetune(dl, tmp_path / "run")
    assert_clean_error(
        res, tmp_path / "data" / "labelsTr" / "c1.nii.gz", "label geometry differs", "30 mm", "voxel grid"
    )
    assert "epoch" not in res.stdout
    assert_nothing_complete(tmp_path / "run")


def test_label_with_non_integer_values(tmp_path):
    lab = ct_volume()[1].astype(np.float32)
    lab[lab == 1] = 0.5  # a label map resampled with linear interpolation
    dl = dataset_with(tmp_path / "data", bad_label=lab)
    res = _finetune(dl, tmp_path / "run")
    assert_clean_error(res, tmp_path / "data" / "labelsTr" / "c1.nii.gz", "not integers", "0.5")
    assert_nothing_complete(tmp_path / "run")


def test_label_values_above_the_configured_classes(tmp_path):
    lab = ct_volume()[1]
    lab[lab == 2] = 7
    dl = dataset_with(tmp_path / "data", bad_label=lab, case="c2")  # the validation case: found after epoch 1
    res = _finetune(dl, tmp_path / "run")  # finetune.num_classes=3
    assert_clean_error(res, tmp_path / "data" / "labelsTr" / "c2.nii.gz", "label values 7", "finetune.num_classes=3")
    assert_nothing_complete(tmp_path / "run")  # the epoch trained before the validation is not saved


def test_nan_and_infinite_intensities(tmp_path):
    img = ct_volume()[0].astype(np.float32)
    img[10, 10, 10] = np.nan
    img[20, 20, 20] = np.inf
    img[21, 20, 20] = -np.inf
    dl = dataset_with(tmp_path / "data", bad_image=img)
    res = _pretrain(dl, tmp_path / "run", "data.num_workers=1")  # raised in a loader worker, re-raised here
    msg = assert_clean_error(res, tmp_path / "data" / "imagesTr" / "c1.nii.gz", "1 NaN and 2 infinite voxel(s)")
    assert "worker" not in msg
    assert_nothing_complete(tmp_path / "run")


def test_constant_image(tmp_path):
    dl = dataset_with(tmp_path / "data", bad_image=np.full((48, 48, 48), 40, np.int16))
    res = _pretrain(dl, tmp_path / "run")
    assert_clean_error(res, tmp_path / "data" / "imagesTr" / "c1.nii.gz", "constant image", "every voxel is 40")
    assert_nothing_complete(tmp_path / "run")


def test_scan_smaller_than_the_roi_in_one_axis_is_padded_and_trains(pretrain_run, good_data):
    run_dir, res = pretrain_run
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run_dir / "final.pt").is_file() and (run_dir / "last.pt").is_file()
    assert "Traceback" not in res.stdout + res.stderr
    check = medhpm("data", "check", good_data, "--roi", "32", "--spacing", "4")
    assert check.returncode == 0, check.stdout + check.stderr
    thin = [line for line in check.stdout.splitlines() if line.startswith("WARNING")]
    assert len(thin) == 1 and "thin/imagesTr/c0.nii.gz" in thin[0], check.stdout
    assert "(z 6 < 32): it will be padded" in thin[0]  # z only: x and y (36 voxels) fit the ROI
    assert "OK: all 3 cases usable, 1 warning(s)" in check.stdout


def test_2d_image_is_caught_before_training(tmp_path):
    dl = dataset_with(tmp_path / "data", bad_image=ct_volume()[0][:, :, 20])
    res = _pretrain(dl, tmp_path / "run")
    assert_clean_error(
        res,
        tmp_path / "data" / "imagesTr" / "c1.nii.gz",
        "2D image (48, 48)",
        "needs a 3D CT volume",
        "nothing was trained",
    )
    assert "epoch" not in res.stdout
    assert_nothing_complete(tmp_path / "run")


def test_4d_image_is_caught_before_training(tmp_path):
    img = ct_volume()[0]
    dl = dataset_with(tmp_path / "data", bad_image=np.stack([img, img], axis=-1))
    res = _pretrain(dl, tmp_path / "run")
    assert_clean_error(
        res,
        tmp_path / "data" / "imagesTr" / "c1.nii.gz",
        "4D image (48, 48, 48, 2)",
        "2 volumes",
        "nothing was trained",
    )
    assert "epoch" not in res.stdout
    assert_nothing_complete(tmp_path / "run")


def test_empty_datalist(tmp_path):
    dl = write_datalist(tmp_path / "data", [])
    res = _pretrain(dl, tmp_path / "run")
    assert_clean_error(res, dl, "no training cases")
    assert_nothing_complete(tmp_path / "run")


def test_datalist_paths_that_escape_its_folder(tmp_path):
    write_cases(tmp_path / "outside", 1)
    dl = write_datalist(
        tmp_path / "data", [{"image": "../outside/imagesTr/c0.nii.gz", "label": "../outside/labelsTr/c0.nii.gz"}]
    )
    res = _pretrain(dl, tmp_path / "run")
    assert_clean_error(
        res, dl, "lead out of the datalist's folder", "training[0].image", "'../outside/imagesTr/c0.nii.gz'"
    )
    assert_nothing_complete(tmp_path / "run")


# ----------------------------------------------------------------------- data check: every fault at once
ZOO = {
    # case: (what it holds, fragment of the ERROR line)
    "missing": ("an image path that does not exist", "image file does not exist"),
    "truncated": ("a .nii.gz cut in half", "unreadable"),
    "shape": ("a label of another shape", "label shape (48, 48, 40) differs from the image's (48, 48, 48)"),
    "geometry": ("a label 30 mm off the image's grid", "label geometry differs from the image's"),
    "nonint": ("label values 0.5", "label voxel(s) are not integers (e.g. 0.5)"),
    "overclass": ("label value 7 with 3 classes", "label values 7 exceed the 3 classes (0-2)"),
    "nan": ("NaN and infinite intensities", "1 NaN and 1 infinite voxel(s)"),
    "constant": ("a constant image", "constant image (every voxel is 40)"),
    "flat": ("a 2D image", "2D image (48, 48)"),
    "multi": ("a 4D image", "4D image (48, 48, 48, 2) with 2 volumes"),
}


@pytest.fixture(scope="module")
def zoo_check(tmp_path_factory):
    """One ``medhpm data check`` over a datalist with one bad case per fault (and one good case)."""
    root = tmp_path_factory.mktemp("zoo")
    img, lab = ct_volume()
    entries = []

    def case(name, image=img, label=lab, **kw):
        i = write_nifti(root / "imagesTr" / f"{name}.nii.gz", image)
        lb = write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, **kw)
        entries.append({"image": str(i.relative_to(root)), "label": str(lb.relative_to(root)), "case": name})

    case("good")
    entries.append({"image": "imagesTr/missing.nii.gz", "case": "missing"})
    case("truncated")
    truncate(root / "imagesTr" / "truncated.nii.gz")
    case("shape", label=ct_volume((48, 48, 40))[1])
    case("geometry", origin=(0.0, 0.0, 30.0))
    nonint = lab.astype(np.float32)
    nonint[lab == 1] = 0.5
    case("nonint", label=nonint)
    over = lab.copy()
    over[lab == 2] = 7
    case("overclass", label=over)
    nan = img.astype(np.float32)
    nan[5, 5, 5], nan[6, 6, 6] = np.nan, np.inf
    case("nan", image=nan)
    case("constant", image=np.full(img.shape, 40, np.int16))
    flat = write_nifti(root / "imagesTr" / "flat.nii.gz", img[:, :, 10])
    entries.append({"image": str(flat.relative_to(root)), "case": "flat"})
    multi = write_nifti(root / "imagesTr" / "multi.nii.gz", np.stack([img, img], axis=-1))
    entries.append({"image": str(multi.relative_to(root)), "case": "multi"})
    dl = write_datalist(root, entries, labels={"0": "background", "1": "organ", "2": "bone", "7": "extra"})
    res = medhpm(
        "data", "check", dl, "--num-classes", "3", "--roi", "32", "--spacing", "4", "--json", root / "report.json"
    )
    return root, res


def test_data_check_fails_listing_every_bad_case_and_no_good_one(zoo_check):
    root, res = zoo_check
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert f"NOT OK: {len(ZOO)} of {len(ZOO) + 1} cases unusable" in res.stdout
    assert "training/good" not in res.stdout
    assert (root / "report.json").is_file()


@pytest.mark.parametrize("case", sorted(ZOO))
def test_data_check_names_the_file_and_the_problem(zoo_check, case):
    root, res = zoo_check
    lines = [line for line in res.stdout.splitlines() if line.startswith(f"ERROR   training/{case}: ")]
    assert lines, f"no error reported for {ZOO[case][0]}:\n{res.stdout}"
    assert any(ZOO[case][1] in line for line in lines), "\n".join(lines)
    assert all(str(root) in line for line in lines)  # the file, by its full path


# ============================================================================================ config faults
def test_config_file_with_an_unknown_key(tmp_path, good_data):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("name: mine\npretrain:\n  epocs: 3\n")
    res = medhpm("pretrain", "--config", cfg, *tiny(good_data), "--out", tmp_path / "run")
    assert_clean_error(res, "unknown config key 'pretrain.epocs'", cfg, "Did you mean 'pretrain.epochs'?")
    assert not (tmp_path / "run").exists()


def test_config_value_of_the_wrong_type(tmp_path, good_data):
    res = _pretrain(good_data, tmp_path / "run", "pretrain.epochs=ten")
    assert_clean_error(res, "config key 'pretrain.epochs'", "pretrain.epochs=ten")
    assert not (tmp_path / "run").exists()


def test_config_width_not_divisible_by_the_heads(tmp_path, good_data):
    res = _pretrain(good_data, tmp_path / "run", "model.decoder_dim=30")
    assert_clean_error(res, "config key 'model.decoder_heads'", "width 30 is not divisible by 4 heads")
    assert not (tmp_path / "run").exists()


def test_config_roi_not_divisible_by_the_patch(tmp_path, good_data):
    res = _pretrain(good_data, tmp_path / "run", "data.roi=[40,40,40]")
    assert_clean_error(res, "config key 'data.roi'", "(40, 40, 40) is not divisible by the patch size 16")
    assert not (tmp_path / "run").exists()


def test_config_mask_ratio_outside_0_1(tmp_path, good_data):
    res = _pretrain(good_data, tmp_path / "run", "pretrain.mask_ratio=1.0")
    assert_clean_error(res, "config key 'pretrain.mask_ratio'", "1.0 is out of range: must lie in (0, 1)")
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, good_data):
    res = medhpm("--debug", "pretrain", *tiny(good_data, "pretrain.mask_ratio=1.0"), "--out", tmp_path / "run")
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "ConfigError: config key 'pretrain.mask_ratio'" in res.stderr
