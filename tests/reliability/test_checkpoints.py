"""Checkpoints and encoders that do not fit, are damaged or are unsafe, through the command line.

Every weight file is read with ``torch.load(weights_only=True)`` (or safetensors); an exported encoder is
checked against the sha256 of its sidecar; a checkpoint's metadata (preset, patch size, ROI, spacing, HU
window, classes) is compared with the config it is used with, and every mismatch is named.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from rel_helpers import assert_clean_error, assert_nothing_complete, ct_volume, medhpm, tiny, truncate, write_nifti

SRC = Path(__file__).resolve().parents[2] / "src" / "medhpm"


@pytest.fixture(scope="module")
def pretrain_ckpt(pretrain_run) -> Path:
    run_dir, res = pretrain_run
    assert res.returncode == 0, res.stdout + res.stderr
    return run_dir / "final.pt"


# ================================================================================ finetune --init
def test_finetune_init_from_an_encoder_of_another_preset_and_patch_size(pretrain_ckpt, good_data, tmp_path):
    res = medhpm(
        "finetune",
        *tiny(good_data, "model.preset=tiny", "model.patch_size=8"),
        "--init",
        pretrain_ckpt,
        "--out",
        tmp_path / "run",
    )
    assert_clean_error(
        res,
        pretrain_ckpt,
        "another encoder configuration",
        "patch_size: file 16, model 8",
        "embed_dim: file 96, model 192",
        "ViT-micro/16",
        "the config asks for ViT-tiny/8",
    )
    assert_nothing_complete(tmp_path / "run")


def test_finetune_init_from_a_tampered_encoder_export(pretrain_ckpt, good_data, tmp_path):
    from medhpm.pretrain.trainer import export_encoder

    enc = export_encoder(pretrain_ckpt, tmp_path / "enc" / "encoder.safetensors")
    data = bytearray(enc.read_bytes())
    data[-100] ^= 0xFF  # one byte of the weights changed after the export
    enc.write_bytes(bytes(data))
    res = medhpm("finetune", *tiny(good_data), "--init", enc, "--out", tmp_path / "run")
    assert_clean_error(res, enc, "does not match its sidecar encoder.json", "sha256 is", "The weights file was changed")
    assert_nothing_complete(tmp_path / "run")


def test_export_encoder_over_an_earlier_export_is_refused(pretrain_ckpt, tmp_path):
    """A second export onto the same -o would replace weights a fine-tuning run may have started from: refused
    before anything is read, both files kept byte for byte; --force replaces them."""
    from safetensors.torch import load_file

    out = tmp_path / "enc" / "encoder.safetensors"
    res = medhpm("export-encoder", pretrain_ckpt, "-o", out)
    assert res.returncode == 0, res.stdout + res.stderr
    side = out.with_suffix(".json")
    before = (out.read_bytes(), side.read_bytes())
    res = medhpm("export-encoder", pretrain_ckpt, "--teacher", "-o", out)
    assert_clean_error(res, f"{out} and {side} already exist", "nothing was written", "--force")
    assert (out.read_bytes(), side.read_bytes()) == before
    res = medhpm("export-encoder", pretrain_ckpt, "--teacher", "-o", out, "--force")
    assert res.returncode == 0, res.stdout + res.stderr
    state = torch.load(pretrain_ckpt, map_location="cpu", weights_only=True)
    teacher = {k[len("encoder.") :]: v for k, v in state["teacher"].items() if k.startswith("encoder.")}
    written = load_file(str(out))
    assert set(written) == set(teacher)
    for k, v in teacher.items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=0)
    assert '"weights": "teacher"' in side.read_text()


def test_finetune_init_from_a_truncated_checkpoint(pretrain_ckpt, good_data, tmp_path):
    cut = truncate(Path(shutil.copy(pretrain_ckpt, tmp_path / "cut.pt")))
    res = medhpm("finetune", *tiny(good_data), "--init", cut, "--out", tmp_path / "run")
    assert_clean_error(res, cut, "unreadable or truncated")
    assert_nothing_complete(tmp_path / "run")


def test_finetune_resume_with_a_changed_config(finetune_run, tmp_path):
    run_dir, _ = finetune_run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    res = medhpm("finetune", "--resume", run_dir, "model.preset=tiny", "finetune.num_classes=5", "finetune.epochs=2")
    assert_clean_error(
        res,
        f"cannot resume {run_dir}",
        "model.preset 'micro' -> 'tiny'",
        "finetune.num_classes 3 -> 5",
        "config_finetune.yaml",
    )
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # the run is untouched


# ================================================================================ predict
def test_predict_with_a_pretraining_checkpoint(pretrain_ckpt, good_data, tmp_path):
    res = medhpm(
        "predict", "--model", pretrain_ckpt, "-i", good_data.parent / "imagesTr" / "c1.nii.gz", "-o", tmp_path / "pred"
    )
    assert_clean_error(res, pretrain_ckpt, "is a 'pretrain' checkpoint", "needs a fine-tuning checkpoint")
    assert not list(tmp_path.glob("pred/*.nii.gz"))


def test_predict_with_a_truncated_checkpoint(finetune_run, good_data, tmp_path):
    cut = truncate(Path(shutil.copy(finetune_run[0] / "final.pt", tmp_path / "final.pt")), keep=0.7)
    res = medhpm("predict", "--model", cut, "-i", good_data.parent / "imagesTr" / "c1.nii.gz", "-o", tmp_path / "pred")
    assert_clean_error(res, cut, "unreadable or truncated")
    assert not list(tmp_path.glob("pred/*.nii.gz"))


class _Payload:
    """Pickles as a call of Path.touch: loading it without weights_only would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_calls_in_a_pickle_are_read_without_running_it(tmp_path):
    """code_in_pickle names what a pickle would import and call, for every protocol and for torch.save, and
    nothing for a state dict of tensors and NumPy values (which torch.load(weights_only=True) reads)."""
    import os
    import pickle

    from medhpm.runtime.checkpoint import code_in_pickle

    class System:
        def __reduce__(self):
            return (os.system, ("true",))

    for protocol in (0, 2, 4, 5):
        (tmp_path / f"p{protocol}.pkl").write_bytes(pickle.dumps({"model": System()}, protocol=protocol))
        assert code_in_pickle(tmp_path / f"p{protocol}.pkl") == [f"{os.name}.system"], protocol
    torch.save({"model": System()}, tmp_path / "t.pt")
    assert code_in_pickle(tmp_path / "t.pt") == [f"{os.name}.system"]
    torch.save(
        {"model": {"w": torch.zeros(2, dtype=torch.bfloat16)}, "step": 3, "rng": np.zeros(3)}, tmp_path / "ok.pt"
    )
    assert code_in_pickle(tmp_path / "ok.pt") == []
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 4)
    assert code_in_pickle(tmp_path / "junk.pt") == []


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_predict_refuses_a_checkpoint_that_runs_code_when_unpickled(tmp_path, good_data, writer):
    """The true cause, whatever wrote the pickle: not a medhpm checkpoint, its pickle calls these when
    loaded (a plain pickle was called "damaged" before), and it was not loaded: the payload did not run."""
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = {"format": "medhpm-checkpoint", "stage": "finetune", "model": _Payload(marker)}
    if writer == "torch.save":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state, protocol=4))
    res = medhpm("predict", "--model", evil, "-i", good_data.parent / "imagesTr" / "c1.nii.gz", "-o", tmp_path / "pred")
    assert_clean_error(
        res, f"{evil} is not a medhpm checkpoint: it is a pickle that calls", "pathlib.", "would run code", "not loaded"
    )
    assert not marker.exists()
    if writer == "torch.save":  # the payload is real: an unsafe load runs it
        torch.load(evil, weights_only=False)
    else:
        pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_predict_with_a_corrupt_scan_writes_no_partial_output(finetune_run, good_data, tmp_path):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    shutil.copy(good_data.parent / "imagesTr" / "c1.nii.gz", inputs / "good.nii.gz")
    bad = truncate(Path(shutil.copy(good_data.parent / "imagesTr" / "c2.nii.gz", inputs / "bad.nii.gz")))
    out = tmp_path / "pred"
    res = medhpm("predict", "--model", finetune_run[0] / "final.pt", "-i", inputs, "-o", out)
    both = res.stdout + res.stderr
    assert res.returncode == 1, both  # one scan failed
    assert "Traceback" not in both
    failed = [line for line in res.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and str(bad) in failed[0] and "unreadable" in failed[0], res.stdout
    assert "applying transform" not in failed[0]
    assert "1 of 2 scans segmented" in res.stdout
    # no bad.nii.gz (nor its colour tables), no temporary file
    assert sorted(p.name for p in out.iterdir()) == ["good.ctbl", "good.itksnap.txt", "good.nii.gz"]
    assert nib.load(str(out / "good.nii.gz")).shape == nib.load(str(inputs / "good.nii.gz")).shape


def test_checkpoint_metadata_is_compared_with_the_config(finetune_run):
    from medhpm.config import load_config
    from medhpm.runtime.checkpoint import CheckpointError
    from medhpm.segment.predict import Predictor

    ckpt = finetune_run[0] / "final.pt"
    ok = load_config("demo", tiny("phantom"))
    Predictor.from_checkpoint(ckpt, device="cpu", expect=ok)  # the config it was trained with fits
    other = load_config(
        "demo",
        tiny(
            "phantom",
            "model.preset=tiny",
            "model.patch_size=8",
            "data.spacing=[2,2,2]",
            "data.a_max=400",
            "finetune.num_classes=14",
        ),
    )
    with pytest.raises(CheckpointError) as err:
        Predictor.from_checkpoint(ckpt, device="cpu", expect=other)
    msg = str(err.value)
    for frag in (
        str(ckpt),
        "model.preset: checkpoint 'micro', config 'tiny'",
        "model.patch_size: checkpoint 16, config 8",
        "data.spacing: checkpoint (4.0, 4.0, 4.0), config (2.0, 2.0, 2.0)",
        "data.a_max: checkpoint 250.0, config 400.0",
        "finetune.num_classes: checkpoint 3, config 14",
    ):
        assert frag in msg, msg


# ================================================================================ evaluate
@pytest.fixture
def label_map(tmp_path) -> Path:
    return write_nifti(tmp_path / "gt" / "case.nii.gz", ct_volume((24, 24, 16))[1])


def test_evaluate_with_a_truncated_prediction(label_map, tmp_path):
    pred = truncate(write_nifti(tmp_path / "pred" / "case.nii.gz", ct_volume((24, 24, 16))[1]))
    res = medhpm(
        "evaluate", "--pred", pred, "--label", label_map, "--classes", "organ=1,bone=2", "-o", tmp_path / "eval"
    )
    assert_clean_error(res, pred, "unreadable")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_evaluate_prediction_and_label_of_different_shapes(label_map, tmp_path):
    pred = write_nifti(tmp_path / "pred" / "case.nii.gz", ct_volume((24, 24, 12))[1])
    res = medhpm(
        "evaluate", "--pred", pred, "--label", label_map, "--classes", "organ=1,bone=2", "-o", tmp_path / "eval"
    )
    assert_clean_error(res, pred, label_map, "shape (24, 24, 12)", "shape (24, 24, 16)", "original geometry")
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ================================================================================ safe loading, statically
def test_every_torch_load_uses_weights_only():
    """Every torch.load call in the package passes weights_only=True, except the data disk cache (our own
    files, documented in medhpm/data/dataset.py); nothing unpickles otherwise."""
    calls, unpickling = [], []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if (owner, node.func.attr) == ("torch", "load"):
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((name, node.lineno, safe))
            elif owner in ("pickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
                unpickling.append((name, node.lineno))
            elif (owner, node.func.attr) == ("np", "load") and any(k.arg == "allow_pickle" for k in node.keywords):
                unpickling.append((name, node.lineno))
    assert calls, "no torch.load found: the scan is broken"
    unsafe = [(f, line) for f, line, safe in calls if not safe]
    assert [f for f, _ in unsafe] == ["data/dataset.py"], unsafe
    assert not unpickling, unpickling
