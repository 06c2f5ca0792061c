"""Tracebacks where a sentence belongs (issue 15): each class of failure is caught where it arises and the
message names the file (or option) and the problem. One test per class, through the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from rel_helpers import (
    assert_clean_error,
    assert_nothing_complete,
    ct_volume,
    medhpm,
    tiny,
    write_cases,
    write_datalist,
)


def _write_zero_spacing(path: Path, array) -> Path:
    """A NIfTI file whose header gives the third voxel axis zero length (sform column of zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), None)
    img.header.set_sform(np.diag([3.0, 3.0, 0.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    nib.Nifti1Image(np.asarray(array), None, img.header).to_filename(str(path))
    assert nib.load(str(path)).affine[2, 2] == 0.0
    return path


def test_a_header_with_zero_spacing_is_named_by_data_check_training_and_predict(tmp_path, finetune_run):
    root = tmp_path / "d"
    entries = write_cases(root, 3)
    img, lab = ct_volume(seed=1)
    bad = _write_zero_spacing(root / "imagesTr" / "c1.nii.gz", img)
    _write_zero_spacing(root / "labelsTr" / "c1.nii.gz", lab)
    dl = write_datalist(root, entries)
    says = "voxel spacing (3.0, 3.0, 0.0) mm has an axis of zero length"

    res = medhpm("data", "check", dl)  # was: "Unable to find out axis 2.0 in start_ornt" / OK with 1 mm voxels
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("ERROR") and "c1.nii.gz" in x)
    assert str(bad) in line and says in line and "start_ornt" not in res.stdout

    res = medhpm("pretrain", *tiny(dl), "--out", tmp_path / "run")  # was: nibabel OrientationError
    assert_clean_error(res, bad, says)
    assert_nothing_complete(tmp_path / "run")

    res = medhpm("predict", "--model", finetune_run[0] / "final.pt", "-i", bad, "-o", tmp_path / "pred")
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert f"{bad} -> -: FAILED: {bad}: {says}" in res.stdout, res.stdout
    assert not list((tmp_path / "pred").glob("*.nii.gz"))


def test_data_check_with_a_zero_target_spacing_says_which_option(good_data):
    res = medhpm("data", "check", good_data, "--spacing", "0,0,0")  # was: OverflowError
    both = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in both and "OverflowError" not in both, both
    assert "--spacing must be three positive numbers like 1.5,1.5,2.0, not '0,0,0'" in " ".join(
        both.replace("│", " ").split()
    )


def test_resuming_a_run_whose_last_pt_comes_from_another_method(good_data, pretrain_run, tmp_path):
    hpm_dir, res = pretrain_run
    assert res.returncode == 0, res.stdout + res.stderr
    mae_dir = tmp_path / "mae"
    res = medhpm("pretrain", *tiny(good_data, "pretrain.method=mae"), "--out", mae_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    before = [(mae_dir / n).read_bytes() for n in ("metrics.jsonl", "final.pt")]
    shutil.copy(hpm_dir / "last.pt", mae_dir / "last.pt")  # another method's checkpoint in the mae run folder
    res = medhpm("pretrain", "pretrain.epochs=2", "--resume", mae_dir)  # was: a load_state_dict RuntimeError
    msg = assert_clean_error(
        res,
        f"cannot resume from {mae_dir / 'last.pt'}",
        "do not fit the model of this run",
        "pretrain.method 'hpm' -> 'mae'",
        str(mae_dir / "config_pretrain.yaml"),
    )
    assert "Missing key(s)" not in msg and "load_state_dict" not in msg
    assert [(mae_dir / n).read_bytes() for n in ("metrics.jsonl", "final.pt")] == before  # the run is untouched


def test_a_file_of_random_bytes_as_init_is_called_damaged_not_unsafe(good_data, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    res = medhpm("finetune", *tiny(good_data), "--init", junk, "--out", tmp_path / "run")
    msg = assert_clean_error(
        res, f"checkpoint {junk} is not a readable checkpoint: it is damaged or not a PyTorch file ("
    )
    assert "safely" not in msg and "weights_only" not in msg
    assert_nothing_complete(tmp_path / "run")


def test_a_checkpoint_lacking_entries_is_named(pretrain_run, good_data, tmp_path):
    run_dir, res = pretrain_run
    assert res.returncode == 0, res.stdout + res.stderr
    state = torch.load(run_dir / "final.pt", weights_only=True)
    del state["config"]["model"]  # a config section missing (was: "error: missing key 'model'")
    state["model_args"].pop("encoder")
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    res = medhpm("export-encoder", broken, "-o", tmp_path / "enc" / "encoder.safetensors")
    assert_clean_error(res, f"pre-training checkpoint {broken} lacks config.model, model_args.encoder", "damaged")
    assert not (tmp_path / "enc").exists() or not any((tmp_path / "enc").iterdir())
    for name in ("model", "epoch"):
        state = torch.load(run_dir / "final.pt", weights_only=True)
        del state[name]
        torch.save(state, broken)
        res = medhpm(
            "visualize",
            "pretrain",
            broken,
            "--image",
            good_data.parent / "imagesTr" / "c1.nii.gz",
            "-o",
            tmp_path / "x.png",
        )
        assert_clean_error(res, f"pre-training checkpoint {broken} lacks {name}")
