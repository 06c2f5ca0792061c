"""A fine-tuning run folder given to `predict`, `export-model` or `finetune --init` means the run's trained
model: its best.pt (the best validation Dice, the checkpoint the demo and experiments evaluate), not last.pt,
which resuming reads. Here last.pt is made to predict something else, so a folder that resolved to it shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medhpm.runtime.checkpoint import INIT_ORDER, MODEL_ORDER, RESUME_ORDER, resolve_checkpoint
from medhpm.runtime.weights import load_encoder_weights
from medhpm.segment.export import export_model
from medhpm.segment.predict import Predictor


def _run_folder(tiny_checkpoint: Path, root: Path) -> Path:
    """best.pt = the tiny model; last.pt and final.pt = the same model whose output layer says class 1."""
    run = root / "finetune"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "best.pt")
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    bias = [k for k in state["model"] if k.startswith("out.") and k.endswith("bias")]
    assert bias, sorted(state["model"])[-5:]
    state["model"][bias[0]] = torch.zeros_like(state["model"][bias[0]])
    state["model"][bias[0]][1] = 1e4  # spleen everywhere
    for name in ("last.pt", "final.pt"):
        torch.save(state, run / name)
    return run


def _scan(seg_phantoms) -> Path:
    dl = json.loads(Path(seg_phantoms).read_text())
    return Path(seg_phantoms).parent / dl["test"][0]["image"]


def test_resolution_orders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.pt").write_bytes(b"x")
    assert resolve_checkpoint(run, MODEL_ORDER) == run / "final.pt" == resolve_checkpoint(run, RESUME_ORDER)
    (run / "last.pt").write_bytes(b"x")  # a pre-training folder (no best.pt): --init takes the newest weights
    assert resolve_checkpoint(run, INIT_ORDER) == run / "last.pt"
    (run / "best.pt").write_bytes(b"x")
    assert resolve_checkpoint(run, INIT_ORDER) == run / "best.pt"
    assert resolve_checkpoint(run, MODEL_ORDER) == run / "best.pt"
    assert resolve_checkpoint(run, RESUME_ORDER) == run / "last.pt"
    assert resolve_checkpoint(run / "final.pt", MODEL_ORDER) == run / "final.pt"  # a file is itself


def test_predict_and_export_of_a_run_folder_use_its_best_checkpoint(tiny_checkpoint, seg_phantoms, tmp_path):
    run = _run_folder(tiny_checkpoint, tmp_path)
    scan = _scan(seg_phantoms)
    best = Predictor.from_checkpoint(run / "best.pt", device="cpu").predict(scan).label
    last = Predictor.from_checkpoint(run / "last.pt", device="cpu").predict(scan).label
    # the two checkpoints are told apart: last.pt says spleen inside the foreground crop (background outside)
    assert set(np.unique(last)) == {0, 1} and (last == 1).mean() > 0.3 and not np.array_equal(best, last)
    np.testing.assert_array_equal(Predictor.from_checkpoint(run, device="cpu").predict(scan).label, best)

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "-m",
            str(run),
            "-i",
            str(scan),
            "-o",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"model: {run / 'best.pt'}" in r.stdout

    written = np.asarray(nib.load(str(next((tmp_path / "pred").glob("*.nii.gz")))).dataobj)
    np.testing.assert_array_equal(written, best)

    export_model(run, tmp_path / "ts", "torchscript")
    record = json.loads((tmp_path / "ts" / "export.json").read_text())
    assert record["checkpoint"] == str((run / "best.pt").resolve())


def test_finetune_init_from_a_fine_tuning_folder_takes_its_best_encoder(tiny_checkpoint, tmp_path):
    """`--init RUN` of a fine-tuning run (fine-tuning again, on other data): the encoder of best.pt, named as
    a fine-tuning checkpoint in the report; --teacher is refused with a sentence (it has no teacher)."""
    run = tmp_path / "finetune"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "best.pt")
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    best_enc = {k: v.clone() for k, v in state["model"].items() if k.startswith("encoder.")}
    for k in best_enc:
        state["model"][k] = torch.full_like(state["model"][k], 0.5)
    for name in ("last.pt", "final.pt"):
        torch.save(state, run / name)

    model = Predictor.from_checkpoint(run / "last.pt", device="cpu").model
    report = load_encoder_weights(model, run)
    assert report.source == str(run / "best.pt") and report.source_format == "medhpm-finetune"
    loaded = model.state_dict()
    for k, v in best_enc.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError) as e:
        load_encoder_weights(model, run, use_teacher=True)
    assert (
        str(run / "best.pt") in str(e.value)
        and "fine-tuning checkpoint" in str(e.value)
        and "--teacher" in str(e.value)
    )
