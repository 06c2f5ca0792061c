"""``benchmarks/gpu_all.py --tiny`` runs every measurement of the GPU script on the CPU with the micro
model and writes a JSON with every part: steps (eager and compiled, batch 2 and the largest batch
found), FLOPs, loader rates, and the device sampler's availability."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_all_tiny_writes_every_measurement(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src") + ":" + str(REPO)}
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_all.py"), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_all_tiny.json").read_text())
    assert data["errors"] == {}, data["errors"]
    steps = data["steps"]
    for task in ("mae", "hpm", "finetune"):
        batches = sorted(v["batch"] for v in steps.values() if v["task"] == task)
        assert batches[0] == 2 and batches[-1] == 4  # batch 2 and the largest batch under the cap of 4
        for v in (s for s in steps.values() if s["task"] == task):
            assert set(v["modes"]) == {"none", "default"}
            for m in v["modes"].values():
                assert m["ms_per_step"] > 0 and m["crops_per_s"] > 0 and m["flops_per_step"] > 0
                assert m["crops_per_s"] == pytest.approx(v["batch"] / m["s_per_step"])
                assert m["mfu"] is None  # no peak on the CPU
    assert steps["hpm/b2"]["hpm_over_mae_per_step"] > 0
    # hpm does more work than mae (teacher pass, loss predictor): counted, not timed
    assert steps["hpm/b2"]["modes"]["none"]["flops_per_step"] > steps["mae/b2"]["modes"]["none"]["flops_per_step"]
    loader = data["loader"]
    assert loader["monai_memory_w0"]["crops_per_s"] > 0 and loader["monai_memory_w1"]["crops_per_s"] > 0
    assert isinstance(loader["device_sampler"]["available"], bool)


def test_step_jobs_put_the_issue_figures_first():
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_all import step_jobs

    jobs = step_jobs(["mae", "hpm", "finetune"], ["none", "default", "reduce-overhead", "max-autotune"])
    # hpm then fine-tuning then mae, each eager vs CUDA graphs at the base and the largest batch
    assert jobs[:6] == [
        (t, w, ["none", "reduce-overhead"]) for t in ("hpm", "finetune", "mae") for w in ("base", "largest")
    ]
    # then the other modes at the base batch, max-autotune (the longest compile) last
    assert jobs[6:] == [
        (t, "base", ["none", m]) for m in ("default", "max-autotune") for t in ("hpm", "finetune", "mae")
    ]
    # without reduce-overhead the first compiled mode stands in; eager alone gives eager jobs only
    assert step_jobs(["hpm"], ["none", "default"]) == [
        ("hpm", "base", ["none", "default"]),
        ("hpm", "largest", ["none", "default"]),
    ]
    assert step_jobs(["hpm"], ["none"]) == [("hpm", "base", ["none"]), ("hpm", "largest", ["none"])]


def test_gpu_all_with_no_budget_left_writes_what_it_skipped(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src") + ":" + str(REPO)}
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_all.py"),
            "--tiny",
            "--device",
            "cpu",
            "--budget-s",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_all_tiny.json").read_text())
    assert data["errors"] == {} and data["steps"] == {}
    assert data["skipped"] == [
        f"steps {t}/{w} none+default" for t in ("hpm", "finetune", "mae") for w in ("base", "largest")
    ] + ["loader"]
