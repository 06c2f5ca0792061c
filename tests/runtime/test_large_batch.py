"""The large-batch recipe of docs/PERFORMANCE.md: at batch 64 on one device the trainer scales the lr
linearly (lr x effective batch / lr_ref_batch) and, since the warm-up is set in epochs and a larger batch
makes fewer optimizer steps per epoch over the same volumes, the warm-up has fewer steps. The expected
figures are worked out here from the data set size, not taken from the trainer."""

from __future__ import annotations

import math
import re

import pytest

from runtime_helpers import tiny_overrides

VOLUMES = 5  # tiny_dataset; pre-training uses every training volume
LR, REF, WARMUP = 1.5e-4, 16, 10


def _setup(dataset, out, batch, num_samples, capsys):
    from medhpm.config import load_config
    from medhpm.pretrain.trainer import PretrainTrainer

    cfg = load_config(
        "demo",
        tiny_overrides(
            dataset,
            f"pretrain.batch_size={batch}",
            f"data.num_samples={num_samples}",
            f"pretrain.lr={LR}",
            f"pretrain.lr_ref_batch={REF}",
            f"pretrain.warmup_epochs={WARMUP}",
            "pretrain.epochs=100",
        ),
    )
    t = PretrainTrainer(cfg, out)
    t.setup()
    t.logger.close()
    return t, capsys.readouterr().out


@pytest.mark.parametrize("batch,num_samples", [(16, 16), (64, 16)])
def test_lr_and_warmup_steps_at_a_large_batch(batch, num_samples, tiny_dataset, tmp_path, capsys):
    from medhpm.runtime.schedules import cosine_lr

    t, out = _setup(tiny_dataset, tmp_path / "run", batch, num_samples, capsys)
    lr = LR * batch / REF  # linear scaling: batch 64 -> 4 x the lr set for batch 16
    volumes_per_step = batch // num_samples
    steps = -(-VOLUMES // volumes_per_step)  # the last, partial batch is a step too
    warm = WARMUP * steps
    assert t.base_lr == pytest.approx(lr) and t.steps_per_epoch == steps
    line = re.search(
        r"lr ([\d.e-]+) x (\d+)/(\d+) = ([\d.e-]+); (\d+) optimizer steps per epoch.*warm-up 10 epochs = "
        r"(\d+) optimizer steps",
        out,
    )
    assert line, out
    assert (float(line[1]), int(line[2]), int(line[3])) == (LR, batch, REF)
    assert float(line[4]) == pytest.approx(lr, rel=1e-2) and int(line[5]) == steps and int(line[6]) == warm
    # the schedule the loop follows: step j (0-based) has epoch_f = j / steps_per_epoch; linear warm-up
    for j in (0, 1, warm - 1, warm):
        expect = lr * min(j / warm, 1.0)
        assert cosine_lr(j / steps, t.base_lr, 0.0, WARMUP, 100) == pytest.approx(expect, rel=1e-6, abs=1e-12)
    if batch == 64:  # 4x the batch: 4x the lr, a quarter of the steps per epoch and of the warm-up steps
        assert (steps, warm) == (2, 20) and math.isclose(lr, 6e-4)
    else:
        assert (steps, warm) == (5, 50)
