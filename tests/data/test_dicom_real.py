"""DICOM series loading: the real abdominal CT of tests/data/real_ct and series written by the tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.transforms import Invertd

from medhpm.config import DataConfig
from medhpm.data.check import check_dataset
from medhpm.data.datalist import DataError
from medhpm.data.ct_reader import load_image, read_volume
from medhpm.data.transforms import val_transforms

# label values present in the real fixture (README of tests/data/real_ct)
PRESENT = (1, 6, 7, 8, 9, 10, 11, 12)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


@pytest.fixture(scope="module")
def real_loaded():
    from pathlib import Path

    base = Path(__file__).parent / "real_ct" / "abdomen_dicom"
    if not (base / "labels_btcv13.nii.gz").exists():
        pytest.skip("tests/data/real_ct/abdomen_dicom is missing")
    img = load_image(base / "dicom", orientation="RAS")
    lab = load_image(base / "labels_btcv13.nii.gz", orientation="RAS")
    return img, lab


def test_real_series_geometry_matches_its_label_map(real_loaded):
    (img, iaff, meta), (lab, laff, _) = real_loaded
    assert img.shape == lab.shape == (512, 512, 20)
    assert np.max(np.abs(iaff - laff)) < 1e-3
    # README: 0.977 x 0.977 mm pixels, 2.0 mm slices, HU about [-1024, 1839]
    assert np.allclose(np.sqrt((iaff[:3, :3] ** 2).sum(0)), [0.977, 0.977, 2.0], atol=1e-3)
    assert img.min() == pytest.approx(-1024, abs=1) and img.max() == pytest.approx(1839, abs=1)


def test_real_series_intensities_inside_organs(real_loaded):
    (img, _, _), (lab, _, _) = real_loaded
    assert set(np.unique(lab).astype(int)) == {0, *PRESENT}
    liver = float(img[lab == 6].mean())
    assert 60 < liver < 120, liver
    assert 40 < float(img[lab == 1].mean()) < 120  # spleen
    assert float(img[lab == 8].mean()) > 120  # contrast-filled aorta


def test_real_label_survives_the_chain_and_its_inverse(real_abdomen_dicom):
    import nibabel as nib

    dicom, labels = real_abdomen_dicom
    # 1 mm in-plane keeps the small structures (adrenal: 1254 voxels) so that any loss is a geometry error
    cfg = DataConfig(spacing=(1.0, 1.0, 2.0), roi=(32, 32, 16))
    chain = val_transforms(cfg)  # Orientationd RAS, Spacingd (nearest for the label), crop, pad
    d = chain({"image": str(dicom), "label": str(labels)})
    assert np.allclose(np.asarray(d["image"].affine), np.asarray(d["label"].affine), atol=1e-3)
    assert d["image"].shape == d["label"].shape
    truth = np.asarray(nib.load(str(labels)).dataobj)
    # back through the image's operations, as the predictor maps a prediction to the scan
    x = {**d, "pred": d["label"].clone()}
    inv = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True)(x)
    back = np.asarray(inv["pred"][0]).round().astype(int)
    assert back.shape == truth.shape
    assert np.allclose(np.asarray(inv["pred"].affine), nib.load(str(labels)).affine, atol=1e-3)
    for v in PRESENT:
        assert dice(back == v, truth == v) >= 0.95, v


def test_real_label_round_trip_at_the_protocol_spacing(real_abdomen_dicom):
    import nibabel as nib
    from monai.transforms import Compose, Orientationd, Spacingd

    from medhpm.data.ct_reader import LoadCTd

    _, labels = real_abdomen_dicom
    chain = Compose(
        [
            LoadCTd("label"),
            Orientationd("label", axcodes="RAS", labels=None),
            Spacingd("label", pixdim=(1.5, 1.5, 2.0), mode="nearest"),
        ]
    )
    d = chain({"label": str(labels)})
    d["pred"] = d["label"].clone()
    back = np.asarray(Invertd("pred", transform=chain, orig_keys="label", nearest_interp=True)(d)["pred"][0])
    truth = np.asarray(nib.load(str(labels)).dataobj)
    for v in PRESENT:
        big = np.sum(truth == v) > 10000
        # nearest resampling to 1.5 mm and back costs thin structures a few percent; a flip costs all
        assert dice(back == v, truth == v) >= (0.95 if big else 0.9), v


# --------------------------------------------------------------------------------------------------
# Series written by the tests (uncompressed)


def test_written_series_loads_in_spatial_order_with_exact_geometry(tmp_path, dicom_series_writer, synthetic_ct):
    vol, _ = synthetic_ct((20, 16, 6), seed=0)
    sx, sy, sz = 0.8, 0.7, 2.5
    x0, y0, z0 = -20.0, -30.0, 100.0
    # InstanceNumbers scrambled: the stack must follow the positions, not the numbers
    folder = dicom_series_writer(tmp_path / "s", vol, (sx, sy, sz), (x0, y0, z0), instance_numbers=[4, 1, 6, 2, 5, 3])
    arr, aff, _ = load_image(folder)
    assert arr.shape == vol.shape
    np.testing.assert_allclose(arr, vol, atol=0.5)
    # LPS position origin + (i*sx, j*sy, k*sz) -> RAS: x and y negated
    expected = np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(aff, expected, atol=1e-4)


def test_two_series_in_one_folder_is_an_error_naming_both(tmp_path, dicom_series_writer, synthetic_ct):
    vol, _ = synthetic_ct((12, 10, 4), seed=0)
    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"
    dicom_series_writer(tmp_path / "mixed", vol, series_uid=uid_a)
    dicom_series_writer(tmp_path / "mixed", vol, series_uid=uid_b, origin=(-20.0, -30.0, 300.0))
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "mixed")
    msg = str(e.value)
    assert uid_a in msg and uid_b in msg and str(tmp_path / "mixed") in msg
    # the training chain refuses it too (the message is on the cause MONAI's Compose chains)
    chain = val_transforms(DataConfig(roi=(16, 16, 16)))
    with pytest.raises(Exception) as e2:
        chain({"image": str(tmp_path / "mixed"), "label": str(tmp_path / "mixed")})
    causes, exc = [], e2.value
    while exc is not None:
        causes.append(str(exc))
        exc = exc.__cause__
    assert any(uid_a in c and uid_b in c for c in causes)
    # and the data check reports it for the case
    js = tmp_path / "list.json"
    js.write_text(json.dumps({"training": [{"image": "mixed"}]}))
    rep = check_dataset(js, roi=(8, 8, 4))
    assert not rep.ok and uid_a in rep.errors[0].problem


def test_missing_slice_is_an_error(tmp_path, dicom_series_writer, synthetic_ct):
    vol, _ = synthetic_ct((12, 10, 6), seed=0)
    folder = dicom_series_writer(tmp_path / "gap", vol)
    sorted(folder.iterdir())[2].unlink()
    with pytest.raises(DataError, match="uneven slice spacing"):
        load_image(folder)


def test_single_slice_series_is_2d_error(tmp_path, dicom_series_writer, synthetic_ct):
    vol, _ = synthetic_ct((12, 10, 1), seed=0)
    folder = dicom_series_writer(tmp_path / "one", vol)
    with pytest.raises(DataError, match="2D"):
        read_volume(folder)


def test_written_series_passes_the_check_in_a_folder_with_nifti(
    tmp_path, dicom_series_writer, synthetic_ct, nifti_writer
):
    vol, _ = synthetic_ct((24, 24, 10), seed=1)
    dicom_series_writer(tmp_path / "scans" / "series1", vol)
    nifti_writer(tmp_path / "scans" / "vol.nii.gz", vol)
    rep = check_dataset(tmp_path / "scans", roi=(8, 8, 8))
    assert rep.ok, rep.format()
    assert rep.summary["cases"]["training"] == 2
    assert rep.summary["spacing_mm"]["min"] == pytest.approx([0.8, 0.8, 2.0])  # DICOM 0.8 x 0.8 x 2.5
    assert rep.summary["spacing_mm"]["max"] == pytest.approx([1.5, 1.5, 2.5])  # NIfTI 1.5 x 1.5 x 2.0
