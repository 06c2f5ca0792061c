"""``runtime.compile``: the compiled training step (torch.compile with inductor, which runs on the CPU
too) gives the eager step's losses and weights within float tolerance, for pre-training (mae, hpm with
the teacher pass) and fine-tuning. Real trainers, two optimizer steps each, the micro model; one compile
per test (compiling is the slow part)."""

from __future__ import annotations

import re

import pytest
import torch

from runtime_helpers import assert_same_tensors, assert_same_updates, init_weights, load_state, records, tiny_overrides

pytestmark = pytest.mark.slow


def _run(stage: str, dataset, out, *more: str):
    from medhpm.config import load_config

    cfg = load_config(
        "demo",
        tiny_overrides(dataset, f"{stage}.epochs=1", f"{stage}.steps_per_epoch=2", f"{stage}.batch_size=1", *more),
    )
    torch.set_num_threads(1)
    if stage == "pretrain":
        from medhpm.pretrain.trainer import PretrainTrainer

        PretrainTrainer(cfg, out).run()
    else:
        from medhpm.segment.trainer import FinetuneTrainer

        FinetuneTrainer(cfg, out).run()
    return load_state(out / "final.pt"), records(out, "step")


def _epoch_line(capsys, stage: str) -> str:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"[{stage}] epoch 1/1")]
    assert len(lines) == 1, lines
    return lines[0]


def _compare(stage, dataset, tmp_path, capsys, *more):
    from torch._dynamo.utils import counters

    capsys.readouterr()
    eager, e_steps = _run(stage, dataset, tmp_path / "eager", "runtime.compile=none", *more)
    eager_line = _epoch_line(capsys, stage)
    before = counters["stats"]["unique_graphs"]
    comp, c_steps = _run(stage, dataset, tmp_path / "compiled", "runtime.compile=default", *more)
    comp_line = _epoch_line(capsys, stage)
    assert counters["stats"]["unique_graphs"] > before, "nothing was compiled"
    # the epoch that compiled says so, with its first step's time, so the compile is not read as the pace
    assert re.search(r"first step \d+\.\ds, compiling it \(runtime\.compile=default\)", comp_line), comp_line
    assert "first step" not in eager_line and "compiling" not in eager_line, eager_line
    assert len(e_steps) == len(c_steps) == 2
    for key in [k for k in e_steps[0] if k.startswith("loss") or k == "grad_norm"]:
        assert [r[key] for r in c_steps] == pytest.approx([r[key] for r in e_steps], rel=1e-4, abs=1e-6), key
    # the weights after the second AdamW step, against what the steps moved them by
    assert_same_updates(eager["model"], comp["model"], init_weights(stage, dataset, *more), f"{stage} weights")
    return eager, comp


def test_compiled_hpm_step_equals_eager(tiny_dataset, tmp_path, capsys):
    eager, comp = _compare("pretrain", tiny_dataset, tmp_path, capsys, "pretrain.method=hpm")
    assert_same_tensors(eager["teacher"], comp["teacher"], atol=2e-5, rtol=1e-4, what="EMA teacher")


def test_compiled_mae_step_equals_eager(tiny_dataset, tmp_path, capsys):
    _compare("pretrain", tiny_dataset, tmp_path, capsys, "pretrain.method=mae")


def test_compiled_finetune_step_equals_eager(tiny_dataset, tmp_path, capsys):
    _compare("finetune", tiny_dataset, tmp_path, capsys)


def test_update_check_fails_wrong_steps_and_passes_rounding():
    """The weight check of the tests above, on made-up weights: rounding noise with one outlier passes; a
    skipped step, and a small layer or a bias stepped at half the rate, fail."""
    g = torch.Generator().manual_seed(0)
    shapes = {"big": (1000, 1000), "small": (32, 64), "bias": (64,)}
    init = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    step = {k: 1e-4 * torch.sign(torch.randn(s, generator=g)) for k, s in shapes.items()}
    eager = {k: init[k] + step[k] for k in shapes}
    noisy = {k: eager[k] + 1e-8 * torch.randn(shapes[k], generator=g) for k in shapes}
    noisy["big"][3, 7] += 5e-5  # one element whose update AdamW turned around
    assert_same_updates(eager, noisy, init, "rounding")
    with pytest.raises(AssertionError, match="of the update"):
        assert_same_updates(eager, init, init, "skipped step")
    with pytest.raises(AssertionError, match="of the update"):  # a 2048-element layer: seen in the norm
        assert_same_updates(eager, dict(noisy, small=init["small"] + 0.5 * step["small"]), init, "small layer")
    half = dict(noisy, bias=init["bias"] + 0.5 * step["bias"])  # 64 elements: too few for the norm
    with pytest.raises(AssertionError, match="elements differ"):
        assert_same_updates(eager, half, init, "one layer at half the rate")
