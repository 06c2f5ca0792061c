"""The transform chains (docs/method.md, the recipe table) on tiny synthetic CT volumes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from medhpm.config import DataConfig
from medhpm.data.transforms import (
    predict_transforms,
    pretrain_transforms,
    train_transforms,
    transforms_from_spec,
    transforms_spec,
    val_transforms,
)

SHAPE = (40, 40, 24)  # at 1.5 x 1.5 x 2.0 mm


def small_cfg(**kw) -> DataConfig:
    base = dict(spacing=(1.5, 1.5, 2.0), roi=(16, 16, 16), num_samples=3)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def case(tmp_path, ct_case_writer):
    img, lab = ct_case_writer(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", SHAPE, seed=3)
    return {"image": str(img), "label": str(lab), "case": "img"}


def test_train_chain_gives_num_samples_roi_crops(case):
    cfg = small_cfg()
    t = train_transforms(cfg)
    t.set_random_state(0)
    out = t(case)
    assert isinstance(out, list) and len(out) == cfg.num_samples
    for crop in out:
        assert crop["image"].shape == (1, *cfg.roi) and crop["label"].shape == (1, *cfg.roi)
        assert crop["image"].dtype == torch.float32 and crop["label"].dtype == torch.float32
        assert set(torch.unique(crop["label"]).tolist()) <= {0.0, 1.0, 2.0}


def test_positive_crops_are_centred_on_the_label(case):
    cfg = small_cfg(pos=1.0, neg=0.0, num_samples=4, roi=(8, 8, 8), flip_prob=0.0, rot90_prob=0.0)
    t = train_transforms(cfg)
    t.set_random_state(1)
    for crop in t(case):
        centre = crop["label"][0, 4, 4, 4]
        assert centre > 0  # every crop centre on a labelled voxel
    # random crops ignore the label: over many crops of this mostly-background volume, some miss it
    t = train_transforms(dataclasses.replace(cfg, crop="random", num_samples=16))
    t.set_random_state(1)
    assert any(crop["label"][0, 4, 4, 4] == 0 for crop in t(case))


def test_scan_smaller_than_roi_is_padded(case):
    cfg = small_cfg(roi=(48, 48, 32), num_samples=2)
    for crop in train_transforms(cfg)(case):
        assert crop["image"].shape == (1, 48, 48, 32)
    v = val_transforms(cfg)(case)
    assert tuple(v["image"].shape[1:]) == (48, 48, 32) == tuple(v["label"].shape[1:])
    # the padding is air (0 after scaling) and background
    assert v["image"][0, 0, 0, 0] == 0 and v["label"][0, 0, 0, 0] == 0


def test_val_chain_is_deterministic_and_applies_the_recipe(case, nifti_writer, synthetic_ct, tmp_path):
    cfg = small_cfg(spacing=(3.0, 3.0, 4.0), crop_foreground=False, roi=(8, 8, 8))
    t = val_transforms(cfg)
    a, b = t(case), t(case)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    img = a["image"]
    # spacing and orientation of the output: (3, 3, 4) mm, RAS (positive diagonal)
    aff = np.asarray(img.affine)
    assert np.allclose(np.diag(aff)[:3], [3.0, 3.0, 4.0])
    assert tuple(img.shape[1:]) == (20, 20, 12)
    # HU window [-175, 250] -> [0, 1], clipped: air is 0, bone (700 HU) is 1
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    lab = a["label"]
    assert torch.all(img[lab == 2] > 0.95) and torch.all(img[lab == 0].min() == 0)

    # an LPS-stored scan comes out in RAS with the same content
    arr, labarr = synthetic_ct(SHAPE, seed=3)
    lps = np.diag([-1.5, -1.5, 2.0, 1.0])
    lps[:3, 3] = [1.5 * 39, 1.5 * 39, 0.0]  # same voxel centres as the RAS file, axes flipped
    nifti_writer(tmp_path / "lps_img.nii.gz", arr[::-1, ::-1].copy(), affine=lps)
    nifti_writer(tmp_path / "lps_lab.nii.gz", labarr[::-1, ::-1].copy(), affine=lps)
    c = t({"image": str(tmp_path / "lps_img.nii.gz"), "label": str(tmp_path / "lps_lab.nii.gz")})
    assert np.allclose(np.asarray(c["image"].affine), aff)
    assert torch.allclose(c["image"], img, atol=1e-5) and torch.equal(c["label"], lab)


def test_crop_foreground_removes_air(case):
    with_crop = val_transforms(small_cfg(crop_foreground=True))(case)
    without = val_transforms(small_cfg(crop_foreground=False))(case)
    assert with_crop["image"].numel() < without["image"].numel()
    assert with_crop["label"].sum() == without["label"].sum()  # no label voxel lost


def test_label_read_as_integer_values(tmp_path, nifti_writer, synthetic_ct):
    img, lab = synthetic_ct(SHAPE, seed=1)
    noisy = lab.astype(np.float32) - 1e-4 * (lab > 0)  # e.g. a float label with a rounding error
    nifti_writer(tmp_path / "i.nii.gz", img)
    nifti_writer(tmp_path / "l.nii.gz", noisy)
    v = val_transforms(small_cfg(crop_foreground=False))(
        {"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")}
    )
    assert set(torch.unique(v["label"]).tolist()) == {0.0, 1.0, 2.0}
    assert int((v["label"] == 1).sum()) == int((lab == 1).sum())


def test_transforms_spec_round_trip_gives_identical_val_outputs(case):
    cfg = small_cfg(spacing=(2.0, 2.0, 3.0), a_min=-100.0, a_max=300.0, b_min=-1.0, roi=(8, 8, 8))
    spec = json.loads(json.dumps(transforms_spec(cfg)))  # as stored in a checkpoint
    assert spec["version"] == 1
    ref = val_transforms(cfg)(case)
    again = transforms_from_spec(spec, "val")(case)
    assert torch.equal(ref["image"], again["image"]) and torch.equal(ref["label"], again["label"])
    assert np.allclose(np.asarray(ref["image"].affine), np.asarray(again["image"].affine))
    # the spec carries the values: the default chain would give something else
    default = val_transforms(small_cfg(roi=(8, 8, 8)))(case)
    assert default["image"].shape != ref["image"].shape
    assert float(ref["image"].min()) == -1.0  # b_min travelled through the spec
    with pytest.raises(ValueError, match="version"):
        transforms_from_spec({**spec, "version": 99}, "val")
    with pytest.raises(ValueError, match="unknown transform chain"):
        transforms_from_spec(spec, "nonsense")


def test_pretrain_chains(case):
    cfg = small_cfg(num_samples=2)
    out = pretrain_transforms(cfg, labelled=False)({"image": case["image"], "case": "img"})
    assert len(out) == 2 and all(o["image"].shape == (1, *cfg.roi) for o in out)
    assert all("label" not in o for o in out)
    out = pretrain_transforms(cfg, labelled=True)(case)
    assert len(out) == 2 and all(o["label"].shape == (1, *cfg.roi) for o in out)


def test_predict_chain_inverts_to_the_original_grid(case):
    import nibabel as nib

    cfg = small_cfg(spacing=(1.0, 1.0, 1.5))  # resampling, cropping and padding all happen
    t = predict_transforms(cfg)
    x = t({"image": case["image"]})
    assert "label" not in x
    # stand-in for a model: the label map resampled by the same chain (nearest), as a prediction
    lab_chain = val_transforms(cfg)(case)
    x["pred"] = lab_chain["label"]
    inv = Invertd("pred", transform=t, orig_keys="image", nearest_interp=True)(x)
    pred = np.asarray(inv["pred"][0])
    ref = nib.load(case["label"])
    assert pred.shape == ref.shape
    assert np.allclose(np.asarray(inv["pred"].affine), ref.affine, atol=1e-4)
    truth = np.asarray(ref.dataobj)
    for v in (1, 2):
        dice = 2 * np.sum((pred == v) & (truth == v)) / (np.sum(pred == v) + np.sum(truth == v))
        assert dice > 0.9, (v, dice)


def test_rot90_needs_square_axial_roi():
    with pytest.raises(ValueError, match="rot90"):
        train_transforms(small_cfg(roi=(16, 32, 16)))
    train_transforms(small_cfg(roi=(16, 32, 16), rot90_prob=0.0))  # fine without rotations


def _is_window_of(crop: np.ndarray, volume: np.ndarray) -> bool:
    """True if ``crop`` equals ``volume[i:i+a, j:j+b, k:k+c]`` for some offset (a plain search)."""
    a, b, c = crop.shape
    for i in range(volume.shape[0] - a + 1):
        for j in range(volume.shape[1] - b + 1):
            for k in range(volume.shape[2] - c + 1):
                if np.array_equal(volume[i : i + a, j : j + b, k : k + c], crop):
                    return True
    return False


def test_pretraining_augments_with_crops_and_flips_only(case):
    """As the paper and SelfMedMAE: even with rotations and intensity changes switched on for every crop,
    a pre-training crop is an unchanged window of the preprocessed volume; a fine-tuning crop is not."""
    cfg = small_cfg(
        crop="random",
        roi=(12, 12, 12),
        num_samples=4,
        flip_prob=0.0,
        rot90_prob=1.0,
        intensity_scale_prob=1.0,
        intensity_shift_prob=1.0,
    )
    volume = predict_transforms(cfg)({"image": case["image"]})["image"][0].numpy()
    t = pretrain_transforms(cfg, labelled=False)
    t.set_random_state(0)
    assert all(_is_window_of(crop["image"][0].numpy(), volume) for crop in t(case))
    t = train_transforms(cfg)
    t.set_random_state(0)
    assert not any(_is_window_of(crop["image"][0].numpy(), volume) for crop in t(case))
