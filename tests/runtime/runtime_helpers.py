"""Helpers of the scale and fault tests: run the real ``medhpm`` command line in subprocesses (plain
Python or ``torchrun``) with tiny settings, read their logs and checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from testkit import LIVER_AND_SPLEEN, synthetic_ct, tiny_settings

# Generous: a loaded 2-core CI machine may run several of these at once.
RUN_TIMEOUT = 300


def synthetic_case(seed: int, shape=(40, 40, 24)):
    """int16 HU volume (air, an elliptic body, two organ blobs) and its uint8 label map (BTCV values:
    1 spleen, 6 liver): the shared synthetic CT with liver and spleen."""
    return synthetic_ct(shape, seed, LIVER_AND_SPLEEN, body_hu=30.0, noise_hu=15.0, jitter=0.1)


def tiny_overrides(dataset: Path, *more: str) -> list[str]:
    """``key=value`` overrides for seconds-long runs on CPU; ``more`` (``key=value``) replace or add.

    Every augmentation is off and the 32^3 crop is the whole padded volume, so the data a process sees
    does not depend on its rank or on the random stream. The lr warm-up (10 epochs) outlasts every run
    and alpha_0 == alpha_T, so the schedules do not depend on the number of epochs: a 2-epoch run
    extended to 3 with ``--resume`` must equal a 3-epoch run. alpha > 0 from the start, so the EMA teacher
    mines hard patches at every step."""
    return tiny_settings(
        dataset,
        *more,
        **{
            "data.crop": "random",
            "data.flip_prob": 0.0,
            "data.rot90_prob": 0.0,
            "data.intensity_scale_prob": 0.0,
            "data.intensity_shift_prob": 0.0,
            "pretrain.method": "hpm",
            "pretrain.epochs": 2,
            "pretrain.batch_size": 2,
            "pretrain.lr": 1e-2,
            "pretrain.warmup_epochs": 10,
            "pretrain.alpha_0": 0.5,
            "pretrain.alpha_T": 0.5,
            "pretrain.ema_horizon_start": 0.5,  # a few steps in all: horizons of 0.5 and 1 run, m well above 0
            "pretrain.ema_horizon_end": 1.0,
            "pretrain.ema_ramp": 1.0,
            "finetune.epochs": 2,
            "finetune.batch_size": 2,
            "finetune.lr": 1e-2,
            "finetune.warmup_epochs": 10,
            "finetune.num_classes": 7,
            "finetune.drop_path": 0.0,
        },
    )


def child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEDHPM_DEBUG="0")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def medhpm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "medhpm.cli", *args]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    with socket.socket() as s:  # a free port (a --standalone rendezvous also works, this is simpler to debug)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "medhpm.cli",
        *args,
    ]


def run(cmd: list[str], cwd: Path | None = None, check: bool = True, timeout: float = RUN_TIMEOUT):
    p = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"command failed ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}"
            f"\n--- stderr\n{p.stderr[-4000:]}"
        )
    return p


def run_parallel(cmds: list[list[str]], check: bool = True, timeout: float = RUN_TIMEOUT):
    """Run independent commands at the same time (their start-up, mostly imports, overlaps)."""
    procs = [
        subprocess.Popen(c, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    out = []
    try:
        for c, p in zip(cmds, procs):
            stdout, stderr = p.communicate(timeout=timeout)
            res = subprocess.CompletedProcess(c, p.returncode, stdout, stderr)
            if check and p.returncode != 0:
                raise AssertionError(
                    f"command failed ({p.returncode}): {' '.join(c)}\n--- stdout\n"
                    f"{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
                )
            out.append(res)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    from medhpm.runtime.logging import read_metrics

    recs = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [r for r in recs if kind is None or r.get("kind") == kind]


def load_state(path: Path) -> dict:
    from medhpm.runtime.checkpoint import load_checkpoint

    return load_checkpoint(path)


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0, what: str = "weights"):
    import torch

    assert a.keys() == b.keys(), f"{what}: different keys"
    worst = (0.0, None)
    for k in a:
        ta, tb = a[k], b[k]
        if not torch.is_tensor(ta):
            continue
        assert ta.shape == tb.shape, f"{what}[{k}]: shape {tuple(ta.shape)} vs {tuple(tb.shape)}"
        if ta.is_floating_point():
            d = float((ta - tb).abs().max()) if ta.numel() else 0.0
            if d > worst[0]:
                worst = (d, k)
            assert torch.allclose(ta, tb, atol=atol, rtol=rtol), f"{what}[{k}] differs by up to {d:g}"
        else:
            assert torch.equal(ta, tb), f"{what}[{k}] differs"
    return worst


def assert_same_updates(
    ref: dict, other: dict, init: dict, what: str, atol=2e-5, rtol=1e-4, max_rel=1e-2, max_outside=1e-5
):
    """Run ``other`` moved the weights (state dicts) as run ``ref`` did, both from ``init``, up to float
    rounding amplified by AdamW.

    A compiled step (inductor) or a gradient all-reduce sums in another order than the eager or
    one-process step, so the gradients agree to rounding, not exactly. AdamW divides each gradient element
    by its own running magnitude: where an element's gradient is itself at rounding level, its update can
    differ by a good part of the step (seen on an Intel Xeon with AVX-512: one element of 2.4 M off by
    2.5e-5 where the steps moved it 5-8e-5). So two conditions, each of which a wrong step fails: (1) over
    all weights, the norm of the difference between the runs is at most ``max_rel`` of the norm of what
    ``ref`` moved them (a skipped step or a wrong gradient gives about 1; measured 0.0016 for a compiled
    step on that Xeon); (2) at most a ``max_outside`` share of the elements (at least one) lie outside
    ``atol`` / ``rtol`` (a layer or bias stepped wrongly puts all of its elements there). Returns the
    relative difference of (1)."""
    import torch

    diff2 = moved2 = 0.0
    outside, total, worst = 0, 0, (0.0, "none")
    assert ref.keys() == other.keys(), f"{what}: different keys"
    for k, a in ref.items():
        if not (torch.is_tensor(a) and a.is_floating_point()) or not a.numel():
            continue
        d = (a - other[k]).double().abs()
        diff2 += float((d * d).sum())
        moved2 += float(((a - init[k]).double() ** 2).sum())
        outside += int((d > atol + rtol * a.double().abs()).sum())
        total += a.numel()
        worst = max(worst, (float(d.max()), k))
    assert moved2 > 0, f"{what}: the reference run did not move the weights"
    rel = (diff2 / moved2) ** 0.5
    assert rel <= max_rel, f"{what}: the runs differ by {rel:.3g} of the update (largest at {worst[1]}: {worst[0]:g})"
    allowed = max(1, int(max_outside * total))
    assert outside <= allowed, (
        f"{what}: {outside} of {total} elements differ by more than atol {atol:g} / rtol "
        f"{rtol:g} (allowed {allowed}; largest at {worst[1]}: {worst[0]:g})"
    )
    return rel


def init_weights(stage, dataset, *more):
    """The model's weights before training (the trainers' seeded build, with the run's overrides)."""
    from medhpm.config import load_config
    from medhpm.runtime.seed import seed_everything

    cfg = load_config("demo", tiny_overrides(dataset, *more))
    seed_everything(cfg.seed, False)
    if stage == "pretrain":
        from medhpm.pretrain.trainer import build_pretrain_model

        model = build_pretrain_model(cfg)
    else:
        from medhpm.segment.trainer import build_segmentation_model

        model = build_segmentation_model(cfg)
    return model.state_dict()
