"""Reliability under real SIGKILLs.

* A training run killed mid-epoch and resumed with ``--resume`` repeats that epoch from ``last.pt`` and,
  in deterministic CPU mode, ends with the weights and the log of an uninterrupted run.
* A process killed while it writes a checkpoint leaves the previous checkpoint loadable under its name,
  never a half-written one; the temporary file it leaves is hidden, is not named like a checkpoint, and
  is deleted when the next run starts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from runtime_helpers import (
    RUN_TIMEOUT,
    assert_same_tensors,
    child_env,
    load_state,
    medhpm_cmd,
    records,
    run,
    tiny_overrides,
)


def _kill_in_epoch(cmd: list[str], run_dir: Path, epoch: int) -> int:
    """Start ``cmd``; SIGKILL it at its first step record of ``epoch`` (0-based, after the previous epoch's
    last.pt). Returns the killed process's id."""
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the child
    proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the run ended (code {proc.returncode}) before it was killed:\n{log.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach the epoch to kill in time")
            if any(r.get("epoch") == epoch for r in records(run_dir, "step")):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def _steps(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("time", "data_time", "compute_time")} for r in records(run_dir, "step")
    ]


STEPS = {"pretrain": 8, "finetune": 4}  # per epoch (the loader cycles); 3 epochs


def _overrides(stage: str, dataset: Path) -> list[str]:
    return tiny_overrides(dataset, f"{stage}.epochs=3", f"{stage}.steps_per_epoch={STEPS[stage]}")


@pytest.fixture(scope="module")
def pretrain_reference(tiny_dataset, tmp_path_factory) -> Path:
    """An uninterrupted pre-training run (also the --init of the fine-tuning runs)."""
    ref = tmp_path_factory.mktemp("faults") / "pretrain_ref"
    run(medhpm_cmd("pretrain", "--out", str(ref), "--deterministic", *_overrides("pretrain", tiny_dataset)))
    return ref


def _kill_and_resume(stage: str, cmd: list[str], victim: Path) -> None:
    pid = _kill_in_epoch(cmd, victim, epoch=1)
    # killed in epoch 2, after epoch 1's checkpoint (or, on a badly stalled machine, a little later)
    done = load_state(victim / "last.pt")["epoch"]
    assert done in (0, 1) and not (victim / "final.pt").exists()
    # what a kill during a checkpoint write leaves behind (named with the dead writer's id), and a
    # temporary file of a live writer (this test process), which must be kept
    stale = victim / f".last.pt.{pid}.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = victim / f".other.pt.{os.getpid()}.abcd1234.tmp"
    live.write_bytes(b"being written")
    p = run(medhpm_cmd(stage, "--resume", str(victim), "--deterministic"))
    assert "resumed from" in p.stdout and f"at epoch {done + 1}" in p.stdout
    assert not stale.exists(), "the stale temporary checkpoint was not deleted"
    assert live.exists(), "a live writer's temporary file was deleted"


