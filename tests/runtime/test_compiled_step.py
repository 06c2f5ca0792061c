"""``runtime.compile``: the compiled training step (torch.compile with inductor, which runs on the CPU
too) gives the eager step's losses and weights within float tolerance, for pre-training (mae, hpm with
the teacher pass) and fine-tuning. Real trainers, two optimizer steps each, the micro model; one compile
per test (compiling is the slow part)."""

from __future__ import annotations

import shutil

import pytest
import torch

from runtime_helpers import assert_same_tensors, load_state, records, tiny_overrides

pytestmark = pytest.mark.slow


def _run(stage: str, dataset, out, *more: str):
    from medhpm.config import load_config

    cfg = load_config("demo", tiny_overrides(dataset, f"{stage}.epochs=1", f"{stage}.steps_per_epoch=2",
                                             f"{stage}.batch_size=1", *more))
    torch.set_num_threads(1)
    if stage == "pretrain":
        from medhpm.pretrain.trainer import PretrainTrainer

        PretrainTrainer(cfg, out).run()
    else:
        from medhpm.segment.trainer import FinetuneTrainer

        FinetuneTrainer(cfg, out).run()
    return load_state(out / "final.pt"), records(out, "step")


def _compare(stage, dataset, tmp_path, *more, atol=2e-5):
    from torch._dynamo.utils import counters

    eager, e_steps = _run(stage, dataset, tmp_path / "eager", "runtime.compile=none", *more)
    before = counters["stats"]["unique_graphs"]
    comp, c_steps = _run(stage, dataset, tmp_path / "compiled", "runtime.compile=default", *more)
    assert counters["stats"]["unique_graphs"] > before, "nothing was compiled"
    assert len(e_steps) == len(c_steps) == 2
    for key in [k for k in e_steps[0] if k.startswith("loss") or k == "grad_norm"]:
        assert [r[key] for r in c_steps] == pytest.approx([r[key] for r in e_steps], rel=1e-4, abs=1e-6), key
    # the weights after the second AdamW step; a lr of 1e-2 makes every update visible
    assert not torch.equal(eager["model"][next(iter(eager["model"]))], _init_weights(stage, dataset, tmp_path))
    assert_same_tensors(eager["model"], comp["model"], atol=atol, rtol=1e-4, what=f"{stage} weights")
    return eager, comp


def _init_weights(stage, dataset, tmp_path):
    """The first weight tensor before training (seeded build), to show the two steps moved it."""
    from medhpm.config import load_config
    from medhpm.runtime.seed import seed_everything

    cfg = load_config("demo", tiny_overrides(dataset))
    seed_everything(cfg.seed, False)
    if stage == "pretrain":
        from medhpm.pretrain.trainer import build_pretrain_model

        model = build_pretrain_model(cfg)
    else:
        from medhpm.segment.trainer import build_segmentation_model

        model = build_segmentation_model(cfg)
    return next(iter(model.state_dict().values()))


def test_compiled_hpm_step_equals_eager(tiny_dataset, tmp_path):
    eager, comp = _compare("pretrain", tiny_dataset, tmp_path, "pretrain.method=hpm")
    assert_same_tensors(eager["teacher"], comp["teacher"], atol=2e-5, rtol=1e-4, what="EMA teacher")


def test_compiled_mae_step_equals_eager(tiny_dataset, tmp_path):
    _compare("pretrain", tiny_dataset, tmp_path, "pretrain.method=mae")


def test_compiled_finetune_step_equals_eager(tiny_dataset, tmp_path):
    _compare("finetune", tiny_dataset, tmp_path)
