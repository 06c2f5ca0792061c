"""Ctrl-C (a real SIGINT to a real ``medhpm pretrain``) says that the run was interrupted, where its last
checkpoint is (or that none was written yet) and the command that resumes it (issue 15)."""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from pathlib import Path

from rel_helpers import child_env, medhpm_exe, tiny, write_cases, write_datalist


def _start(args: list[str]) -> subprocess.Popen:
    # SIGINT back to its default in the child: a shell's background job starts with it ignored
    return subprocess.Popen(
        medhpm_exe() + args,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> tuple[str, str]:
    """Send SIGINT once ``ready()`` is true; returns the child's (stdout, stderr)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)


def _data(tmp_path: Path) -> Path:
    return write_datalist(tmp_path / "d", write_cases(tmp_path / "d", 2))


def test_ctrl_c_after_a_checkpoint_names_it_and_the_resume_command_works(tmp_path):
    dl, run = _data(tmp_path), tmp_path / "run"
    proc = _start(["pretrain", *tiny(dl, "pretrain.epochs=3", "pretrain.steps_per_epoch=40"), "--out", str(run)])
    out, err = _interrupt_when(proc, lambda: (run / "last.pt").exists())  # after epoch 1's checkpoint
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    resume = f"medhpm pretrain --resume {shlex.quote(str(run))}"
    assert err.strip() == (
        f"interrupted: the pretrain run in {run} stopped; its last checkpoint is {run / 'last.pt'} "
        f"(after epoch 1 of 3). Resume it with: {resume}"
    ), err
    assert (run / "last.pt").is_file() and not (run / "final.pt").exists()
    res = subprocess.run(
        medhpm_exe() + shlex.split(resume)[1:], env=child_env(), capture_output=True, text=True, timeout=300
    )  # the command the message gives
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {run / 'last.pt'} at epoch 1" in res.stdout and (run / "final.pt").is_file()


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    dl, run = _data(tmp_path), tmp_path / "run"
    proc = _start(["pretrain", *tiny(dl, "pretrain.epochs=2", "pretrain.steps_per_epoch=100000"), "--out", str(run)])
    # set-up done (the resolved config is written), the first epoch of 100000 steps under way
    out, err = _interrupt_when(
        proc, lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size
    )
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err, err
    assert err.strip() == (
        f"interrupted: the pretrain run in {run} stopped before its first checkpoint, so there "
        f"is nothing to resume; start it again (the same command, same --out {run})"
    ), err
    assert not (run / "last.pt").exists()
