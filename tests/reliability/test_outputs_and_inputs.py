"""Outputs never destroy inputs and two scans never share one output name (issue 15): every command that
writes refuses, before anything is read, an output path that is (or resolves to) one of its inputs, naming
both; predict refuses scans whose outputs would collide, naming both scans. Real files, the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rel_helpers import assert_clean_error, ct_volume, medhpm, tiny, write_nifti


def _model(finetune_run) -> Path:
    return finetune_run[0] / "final.pt"


# ================================================================================ outputs onto inputs
def test_predict_into_the_folder_of_its_input_scan_is_refused(finetune_run, good_data, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = Path(shutil.copy(good_data.parent / "imagesTr" / "c1.nii.gz", scans / "scan.nii.gz"))
    before = scan.read_bytes()
    res = medhpm("predict", "--model", _model(finetune_run), "-i", scan, "-o", scans)
    msg = assert_clean_error(
        res, f"refusing to write {scans / 'scan.nii.gz'}", f"the input {scan}", "nothing was read or written"
    )
    assert " ok" not in res.stdout and "segmented" not in res.stdout, res.stdout
    assert scan.read_bytes() == before, "the CT was overwritten"
    assert sorted(p.name for p in scans.iterdir()) == ["scan.nii.gz"], msg  # no temporary file either


def test_predict_a_folder_into_itself_is_refused(finetune_run, good_data, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        shutil.copy(good_data.parent / "imagesTr" / "c1.nii.gz", scans / f"{name}.nii.gz")
    before = {p.name: p.read_bytes() for p in scans.iterdir()}
    res = medhpm("predict", "--model", _model(finetune_run), "-i", scans, "-o", scans)
    assert_clean_error(res, "refusing to write", str(scans / "a.nii.gz"), "the input")
    assert {p.name: p.read_bytes() for p in scans.iterdir()} == before


def test_predict_into_the_labels_of_its_data_set_is_refused(finetune_run, tmp_path):
    """Predicting a datalist's test split with -o at the data set's labelsTr would replace the ground truth
    with predictions (Dice 1.0 afterwards): every image and label of every split of the data set given is an
    input, also through a symbolic link to the folder; nothing is written and no file changes."""
    import hashlib

    from rel_helpers import write_cases, write_datalist

    root = tmp_path / "data"
    entries = write_cases(root, 3)
    test = [{"image": e["image"], "label": e["label"]} for e in entries[2:]]
    datalist = write_datalist(root, entries[:2], test=test)
    (tmp_path / "labels_link").symlink_to(root / "labelsTr")

    def digests():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    before = digests()
    for out in (root / "labelsTr", tmp_path / "labels_link"):
        res = medhpm("predict", "--model", _model(finetune_run), "-i", datalist, "--split", "test", "-o", out)
        assert_clean_error(res, f"refusing to write {out / 'c2.nii.gz'}", "labelsTr/c2.nii.gz", "nothing was read")
        assert digests() == before


def test_evaluate_with_the_output_on_a_prediction_is_refused(tmp_path):
    lab = ct_volume((24, 24, 16))[1]
    pred = write_nifti(tmp_path / "pred" / "case.nii.gz", lab)
    gt = write_nifti(tmp_path / "gt" / "case.nii.gz", lab)
    before = pred.read_bytes()
    res = medhpm("evaluate", "--pred", pred, "--label", gt, "--classes", "organ=1,bone=2", "-o", pred)
    assert_clean_error(res, f"refusing to write {pred}", f"the input {pred}")
    assert pred.read_bytes() == before and pred.is_file()


def test_visualize_segmentation_onto_the_ct_is_refused(tmp_path):
    img, lab = ct_volume((24, 24, 16))
    scan = write_nifti(tmp_path / "scan.nii.gz", img)
    label = write_nifti(tmp_path / "label.nii.gz", lab)
    before = scan.read_bytes()
    res = medhpm("visualize", "segmentation", "--image", scan, "--label", label, "-o", scan)
    assert_clean_error(res, f"refusing to write {scan}", f"the input {scan}")
    assert scan.read_bytes() == before


def test_data_datalist_onto_its_source_is_refused(tmp_path):
    root = tmp_path / "data"
    write_nifti(root / "imagesTr" / "c0.nii.gz", ct_volume((24, 24, 16))[0])
    source = root / "dataset.json"
    source.write_text(
        json.dumps({"name": "mine", "labels": {"0": "background"}, "training": [{"image": "imagesTr/c0.nii.gz"}]})
    )
    before = source.read_bytes()
    res = medhpm("data", "datalist", root, "-o", source)  # the folder's own dataset.json is what it reads
    assert_clean_error(res, f"refusing to write {source}", f"the input {source}")
    assert source.read_bytes() == before


def test_phantom_into_a_folder_holding_another_data_set_is_refused(tmp_path):
    source = tmp_path / "dataset.json"
    source.write_text(json.dumps({"name": "BTCV", "training": []}))
    before = source.read_bytes()
    res = medhpm("phantom", tmp_path, "--cases", "1", "--size", "16,16,8")
    assert_clean_error(res, f"refusing to write phantoms into {tmp_path}", str(source), "'BTCV'")
    assert source.read_bytes() == before
    assert not (tmp_path / "imagesTr").exists()


# ================================================================================ two scans, one name
def test_predict_refuses_nii_and_nii_gz_of_one_name(finetune_run, good_data, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "pred"
    scans.mkdir()
    img = ct_volume()[0]
    write_nifti(scans / "case.nii", img)
    write_nifti(scans / "case.nii.gz", img)
    res = medhpm("predict", "--model", _model(finetune_run), "-i", scans, "-o", out)
    assert_clean_error(
        res, "case name(s) are given to more than one scan", str(scans / "case.nii"), str(scans / "case.nii.gz")
    )
    assert "segmented" not in res.stdout
    assert not out.exists() or not any(out.iterdir())


def test_predict_refuses_two_dicom_series_of_one_name(finetune_run, dicom_series_writer, tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "pred"
    vol = ct_volume((32, 32, 8))[0]
    one = dicom_series_writer(scans / "p1_ct", vol)  # named p1_ct
    two = dicom_series_writer(scans / "p1" / "ct", vol)  # p1/ct: named p1_ct too
    res = medhpm("predict", "--model", _model(finetune_run), "-i", scans, "-o", out)
    assert_clean_error(res, "p1_ct:", str(one), str(two), "more than one scan")
    assert "segmented" not in res.stdout
    assert not out.exists() or not any(out.iterdir())


def test_finetune_without_validation_names_only_the_files_it_wrote(good_data, tmp_path):
    """With data.val_cases=0 there is no validation Dice and so no best.pt: the closing line must not send the
    user looking for one, and predict from the folder takes final.pt."""
    out = tmp_path / "ft"
    res = medhpm("finetune", *tiny(good_data, "data.val_cases=0"), "--init", "none", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (out / "best.pt").exists() and (out / "final.pt").is_file()
    assert f"fine-tuning finished: {out} (final.pt, metrics.jsonl)" in res.stdout
    scan = json.loads(Path(good_data).read_text())["training"][1]["image"]
    pred = medhpm("predict", "-m", out, "-i", Path(good_data).parent / scan, "-o", tmp_path / "pred")
    assert pred.returncode == 0, pred.stdout + pred.stderr
    assert f"model: {out / 'final.pt'}" in pred.stdout


def test_resume_with_another_out_or_a_config_is_refused_and_the_run_untouched(pretrain_run, tmp_path):
    """`--resume A --out B` continued A and ignored B (overwriting A's final checkpoint); `--resume A
    --config X` ignored X. Both are refused before any work, naming what to drop; A's files keep their bytes
    and B is not created."""
    import hashlib

    run_dir = pretrain_run[0]

    def digests():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = digests()
    other = tmp_path / "B"
    res = medhpm("pretrain", "--resume", run_dir, "--out", other)
    assert_clean_error(res, f"--resume {run_dir}", f"another folder, {other}", "drop --out")
    res = medhpm("pretrain", "--resume", run_dir, "--config", "demo")
    assert_clean_error(res, f"--resume {run_dir}", "--config demo would be ignored", "drop --config")
    assert digests() == before and not other.exists()
