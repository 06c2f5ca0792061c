"""DICOM-SEG of a prediction (highdicom), read back with highdicom: the segments on the source grid equal
the label map voxel for voxel, every frame points at its source slice, the series is referenced, and each
segment has its organ's name and code. The series is a phantom written here with pydicom."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medhpm.data.ct_reader import read_volume
from medhpm.data.dicom_seg import write_dicom_seg
from medhpm.data.labels import BTCV13, BTCV_LABELS, label_rgb
from medhpm.data.phantom import generate_case

SPACING = (0.9, 0.7, 2.5)  # x (between columns), y (between rows), z (between slices), mm
ORIGIN = (-20.0, -15.0, 100.0)  # LPS


def write_series(folder: Path, volume: np.ndarray) -> list[str]:
    """An axial CT series: voxel (i, j, k) at LPS ORIGIN + (i, j, k) * SPACING; slice k's pixels are
    volume[:, :, k].T (DICOM rows run along y). Returns the SOP instance UIDs, slice by slice."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        sop = meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
            "CT",
            "ph1",
            "Phantom^One",
            "",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20260101",
            "120000",
            "1",
            "",
            "",
        )
        ds.SeriesNumber, ds.InstanceNumber = 1, volume.shape[2] - k  # instance numbers run the other way
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SPACING[2]]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = SPACING[2]
        pix = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16)
        ds.Rows, ds.Columns = pix.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(pix).tobytes()
        ds.save_as(str(folder / f"{k:03d}.dcm"), enforce_file_format=True)
        uids.append(sop)
    return uids


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    case = generate_case(7, size=(40, 36, 10), spacing=SPACING, orientation="RAS")
    folder = tmp_path_factory.mktemp("dicom") / "series"
    uids = write_series(folder, case.image)
    return folder, uids, case.image, case.label


def _on_reader_grid(arr: np.ndarray, read: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``target`` laid out as medhpm's reader lays out ``arr`` (found among axis flips, checked unique)."""
    fits = [
        f
        for f in itertools.product([False, True], repeat=3)
        if np.array_equal(np.flip(arr, [a for a in range(3) if f[a]]), read)
    ]
    assert len(fits) == 1, fits
    return np.flip(target, [a for a in range(3) if fits[0][a]])


def _read_back(path: Path, uids: list[str]):
    seg = hd.seg.segread(str(path))
    numbers = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
    by_name = {**{name: v for v, name in BTCV13.items()}, **{name: v for v, name in BTCV_LABELS.items()}}
    value_of = {n: by_name[d.SegmentLabel] for n, d in numbers.items()}
    return seg, numbers, value_of


def assert_seg_equals_prediction(seg_path: Path, uids: list[str], folder: Path, image: np.ndarray, pred: np.ndarray):
    """The SEG read back, slice by slice of the source series, equals the NIfTI prediction ``pred`` of the
    series written from ``image`` into ``folder``."""
    seg, _, value_of = _read_back(seg_path, uids)
    # the NIfTI prediction laid out as the series: the inverse of the reader's flips
    as_series = _on_reader_grid(read_volume(folder).numpy()[0], image, pred)
    for k, uid in enumerate(uids):
        expected = as_series[:, :, k].T
        try:
            got = seg.get_pixels_by_source_instance([uid], combine_segments=True, relabel=False)[0]
        except Exception:
            got = np.zeros_like(expected)  # highdicom omits a frame without any segment
        back = np.zeros_like(expected)
        for n, v in value_of.items():
            back[got == n] = v
        np.testing.assert_array_equal(back, expected)


def test_seg_reads_back_as_the_label_map_with_each_frame_on_its_source_slice(phantom_series, tmp_path):
    folder, uids, image, label = phantom_series
    vol = read_volume(folder)
    grid_label = _on_reader_grid(image, vol.numpy()[0], label).astype(np.uint8)
    grid_label[grid_label == 5] = 0  # one organ missing from the prediction: no segment for it
    out = write_dicom_seg(grid_label, np.asarray(vol.meta["original_affine"]), folder, BTCV13, tmp_path / "s.dcm")

    seg, numbers, value_of = _read_back(out, uids)
    src = pydicom.dcmread(str(folder / "000.dcm"))
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.PatientID == "ph1" and seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    present = sorted(int(v) for v in np.unique(grid_label) if v)
    assert sorted(value_of.values()) == present and 5 not in value_of.values()
    for k, uid in enumerate(uids):  # the phantom's own label, slice k, as the series writer laid it out
        expected = label[:, :, k].T.copy()
        expected[expected == 5] = 0
        got = seg.get_pixels_by_source_instance([uid], combine_segments=True, relabel=False)[0]
        back = np.zeros_like(expected)
        for n, v in value_of.items():
            back[got == n] = v
        np.testing.assert_array_equal(back, expected)
    # every frame references one source slice, at that slice's position
    by_uid = {pydicom.dcmread(str(f)).SOPInstanceUID: pydicom.dcmread(str(f)) for f in sorted(folder.iterdir())}
    for fr in seg.PerFrameFunctionalGroupsSequence:
        ref = fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(x) for x in fr.PlanePositionSequence[0].ImagePositionPatient]
        assert ref in by_uid and np.allclose(pos, [float(x) for x in by_uid[ref].ImagePositionPatient])
    # names, SNOMED CT codes with laterality, the palette's colours
    for n, d in numbers.items():
        v = value_of[n]
        assert d.SegmentLabel == BTCV13[v] and d.SegmentAlgorithmType == "AUTOMATIC"
        rgb = hd.color.CIELabColor.from_dicom_value(d.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(rgb, label_rgb(v), atol=1)
        code = d.SegmentedPropertyTypeCodeSequence[0]
        if v == 2:  # right kidney: Kidney + Right
            assert (
                code.CodeValue == "64033007"
                and code.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
            )
        if v == 6:
            assert code.CodeValue == "10200004" and code.CodeMeaning == "Liver"


def test_a_label_map_off_the_series_grid_is_refused(phantom_series, tmp_path):
    folder, _, _, label = phantom_series
    vol = read_volume(folder)
    aff = np.asarray(vol.meta["original_affine"]).copy()
    aff[0, 3] += 0.3  # a third of a millimetre off
    with pytest.raises(Exception, match="does not lie on the prediction's voxel grid"):
        write_dicom_seg(np.ones(vol.shape[1:], np.uint8), aff, folder, BTCV13, tmp_path / "s.dcm")
    with pytest.raises(Exception, match="no organ"):
        write_dicom_seg(
            np.zeros(vol.shape[1:], np.uint8),
            np.asarray(vol.meta["original_affine"]),
            folder,
            BTCV13,
            tmp_path / "s.dcm",
        )
    assert not (tmp_path / "s.dcm").exists()


def test_output_types_are_writer_names_a_comma_list_or_both():
    """--output-type reads the writers' registry: a name, a comma list in any order (each writer once, in
    the registry's order: the label map's path is what a scan's line reports) or `both`; anything else is
    refused naming the entry and the choices."""
    from medhpm.segment.outputs import OUTPUT_WRITERS, output_types

    assert list(OUTPUT_WRITERS) == ["nifti", "dicom-seg"]
    assert output_types("nifti") == ("nifti",) and output_types("dicom-seg") == ("dicom-seg",)
    assert output_types("dicom-seg, nifti") == output_types("both") == ("nifti", "dicom-seg")
    assert output_types("nifti,nifti") == ("nifti",)
    for bad, named in (("nrrd", "'nrrd' is not one of them"), ("nifti,", "an empty entry"), ("", "an empty entry")):
        with pytest.raises(ValueError, match="--output-type") as e:
            output_types(bad)
        assert named in str(e.value) and "nifti, dicom-seg, both (= nifti,dicom-seg)" in str(e.value)


def test_predict_output_type_list_gives_a_seg_equal_to_the_nifti_prediction(phantom_series, tiny_checkpoint, tmp_path):
    """`--output-type dicom-seg,nifti` (the same as `both`): the label map, its colour tables and a SEG
    equal to it, and the scan's line reports the label map."""
    folder, uids, image, _ = phantom_series
    out = tmp_path / "pred"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tiny_checkpoint),
            "-i",
            str(folder),
            "-o",
            str(out),
            "--output-type",
            "dicom-seg,nifti",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert {"series.nii.gz", "series_seg.dcm", "series.ctbl"} <= {p.name for p in out.iterdir()}
    assert f"-> {out / 'series.nii.gz'}: ok" in r.stdout
    pred = np.asarray(nib.load(str(out / "series.nii.gz")).dataobj)
    assert pred.any(), "the tiny model predicts no organ: nothing to compare"
    assert_seg_equals_prediction(out / "series_seg.dcm", uids, folder, image, pred)


