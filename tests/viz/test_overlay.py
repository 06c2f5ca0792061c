"""Overlay figure: a PNG of sensible size, organ colours in the pixels, radiological orientation, aspect."""

from __future__ import annotations

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from medhpm.viz.overlay import label_color, segmentation_figure, segmentation_figure_from_files

SHAPE = (40, 36, 12)  # (X, Y, Z) in RAS voxel order: X towards patient right, Y anterior, Z superior


def _phantom():
    img = np.full(SHAPE, -1000.0, np.float32)
    img[4:36, 4:32, :] = 0.0  # body
    lab = np.zeros(SHAPE, np.uint8)
    lab[26:36, 8:20, 2:10] = 6  # liver on the patient's RIGHT (high X)
    lab[5:11, 10:16, 3:8] = 1  # spleen on the patient's LEFT (low X)
    lab[16:22, 26:31, 4:7] = 7  # stomach ANTERIOR (high Y)
    img[lab > 0] = 80.0
    return img, lab


def _pixels(png, rgb, tol=0.02, top_fraction=1.0):
    im = mpimg.imread(str(png))[..., :3]
    im = im[: int(im.shape[0] * top_fraction)]
    return np.argwhere(np.all(np.abs(im - np.asarray(rgb)) < tol, axis=-1))  # (row, col) pairs


def test_png_written_with_label_colours(tmp_path):
    img, lab = _phantom()
    pred = lab.copy()
    pred[pred == 1] = 0
    out = segmentation_figure(img, lab, pred, (1.0, 1.0, 3.0), tmp_path / "fig.png", title="t", alpha=1.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    im = mpimg.imread(str(out))
    h, w = im.shape[:2]
    assert 500 <= w <= 1200 and 500 <= h <= 2500, (h, w)
    liver, spleen = label_color(6), label_color(1)
    assert len(_pixels(out, liver)) > 1000  # filled in both GT and prediction panels, several rows
    assert len(_pixels(out, spleen)) > 100
    assert len(_pixels(out, label_color(3))) == 0  # left kidney is nowhere: its colour must not appear
    assert len({label_color(v) for v in range(1, 14)}) == 13  # 13 BTCV organs, 13 distinct colours


def test_radiological_orientation_and_aspect(tmp_path):
    img, lab = _phantom()
    out = segmentation_figure(
        img, lab, None, (1.0, 1.0, 3.0), tmp_path / "ax.png", slices=[5], coronal=False, alpha=1.0
    )
    top = 0.7  # the legend (same colours) sits at the bottom: look above it
    liver = _pixels(out, label_color(6), top_fraction=top)
    spleen = _pixels(out, label_color(1), top_fraction=top)
    stomach = _pixels(out, label_color(7), top_fraction=top)
    assert len(liver) and len(spleen) and len(stomach)
    # patient right (liver) on the image's left, patient left (spleen) on the right; anterior (stomach) on top
    assert liver[:, 1].mean() < spleen[:, 1].mean()
    assert stomach[:, 0].mean() < liver[:, 0].mean()

    # a 10 x 10 voxel square drawn with spacing 1 x 2 mm must come out twice as tall as wide
    sq = np.zeros((30, 30, 3), np.uint8)
    sq[10:20, 10:20, 1] = 2
    out2 = segmentation_figure(
        np.zeros(sq.shape), sq, None, (1.0, 2.0, 1.0), tmp_path / "sq.png", slices=[1], coronal=False, alpha=1.0
    )
    px = _pixels(out2, label_color(2), top_fraction=0.75)
    height = np.ptp(px[:, 0]) + 1
    width = np.ptp(px[:, 1]) + 1
    assert height / width == pytest.approx(2.0, rel=0.15)


def test_classes_spec_limits_drawn_labels(tmp_path):
    img, lab = _phantom()
    out = segmentation_figure(img, lab, lab, (1.0, 1.0, 3.0), tmp_path / "l.png", classes="liver=6", alpha=1.0)
    assert len(_pixels(out, label_color(6))) > 1000
    assert len(_pixels(out, label_color(1))) == 0 and len(_pixels(out, label_color(7))) == 0


def _save(arr, path, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def test_from_files_reorients_lps_to_the_same_figure(tmp_path):
    img, lab = _phantom()
    ras = np.diag([1.0, 1.0, 3.0, 1.0])
    # the same patient stored LPS (x and y flipped), as DICOM converters write it
    lps = np.diag([-1.0, -1.0, 3.0, 1.0])
    lps[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    kw = dict(slices=[5], coronal=True, alpha=0.6)
    a = segmentation_figure_from_files(
        _save(img, tmp_path / "i_ras.nii.gz", ras),
        _save(lab, tmp_path / "l_ras.nii.gz", ras),
        None,
        tmp_path / "ras.png",
        **kw,
    )
    b = segmentation_figure_from_files(
        _save(img[::-1, ::-1].copy(), tmp_path / "i_lps.nii.gz", lps),
        _save(lab[::-1, ::-1].copy(), tmp_path / "l_lps.nii.gz", lps),
        None,
        tmp_path / "lps.png",
        **kw,
    )
    assert np.array_equal(mpimg.imread(str(a)), mpimg.imread(str(b)))


def test_from_files_shape_mismatch_names_files(tmp_path):
    img, lab = _phantom()
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    i = _save(img, tmp_path / "ct.nii.gz", aff)
    p = _save(lab[:, :, :10].copy(), tmp_path / "pred.nii.gz", aff)
    with pytest.raises(ValueError) as e:
        segmentation_figure_from_files(i, None, p, tmp_path / "x.png")
    assert str(i) in str(e.value) and str(p) in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments(tmp_path):
    img, lab = _phantom()
    with pytest.raises(ValueError, match="shape"):
        segmentation_figure(img, lab[:-1], None, (1, 1, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="slice 99"):
        segmentation_figure(img, lab, None, (1, 1, 3), tmp_path / "x.png", slices=[99])
    with pytest.raises(ValueError, match="window"):
        segmentation_figure(img, lab, None, (1, 1, 3), tmp_path / "x.png", window=(250, -175))


def test_a_dicom_series_is_drawn_under_its_label_map(real_abdomen_dicom, tmp_path):
    """`visualize segmentation --image` takes a DICOM series folder, as predict does: the real series and its
    label map (LPS NIfTI on the series' grid) must land on one RAS grid, where the labels cover the organs'
    intensities (README of tests/data/real_ct: liver about 89 HU, aorta about 177 HU)."""
    from medhpm.viz.overlay import _load_canonical

    folder, labels = real_abdomen_dicom
    png = segmentation_figure_from_files(folder, labels, None, tmp_path / "real.png", slices=[10])
    assert mpimg.imread(str(png)).shape[0] > 100
    image, a = _load_canonical(folder, "image")
    lab, b = _load_canonical(labels, "ground truth")
    assert image.shape == lab.shape and np.abs(a - b).max() < 1e-3
    assert 75 < image[lab == 6].mean() < 105 and 150 < image[lab == 8].mean() < 205
    # a flipped image would put the aorta label elsewhere: the check above is not met by chance
    assert not 150 < image[::-1][lab == 8].mean() < 205


def test_an_image_that_is_not_a_scan_is_refused_with_a_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable NIfTI image .*DICOM series folder"):
        segmentation_figure_from_files(tmp_path / "notes.txt", None, None, tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is a folder without DICOM files"):
        segmentation_figure_from_files(tmp_path / "empty", None, None, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
