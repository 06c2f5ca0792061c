"""A tiny fine-tuning checkpoint on three small phantoms, made once for the prediction-output tests."""

from __future__ import annotations

import pytest

# A micro ViT on 32^3 crops of 6 mm voxels (as the pipeline tests), two optimiser steps: what the output tests
# need is a real checkpoint, not a good model.
SEG_TINY = [
    "model.preset=micro",
    "model.patch_size=8",
    "data.roi=[32,32,32]",
    "data.spacing=[6.0,6.0,6.0]",
    "model.decoder_dim=48",
    "model.decoder_heads=4",
    "model.decoder_depth=1",
    "model.feature_size=8",
    "model.skip_blocks=[4,8]",
    "data.num_samples=1",
    "finetune.batch_size=1",
    "data.flip_prob=0",
    "data.rot90_prob=0",
    "data.cache=none",
    "runtime.progress=false",
    "runtime.threads=1",
    "runtime.device=cpu",
    "finetune.epochs=1",
    "finetune.steps_per_epoch=2",
    "finetune.val_every=1",
    "finetune.warmup_epochs=0",
    "inference.sw_batch_size=1",
    "runtime.precision=fp32",  # not the demo's bf16-native: same arithmetic on any CPU
]


@pytest.fixture(scope="session")
def seg_phantoms(tmp_path_factory):
    """dataset.json of three small phantoms (BTCV labels), one of them the test case."""
    from medhpm.data.phantom import write_phantom_dataset

    return write_phantom_dataset(
        tmp_path_factory.mktemp("seg_phantoms"), cases=3, seed=5, size=(40, 40, 24), split=(0.34, 0.33, 0.33)
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(seg_phantoms, tmp_path_factory):
    """best.pt of a two-step fine-tuning run on ``seg_phantoms``."""
    from medhpm.config import load_config
    from medhpm.segment.trainer import finetune

    cfg = load_config("demo", SEG_TINY + [f"data.dataset={seg_phantoms}"])
    run = finetune(cfg, tmp_path_factory.mktemp("seg_ft"), init="none")
    return run / "best.pt"
