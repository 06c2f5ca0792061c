"""benchmarks/cpu_quota.py: the cgroup it makes carries the quota asked for, and its summary pools the children's
steps per mode. What the children do in the cgroup (torch capped at the quota) is tested with a real cgroup
in tests/runtime/test_threads.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import cpu_quota  # noqa: E402


def test_the_cgroup_holds_the_quota_asked_for():
    try:
        group = cpu_quota.make_cgroup(0.5)
    except SystemExit as e:
        pytest.skip(str(e))
    try:
        if (group / "cpu.max").exists():
            quota, period = (group / "cpu.max").read_text().split()
        else:
            quota, period = (group / "cpu.cfs_quota_us").read_text(), (group / "cpu.cfs_period_us").read_text()
        assert int(quota) / int(period) == 0.5
    finally:
        group.rmdir()
    assert not group.exists()


def test_summary_pools_the_rounds_and_divides_capped_by_torch():
    children = [
        {"mode": "torch", "steps": {"finetune/fp32": [1.0, 1.4]}},
        {"mode": "capped", "steps": {"finetune/fp32": [0.7, 0.9]}},
        {"mode": "capped", "steps": {"finetune/fp32": [0.8, 0.6]}},
        {"mode": "torch", "steps": {"finetune/fp32": [1.2, 1.1]}},
    ]
    r = cpu_quota.summarise(children)["finetune/fp32"]
    # torch 1.0 1.1 1.2 1.4 -> upper median 1.2; capped 0.6 0.7 0.8 0.9 -> 0.8
    assert r["torch"]["median_s"] == 1.2 and r["capped"]["median_s"] == 0.8
    assert r["ratio_capped_vs_torch"] == pytest.approx(0.8 / 1.2)
    assert sorted(r["torch"]["samples_s"]) == [1.0, 1.1, 1.2, 1.4]
