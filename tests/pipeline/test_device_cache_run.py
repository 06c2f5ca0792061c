"""Tiny pre-training and fine-tuning runs with data.cache=device: the trainers take the device sampler's
batches unchanged, the losses stay finite and the checkpoints are written."""

from __future__ import annotations

import math

import pytest

from medhpm.config import load_config
from medhpm.pretrain.trainer import pretrain
from medhpm.runtime.checkpoint import load_checkpoint
from medhpm.runtime.logging import read_metrics
from medhpm.segment.trainer import finetune

from pipeline_settings import TINY

DEVICE = ["data.cache=device", "data.flip_prob=0.2", "data.rot90_prob=0.2"]


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step" and "loss" in r]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_tiny_run_trains_from_the_device_sampler(tiny_phantoms, tmp_path, stage):
    common = TINY + DEVICE + [f"data.dataset={tiny_phantoms}", "runtime.log_every=1", "runtime.device=cpu"]
    if stage == "pretrain":
        cfg = load_config("demo", common + ["pretrain.method=hpm", "pretrain.epochs=2", "pretrain.steps_per_epoch=3"])
        run = pretrain(cfg, tmp_path / "pt")
    else:
        cfg = load_config(
            "demo",
            common + ["finetune.epochs=2", "finetune.steps_per_epoch=3", "finetune.val_every=2", "data.crop=classes"],
        )
        run = finetune(cfg, tmp_path / "ft", init="none")
    losses = _losses(run)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    ck = load_checkpoint(run / "final.pt", stage=stage)
    assert ck["epoch"] == 1 and ck["config"]["data"]["cache"] == "device"
