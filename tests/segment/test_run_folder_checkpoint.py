"""A fine-tuning run folder given to `predict` or `export-model` means the run's trained model: its best.pt
(the best validation Dice, the checkpoint the demo and experiments evaluate), not last.pt, which resuming
reads. Here last.pt is made to predict something else, so a folder that resolved to it shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medhpm.runtime.checkpoint import MODEL_ORDER, RESUME_ORDER, resolve_checkpoint
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
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes(b"x")
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

    r = subprocess.run([sys.executable, "-m", "medhpm.cli", "predict", "-m", str(run), "-i", str(scan),
                        "-o", str(tmp_path / "pred"), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"model: {run / 'best.pt'}" in r.stdout

    written = np.asarray(nib.load(str(next((tmp_path / "pred").glob("*.nii.gz")))).dataobj)
    np.testing.assert_array_equal(written, best)

    export_model(run, tmp_path / "ts", "torchscript")
    record = json.loads((tmp_path / "ts" / "export.json").read_text())
    assert record["checkpoint"] == str((run / "best.pt").resolve())
