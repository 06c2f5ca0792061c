"""No host sync inside a log interval: one epoch of hpm pre-training (teacher pass and mining at every
step) and of fine-tuning, 6 optimizer steps, ``runtime.log_every=3``. Every value read back to Python
inside ``train_one_epoch`` is counted (:mod:`sync_count`); the steps themselves read nothing and the
values are read once per log interval (one ``tolist`` of one stacked tensor: 2 reads)."""

from __future__ import annotations

import pytest

from runtime_helpers import records, tiny_overrides
from sync_count import count_run

STEPS, LOG_EVERY = 6, 3


def _trainer(stage, dataset, out, *more):
    from medhpm.config import load_config

    cfg = load_config(
        "demo",
        tiny_overrides(
            dataset,
            f"{stage}.epochs=1",
            f"{stage}.steps_per_epoch={STEPS}",
            f"{stage}.batch_size=1",
            f"runtime.log_every={LOG_EVERY}",
            *more,
        ),
    )
    if stage == "pretrain":
        from medhpm.pretrain.trainer import PretrainTrainer

        return PretrainTrainer(cfg, out)
    from medhpm.segment.trainer import FinetuneTrainer

    return FinetuneTrainer(cfg, out)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_no_sync_in_a_step_one_read_per_log_interval(stage, tiny_dataset, tmp_path):
    counter = count_run(_trainer(stage, tiny_dataset, tmp_path / "run"))
    assert counter.count("step") == 0, dict(counter.calls)
    flushes = STEPS // LOG_EVERY
    # one .cpu() and one .tolist() of the stacked values per log interval, nothing else
    assert dict(counter.calls) == {("flush", "cpu"): flushes, ("flush", "tolist"): flushes}
    steps = records(tmp_path / "run", "step")
    assert [r["step"] for r in steps] == [3, 6]  # every log_every-th step logged, with its values
    assert all(isinstance(r["loss"], float) and r["grad_norm"] > 0 for r in steps)
    if stage == "pretrain":
        assert all(r["n_hard"] > 0 and "hu_hard_mean" in r for r in steps)
    epoch = records(tmp_path / "run", "epoch")[0]
    assert epoch["steps"] == STEPS and epoch["loss"] > 0
