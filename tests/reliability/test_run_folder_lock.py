"""One run per folder (issue 15): a run folder (pretrain, finetune, demo, experiment) is locked for the
life of its run; a second run into it is refused at once naming the holder, and the lock of a killed
(SIGKILL) run is taken over. Two real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rel_helpers import assert_clean_error, child_env, medhpm, medhpm_exe, tiny


# ================================================================================ one run per folder
def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        medhpm_exe() + [str(a) for a in args],
        env=child_env(),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _wait_for_lock(lock: Path, proc: subprocess.Popen, log: Path, what: str) -> None:
    """Until ``proc`` holds ``lock`` (it must not exit first; at most 240 s)."""
    deadline = time.time() + 240
    while _holder(lock).get("pid") != proc.pid:
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, f"the first {what} never took the lock"
        time.sleep(0.2)


def test_two_runs_into_one_folder(good_data, tmp_path):
    out = tmp_path / "run"
    lock = out / ".medhpm.lock"
    # a first run that would take long (an epoch of 10^5 steps): it holds the folder until it is killed
    first = _start(
        ["pretrain", *tiny(good_data, "pretrain.steps_per_epoch=100000"), "--out", out], tmp_path / "first.log"
    )
    try:
        _wait_for_lock(lock, first, tmp_path / "first.log", "run")
        started = _holder(lock)["started"]
        t0 = time.time()
        second = medhpm("pretrain", *tiny(good_data), "--out", out)
        assert_clean_error(
            second,
            f"{out} is in use by another pretrain run",
            f"pid {first.pid}",
            f"started {started}",
            "choose another --out",
        )
        assert time.time() - t0 < 120  # refused at once (the import of the training stack aside)
        assert first.poll() is None, "the refused run disturbed the first one"
        assert not (out / "last.pt").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert _holder(lock).get("pid") == first.pid  # a killed run leaves its record behind: a stale lock
    third = medhpm("pretrain", *tiny(good_data), "--out", out)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"was locked by a run that is gone (pid {first.pid}" in third.stderr
    assert (out / "final.pt").is_file()
    assert lock.read_text() == ""  # released at the end: the next run finds no stale holder


def test_two_demos_into_one_folder(tmp_path):
    """The demo locks its folder before it looks at what is in it: a second demo with the very same settings
    (which a finished folder would let resume) is refused while the first runs, and nothing of it is written."""
    out = tmp_path / "demo"
    lock = out / ".medhpm.lock"
    args = ["demo", "--quick", "pretrain.steps_per_epoch=100000", "runtime.threads=1", "--out", out]
    first = _start(args, tmp_path / "first.log")
    try:
        _wait_for_lock(lock, first, tmp_path / "first.log", "demo")
        second = medhpm(*args)
        assert_clean_error(second, f"{out} is in use by another demo", f"pid {first.pid}", "choose another --out")
        assert first.poll() is None, "the refused demo disturbed the first one"
        assert not (out / "report.html").exists() and not (out / "finetune").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


def test_a_run_folder_lock_is_taken_over_only_when_its_holder_is_gone(tmp_path):
    """The lock itself, between two real processes: held while its holder lives, free once it is killed."""
    from medhpm.runtime.files import RunFolderLocked, run_folder_lock

    code = (
        "import sys, time; from medhpm.runtime.files import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderLocked, match=f"pid {holder.pid} on .*, started "):
            with run_folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with run_folder_lock(tmp_path) as lock:
        assert _holder(lock)["pid"] == os.getpid()


def test_an_experiment_folder_is_locked(tmp_path):
    """``medhpm experiment`` into a folder held by another process is refused naming the holder (the bad
    override would fail right after the lock, so a missing lock shows as another error, not a long run)."""
    code = (
        "import sys, time; from medhpm.runtime.files import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1], what='experiment'):\n    print('held', flush=True); time.sleep(600)\n"
    )
    out = tmp_path / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = medhpm("experiment", "--out", out, "pretrain.epochs=banana")
        assert_clean_error(res, f"{out} is in use by another experiment", f"pid {holder.pid}", "started ")
    finally:
        holder.kill()
        holder.wait(timeout=30)
