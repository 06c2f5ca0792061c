"""Helpers of the bad-input tests: run the real ``medhpm`` command line, write small (bad) CT cases, and
check that a failure is one clear line that leaves nothing that looks like a finished output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from testkit import synthetic_ct, tiny_settings

RUN_TIMEOUT = 300  # generous: a loaded 2-core machine may run several of these at once
SPACING = (3.0, 3.0, 3.0)
SHAPE = (48, 48, 48)  # at 4 mm: 36^3 voxels, larger than the 32^3 ROI in every axis


def medhpm_exe() -> list[str]:
    """The ``medhpm`` console script of this environment (what a user types), else ``python -m medhpm.cli``."""
    script = Path(sys.executable).with_name("medhpm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medhpm.cli"]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("MEDHPM_DEBUG", "MONAI_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def medhpm(*args: str | os.PathLike, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run ``medhpm ARGS`` and return the finished process (text stdout/stderr)."""
    return subprocess.run(
        medhpm_exe() + [str(a) for a in args],
        cwd=cwd,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def tiny(dataset: str | os.PathLike, *more: str) -> list[str]:
    """``key=value`` overrides for seconds-long CPU runs on ``dataset`` (the shared tiny settings, one epoch of
    batch 1, 3 classes); ``more`` replace or add."""
    return tiny_settings(
        dataset,
        *more,
        **{
            "pretrain.batch_size": "1",
            "finetune.batch_size": "1",
            "pretrain.epochs": "1",
            "finetune.epochs": "1",
            "finetune.num_classes": "3",
        },
    )


# ----------------------------------------------------------------------------------------------- checks
def error_line(res: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` text of a failed command (all of it: a message may span several lines)."""
    err = res.stderr
    assert "error: " in err, f"no 'error:' line (rc {res.returncode}):\nSTDOUT:\n{res.stdout}\nSTDERR:\n{err}"
    return err[err.index("error: ") :]


def assert_clean_error(res: subprocess.CompletedProcess, *fragments: str | os.PathLike, rc: int = 2) -> str:
    """A user error: exit code ``rc``, no Python traceback anywhere, and an ``error:`` message that contains
    every fragment (file names, config keys, what is wrong). Returns the message."""
    both = res.stdout + res.stderr
    assert "Traceback" not in both, f"traceback shown without --debug:\n{both}"
    assert res.returncode == rc, f"exit code {res.returncode}, expected {rc}:\n{both}"
    msg = error_line(res)
    for frag in fragments:
        assert str(frag) in msg, f"{str(frag)!r} not in the error message:\n{msg}"
    return msg


def assert_nothing_complete(run_dir: Path) -> None:
    """No output of a failed training run looks like a finished (or resumable) one: no checkpoint, no
    run summary, no epoch record in metrics.jsonl, no visible temporary file."""
    if not run_dir.exists():
        return
    ckpts = sorted(p.name for p in run_dir.rglob("*.pt"))
    assert not ckpts, f"checkpoints left by a failed run: {ckpts}"
    assert not (run_dir / "summary.json").exists(), "summary.json written by a failed run"
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            assert rec.get("kind") != "epoch", f"an epoch record left by a failed run: {rec}"
    visible_tmp = [p.name for p in run_dir.rglob("*tmp*") if not p.name.startswith(".")]
    assert not visible_tmp, f"temporary files that do not look temporary: {visible_tmp}"


# ----------------------------------------------------------------------------------------------- data
def ct_volume(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU volume (air, an elliptic body, an organ, a bone) and its uint8 label map (0, 1 organ,
    2 bone): the shared synthetic CT with the organ at a fixed place."""
    return synthetic_ct(shape, seed, jitter=0)


def write_nifti(path: Path, array, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def write_datalist(root: Path, training: list[dict], name: str = "dataset.json", **extra) -> Path:
    """An MSD datalist in ``root`` (paths as given: relative to ``root`` or absolute)."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": "reliability",
        "labels": {"0": "background", "1": "organ", "2": "bone"},
        "training": training,
        **extra,
    }
    path = root / name
    path.write_text(json.dumps(meta, indent=1))
    return path


def write_cases(root: Path, n: int = 3, shape=SHAPE, labels: bool = True) -> list[dict]:
    """``n`` good cases imagesTr/cK.nii.gz (+ labelsTr/cK.nii.gz); returns their datalist entries."""
    entries = []
    for i in range(n):
        img, lab = ct_volume(shape, seed=i)
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", img)
        entry = {"image": f"imagesTr/c{i}.nii.gz"}
        if labels:
            write_nifti(root / "labelsTr" / f"c{i}.nii.gz", lab)
            entry["label"] = f"labelsTr/c{i}.nii.gz"
        entries.append(entry)
    return entries


def dataset_with(root: Path, bad_image=None, bad_label=None, n: int = 3, shape=SHAPE, case: str = "c1", **kw) -> Path:
    """``n`` good labelled cases in ``root``; then ``case``'s image and/or label array replaced by
    ``bad_image`` / ``bad_label`` (``kw`` go to :func:`write_nifti` for them). Returns the datalist.

    Fine-tuning with seed 0 and ``data.val_cases=1`` validates on c2 and trains on c0 and c1."""
    entries = write_cases(root, n, shape)
    if bad_image is not None:
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", bad_image, **kw)
    if bad_label is not None:
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", bad_label, **kw)
    return write_datalist(root, entries)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its size (a copy interrupted half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