def test_nifti_input_asking_for_dicom_seg_is_refused_with_a_sentence(tmp_path):
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(scan))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tmp_path / "none.pt"),
            "-i",
            str(scan),
            "-o",
            str(tmp_path / "out"),
            "--output-type",
            "dicom-seg",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert "is not a DICOM series; nothing was predicted. Use --output-type nifti" in r.stderr
    assert str(scan) in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_series_without_uids_is_refused_for_dicom_seg_before_any_work(real_abdomen_dicom, tmp_path):
    """The real fixture is anonymised without Study/Series/SOP instance UIDs: a SEG could not reference it.
    `--output-type both` must say so, naming the series, before the checkpoint or any pixel is read (the
    model path here does not exist), and write nothing; NIfTI output of the same series stays possible."""
    folder, _ = real_abdomen_dicom
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tmp_path / "none.pt"),
            "-i",
            str(folder),
            "-o",
            str(tmp_path / "out"),
            "--output-type",
            "both",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert f"{folder}: the series has no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID" in r.stderr
    assert "nothing was predicted. Use --output-type nifti" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_phantom_dicom_predicts_into_a_seg_that_references_it(tiny_checkpoint, tmp_path):
    """`medhpm phantom --dicom` gives a series to try DICOM in, DICOM-SEG out without data: the SEG references
    every slice, and the NIfTI prediction lies on the phantom's own grid (evaluated against its label map as
    is)."""
    from medhpm.data.phantom import write_phantom_dataset

    data = tmp_path / "phd"
    write_phantom_dataset(data, cases=2, seed=4, size=(40, 36, 10), spacing=(4.0, 4.0, 5.0), dicom=True)
    series = data / "dicom" / "phantom_001"  # an LPS case
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(tiny_checkpoint),
            "-i",
            str(series),
            "-o",
            str(tmp_path / "out"),
            "--output-type",
            "both",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    seg = hd.seg.segread(str(tmp_path / "out" / "phantom_001_seg.dcm"))
    src = [pydicom.dcmread(str(f)) for f in sorted(series.glob("*.dcm"))]
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    referenced = {
        str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    assert referenced == {str(d.SOPInstanceUID) for d in src}
    # the NIfTI prediction lies on the phantom's own grid, so it is evaluated against its label map as is
    pred = nib.load(str(tmp_path / "out" / "phantom_001.nii.gz"))
    label = nib.load(str(data / "labelsTr" / "phantom_001.nii.gz"))
    assert pred.shape == label.shape
    np.testing.assert_allclose(pred.affine, label.affine, atol=1e-3)
    meta = json.loads((data / "dataset.json").read_text())
    assert all(e["image"].startswith("imagesTr/") for e in meta["training"])  # the datalist stays NIfTI