def _assert_same_run(stage: str, ref: Path, victim: Path) -> None:
    a, b = load_state(ref / "final.pt"), load_state(victim / "final.pt")
    assert a["step"] == b["step"] == 3 * STEPS[stage]
    assert_same_tensors(a["model"], b["model"], what="model")
    if stage == "pretrain":
        assert_same_tensors(a["teacher"], b["teacher"], what="EMA teacher")
    # the log reads as one run: the killed epoch's records were replaced by the repeated epoch's
    assert _steps(victim) == _steps(ref)
    assert [r["epoch"] for r in records(victim, "epoch")] == [0, 1, 2]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run_pretrain(pretrain_reference, tiny_dataset, tmp_path):
    victim = tmp_path / "victim"
    cmd = medhpm_cmd("pretrain", "--out", str(victim), "--deterministic", *_overrides("pretrain", tiny_dataset))
    # killed in its first epoch, before any checkpoint: --resume says to start again, and a new start in
    # the same folder drops the killed attempt's log records
    _kill_in_epoch(cmd, victim, epoch=0)
    assert records(victim, "step")
    if (victim / "last.pt").exists():  # the kill came late (a stalled machine): start over
        shutil.rmtree(victim)
    else:
        p = run(medhpm_cmd("pretrain", "--resume", str(victim)), check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert "last.pt does not exist" in p.stderr and "without --resume" in p.stderr
    _kill_and_resume("pretrain", cmd, victim)
    _assert_same_run("pretrain", pretrain_reference, victim)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run_finetune(pretrain_reference, tiny_dataset, tmp_path):
    init = str(pretrain_reference / "final.pt")
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    ov = _overrides("finetune", tiny_dataset)
    reference = subprocess.Popen(
        medhpm_cmd("finetune", "--init", init, "--out", str(ref), "--deterministic", *ov),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _kill_and_resume(
            "finetune", medhpm_cmd("finetune", "--init", init, "--out", str(victim), "--deterministic", *ov), victim
        )
        _, err = reference.communicate(timeout=RUN_TIMEOUT)
        assert reference.returncode == 0, err[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    _assert_same_run("finetune", ref, victim)
    va, vb = records(ref, "epoch"), records(victim, "epoch")
    assert [r["val_dice"] for r in vb] == [r["val_dice"] for r in va]
    # the resumed run still knows where its initial weights came from
    assert load_state(victim / "final.pt")["model_args"]["init"] == init
    assert json.loads((victim / "summary.json").read_text())["init"] == init


@pytest.mark.slow
def test_kill_between_last_and_final_checkpoint(pretrain_reference, tmp_path):
    """A kill after the last epoch's last.pt but before final.pt: --resume has no epoch left to train
    and must still write final.pt (it used to say "nothing to do" and leave none)."""
    victim = tmp_path / "victim"
    shutil.copytree(pretrain_reference, victim)
    (victim / "final.pt").unlink()
    p = run(medhpm_cmd("pretrain", "--resume", str(victim), "--deterministic"))
    assert "nothing to do" in p.stdout
    a, b = load_state(pretrain_reference / "final.pt"), load_state(victim / "final.pt")
    assert b["epoch"] == a["epoch"] and b["step"] == a["step"]
    assert_same_tensors(a["model"], b["model"], what="model")
    assert_same_tensors(a["teacher"], b["teacher"], what="EMA teacher")
    assert _steps(victim) == _steps(pretrain_reference)


WRITER = textwrap.dedent("""
    import sys, torch
    from medhpm.runtime.checkpoint import save_checkpoint
    path = sys.argv[1]
    data = torch.empty(25_000_000)  # 100 MB
    version = int(sys.argv[2])
    while True:
        version += 1
        data.fill_(float(version))
        save_checkpoint({"version": version, "data": data}, path)
        print(version, flush=True)
""")


def _check_checkpoint(path: Path, written: set[int]) -> int:
    from medhpm.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    v = state["version"]
    # a version the writer reported, or the one it was writing when killed (renamed, not yet reported)
    assert v in written or v == max(written) + 1, f"version {v} was never written ({sorted(written)[-3:]})"
    d = state["data"]
    assert d.numel() == 25_000_000 and bool((d == float(v)).all()), "checkpoint mixes two versions"
    return v


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    from medhpm.runtime.files import remove_stale_temps

    path = tmp_path / "last.pt"
    rng = random.Random(1234)
    written: set[int] = set()
    version = 0
    kills = 0
    for i in range(6):
        before = {p.name for p in tmp_path.iterdir()}
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(version)], env=child_env(), stdout=subprocess.PIPE, text=True
        )
        first = proc.stdout.readline()  # the writer is running and has written one version
        assert first.strip(), "the writer died"
        written.add(int(first))
        if i % 2:  # at a random moment: in a write, or between two
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # surely in a write: as soon as its temporary file appears
            deadline = time.monotonic() + 60
            while not ({p.name for p in tmp_path.iterdir()} - before - {path.name}) and time.monotonic() < deadline:
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        written.update(int(v) for v in rest.split())
        kills += proc.returncode == -signal.SIGKILL
        version = _check_checkpoint(path, written)  # the next writer continues from what is there
        # nothing but the checkpoint carries its name; leftovers are hidden temporary files
        for p in tmp_path.iterdir():
            if p != path:
                assert p.name.startswith(".last.pt.") and p.name.endswith(".tmp"), p.name
                assert not p.name.endswith(".pt")
    assert kills == 6
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert leftovers, "no kill landed in a write"
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    _check_checkpoint(path, written)


def test_remove_stale_temps_keeps_live_writers_and_other_files(tmp_path):
    from medhpm.runtime.files import atomic_path, remove_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".final.pt.{dead.pid}.abcdefgh.tmp"
    stale_png = tmp_path / f".x.png.{dead.pid}.a_b_c_d_.tmp.png"
    keep = [tmp_path / "final.pt", tmp_path / ".hidden", tmp_path / f".final.pt.{dead.pid}.tmp"]
    for p in [stale, stale_png, *keep]:
        p.write_bytes(b"x")
    with atomic_path(tmp_path / "live.pt") as tmp:  # a write in progress in this process
        tmp.write_bytes(b"y")
        assert sorted(remove_stale_temps(tmp_path)) == sorted([stale, stale_png])
        assert tmp.exists()
    assert sorted(tmp_path.iterdir()) == sorted([*keep, tmp_path / "live.pt"])
    # a restarted container often gives the new process the dead writer's id: at start-up the trainer
    # passes keep_own=False
    own = tmp_path / f".last.pt.{os.getpid()}.abcdefgh.tmp"
    own.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path, keep_own=False) == [own]
