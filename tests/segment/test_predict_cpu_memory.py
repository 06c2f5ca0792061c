"""`medhpm predict` applies the checkpoint's runtime.cpu_memory: with ``auto`` (reuse on a CPU) the second and
third scans of a folder reuse the first scan's full-size maps instead of faulting them in again; a checkpoint
whose config says ``release`` keeps glibc's defaults, under which every scan faults them in anew.

Page faults are counted from outside (``getrusage(RUSAGE_CHILDREN)`` around the CLI's process), as the
difference between predicting three scans and one, so that start-up (imports, the model) cancels out."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

SHAPE = (96, 96, 64)  # at the tiny model's 6 mm spacing: 14 classes x 590 k voxels = 33 MB a float32 map


def _scans(folder: Path, n: int) -> Path:
    import nibabel as nib

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        hu = rng.normal(40, 200, SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([6.0, 6.0, 6.0, 1.0])), str(folder / f"scan{i}.nii.gz"))
    return folder


def _faults(checkpoint: Path, scans: Path, out: Path) -> int:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm",
            "predict",
            "--model",
            str(checkpoint),
            "-i",
            str(scans),
            "-o",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before


def test_predict_reuses_memory_between_scans_unless_the_checkpoint_says_release(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    assert state["config"]["runtime"]["cpu_memory"] == "auto"
    state["config"]["runtime"]["cpu_memory"] = "release"
    released = tmp_path / "release.pt"
    torch.save(state, released)
    one, three = _scans(tmp_path / "one", 1), _scans(tmp_path / "three", 3)
    extra = {}
    for name, ckpt in (("auto", tiny_checkpoint), ("release", released)):
        extra[name] = _faults(ckpt, three, tmp_path / f"{name}3") - _faults(ckpt, one, tmp_path / f"{name}1")
    # two more scans under glibc's defaults: their maps faulted in again (tens of thousands of pages)
    assert extra["release"] > 2 * 8000, extra
    assert extra["auto"] * 4 < extra["release"], extra
