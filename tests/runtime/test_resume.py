"""Resume and determinism, through the real command line in deterministic CPU mode.

A run of 2 epochs extended with ``--resume RUN pretrain.epochs=3`` repeats nothing and continues exactly
where an uninterrupted 3-epoch run is after 2 epochs: the same losses at every step of epoch 3 and the
same final weights (bit for bit). Two runs with the same seed log identical losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime_helpers import assert_same_tensors, load_state, medhpm_cmd, records, run, run_parallel, tiny_overrides

pytestmark = pytest.mark.slow


def _steps(run_dir: Path, epoch: int | None = None) -> list[dict]:
    out = []
    for r in records(run_dir, "step"):
        if epoch is None or r["epoch"] == epoch:
            out.append({k: v for k, v in r.items() if not k.endswith("_time") and k != "time"})
    return out


def _continue(stage: str, dataset: Path, tmp: Path, extra: tuple[str, ...] = ()) -> tuple[Path, Path, str]:
    """(uninterrupted 3-epoch run, 2-epoch run resumed to 3 epochs, stdout of the resume)."""
    a, b = tmp / "a", tmp / "b"
    run_parallel(
        [
            medhpm_cmd(
                stage, "--out", str(a), "--deterministic", *tiny_overrides(dataset, f"{stage}.epochs=3", *extra)
            ),
            medhpm_cmd(
                stage, "--out", str(b), "--deterministic", *tiny_overrides(dataset, f"{stage}.epochs=2", *extra)
            ),
        ]
    )
    p = run(medhpm_cmd(stage, "--resume", str(b), "--deterministic", f"{stage}.epochs=3"))
    return a, b, p.stdout


@pytest.fixture(scope="module")
def pretrain_runs(tiny_dataset, tmp_path_factory):
    # the EMA schedule is a share of the run, so extending a run from 2 to 3 epochs changes it from then on
    # (as the cosine lr after warm-up): horizons under one step keep m = 0 for both runs, whatever their length
    return _continue(
        "pretrain",
        tiny_dataset,
        tmp_path_factory.mktemp("resume"),
        extra=("pretrain.ema_horizon_start=0.01", "pretrain.ema_horizon_end=0.01"),
    )


def test_pretrain_resume_gives_the_losses_of_an_uninterrupted_run(pretrain_runs):
    """The teacher is queried from masked views (the default), so this also says that a resumed run draws
    the same random view partitions as the uninterrupted one: its mined patches and weights are the same."""
    a, b, out = pretrain_runs
    assert "resumed from" in out and "at epoch 2" in out
    assert "teacher_view: masked" in (b / "config_pretrain.yaml").read_text()
    ea, eb = _steps(a, epoch=2), _steps(b, epoch=2)
    assert len(ea) == 3  # 5 volumes, batch 2: 3 steps per epoch
    assert eb == ea  # every logged value of epoch 3, exactly (teacher mining and HU stats included)
    assert _steps(b) == _steps(a)  # and the log reads as one run: no step twice
    fa, fb = load_state(a / "final.pt"), load_state(b / "final.pt")
    assert fa["step"] == fb["step"] == 9
    assert_same_tensors(fa["model"], fb["model"], what="student")
    assert_same_tensors(fa["teacher"], fb["teacher"], what="EMA teacher")
    for group_a, group_b in zip(fa["optimizer"]["state"].values(), fb["optimizer"]["state"].values()):
        assert_same_tensors(group_a, group_b, what="AdamW state")


def test_deterministic_runs_with_the_same_seed_log_identical_losses(pretrain_runs):
    """Runs a and b are two processes with the same seed; their first 2 epochs do not depend on the
    number of epochs (see tiny_overrides), so they must log the same values, bit for bit."""
    a, b, _ = pretrain_runs
    for epoch in (0, 1):
        la, lb = _steps(a, epoch), _steps(b, epoch)
        assert len(la) == 3
        assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # exactly, not approximately
        assert la == lb
    drop = ("time", "epoch_time", "data_time", "compute_time")
    ea = [{k: v for k, v in r.items() if k not in drop} for r in records(a, "epoch")[:2]]
    eb = [{k: v for k, v in r.items() if k not in drop} for r in records(b, "epoch")[:2]]
    assert ea == eb


def test_finetune_resume_gives_the_losses_of_an_uninterrupted_run(tiny_dataset, tmp_path):
    a, b, out = _continue("finetune", tiny_dataset, tmp_path)
    assert "resumed from" in out
    ea, eb = _steps(a, epoch=2), _steps(b, epoch=2)
    assert len(ea) == 2  # 4 training volumes (1 held out for validation), batch 2
    assert eb == ea
    va = [r for r in records(a, "epoch")]
    vb = [r for r in records(b, "epoch")]
    assert [r["epoch"] for r in vb] == [0, 1, 2]
    assert vb[-1]["val_dice"] == va[-1]["val_dice"]
    assert vb[-1]["best_val_dice"] == va[-1]["best_val_dice"]
    fa, fb = load_state(a / "final.pt"), load_state(b / "final.pt")
    assert_same_tensors(fa["model"], fb["model"], what="UNETR")
    assert fa["best_metric"] == fb["best_metric"]
