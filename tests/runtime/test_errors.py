"""Failures that must stop a run cleanly: a non-finite loss (stop with a checkpoint naming the step, or
skip and count), an output folder that cannot be written or a full disk (a clear error before any
training). The command line shows one ``error: ...`` line, no traceback, and exits with code 2."""

from __future__ import annotations

import contextlib
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from runtime_helpers import load_state, medhpm_cmd, records, run, tiny_overrides

EXPLODE = ("pretrain.lr=1e30", "pretrain.warmup_epochs=0")  # the first step blows the weights up


def _assert_clean_error(p, *needles: str) -> None:
    assert p.returncode == 2, f"exit code {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, p.stderr[-3000:]
    for n in needles:
        assert n in err[0], f"{n!r} not in {err[0]!r}"


def test_nonfinite_loss_stops_with_a_checkpoint_and_names_the_step(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    p = run(medhpm_cmd("pretrain", "--out", str(out), *tiny_overrides(tiny_dataset, *EXPLODE)), check=False)
    _assert_clean_error(
        p, "non-finite loss", "epoch 1", "optimizer step 2", str(out / "nonfinite.pt"), "pretrain.nonfinite=skip"
    )
    state = load_state(out / "nonfinite.pt")
    assert state["stage"] == "pretrain" and state["step"] == 1  # the weights before the failing step 2
    assert [r["step"] for r in records(out, "step")] == [1]
    assert not records(out, "epoch") and not (out / "last.pt").exists()


def test_nonfinite_loss_with_skip_goes_on_and_counts(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    p = run(
        medhpm_cmd("pretrain", "--out", str(out), *tiny_overrides(tiny_dataset, *EXPLODE, "pretrain.nonfinite=skip")),
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    skips = records(out, "skip")
    epochs = records(out, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    # 2 epochs x 3 steps; step 1 went through and every later one is skipped
    assert len(records(out, "step")) + len(skips) == 6 and len(skips) >= 4
    assert [r["skipped_steps"] for r in skips] == list(range(1, len(skips) + 1))
    assert epochs[-1]["skipped_steps"] == len(skips)
    assert load_state(out / "final.pt")["skipped_steps"] == len(skips)


def _no_training(out: Path) -> None:
    assert not records(out, "step") and not records(out, "epoch")
    assert not (out / "last.pt").exists()


def test_output_folder_that_cannot_be_created(tiny_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # even root cannot create a folder below a regular file
    p = run(medhpm_cmd("pretrain", "--out", str(out), *tiny_overrides(tiny_dataset)), check=False)
    _assert_clean_error(p, "cannot create output folder", str(out))
    assert blocker.read_text() == "not a folder"


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, f"medhpm-test-{uuid.uuid4().hex[:8]}", str(where)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {p.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_output_folder(tiny_dataset, tmp_path):
    # chmod does not stop root; a read-only mount does
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        out = mnt / "run"
        p = run(medhpm_cmd("pretrain", "--out", str(mnt), *tiny_overrides(tiny_dataset)), check=False)
        _assert_clean_error(p, "not writable", str(mnt), "Read-only")
        p = run(medhpm_cmd("pretrain", "--out", str(out), *tiny_overrides(tiny_dataset)), check=False)
        _assert_clean_error(p, "cannot create output folder", str(out))
        _no_training(mnt)


def test_full_disk_is_reported_before_training(tiny_dataset, tmp_path):
    with _tmpfs(tmp_path / "full", "size=1m") as mnt:
        out = mnt / "run"
        p = run(medhpm_cmd("pretrain", "--out", str(out), *tiny_overrides(tiny_dataset)), check=False)
        _assert_clean_error(p, str(out), "MiB free", "needed")
        _no_training(out)


def test_disk_too_small_for_this_models_checkpoints(tiny_dataset, tmp_path):
    """More than the 50 MiB floor free, but less than a checkpoint of this model (about 30 MiB for the
    micro hpm model: student, AdamW moments, teacher) and its temporary copy."""
    with _tmpfs(tmp_path / "small", "size=56m") as mnt:
        out = mnt / "run"
        p = run(medhpm_cmd("pretrain", "--out", str(out), *tiny_overrides(tiny_dataset)), check=False)
        _assert_clean_error(p, str(out), "has only 56.0 MiB free", "needed")
        need = re.search(r"at least (\d+) MiB", p.stderr)
        assert need and int(need.group(1)) > 56, p.stderr  # sized from the model, not the 50 MiB floor
        _no_training(out)


def test_the_free_disk_estimate_counts_what_the_run_will_write():
    """last, best (fine-tuning) and final, one temporary copy while one is written, and a margin for figures
    and logs; a resumed run replaces its existing checkpoints in place (issue 15)."""
    from medhpm.runtime.files import OUTPUT_MARGIN, disk_needed
    from medhpm.pretrain.trainer import PretrainTrainer
    from medhpm.segment.trainer import FinetuneTrainer

    mib = 2**20
    assert PretrainTrainer.checkpoint_names == ("last", "final")
    assert FinetuneTrainer.checkpoint_names == ("last", "best", "final")
    need, why = disk_needed(100 * mib, FinetuneTrainer.checkpoint_names)
    assert need == 4 * 100 * mib + OUTPUT_MARGIN  # was 2 checkpoints' worth
    assert why == (
        "3 new checkpoint(s) of 100.0 MiB (last.pt, best.pt, final.pt) + 1 temporary copy of 100.0 MiB "
        "while one is written + 50 MiB for figures and logs"
    )
    need, why = disk_needed(100 * mib, PretrainTrainer.checkpoint_names)
    assert need == 3 * 100 * mib + OUTPUT_MARGIN and "(last.pt, final.pt)" in why
    need, why = disk_needed(100 * mib, FinetuneTrainer.checkpoint_names, existing=["last", "best"])
    assert need == 2 * 100 * mib + OUTPUT_MARGIN and "1 new checkpoint(s) of 100.0 MiB (final.pt)" in why
