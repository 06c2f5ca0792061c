"""benchmarks/cpu_memory.py: the summary of its child processes (medians over every child's steps per policy,
ratios reuse / release, peak memory). The children's behaviour itself is tested in tests/runtime/test_cpu_memory.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import cpu_memory  # noqa: E402


def _child(policy, seconds, faults, rss):
    return {
        "policy": policy,
        "configured": {},
        "peak_rss_mib": rss,
        "steps": {"finetune/fp32": [{"s": s, "minor_faults": f, "sys_s": 0.01} for s, f in zip(seconds, faults)]},
    }


def test_summary_pools_the_rounds_and_divides_reuse_by_release():
    children = [
        _child("release", [0.60, 0.64], [40000, 44000], 1200.0),
        _child("reuse", [0.50, 0.56], [0, 10], 1300.0),
        _child("release", [0.62, 0.70], [42000, 50000], 1250.0),
        _child("reuse", [0.52, 0.54], [0, 0], 1280.0),
    ]
    out = cpu_memory.summarise(children)
    r = out["results"]["finetune/fp32"]
    # pooled steps: release 0.60 0.62 0.64 0.70 -> upper median 0.64; reuse 0.50 0.52 0.54 0.56 -> 0.54
    assert r["release"]["median_s"] == 0.64 and r["reuse"]["median_s"] == 0.54
    assert r["release"]["steps"] == r["reuse"]["steps"] == 4
    assert r["ratio_reuse_vs_release"] == pytest.approx(0.54 / 0.64)
    assert r["release"]["median_minor_faults"] == 44000 and r["reuse"]["median_minor_faults"] == 0
    # peak memory: the median over the children of each policy (upper of two)
    assert out["peak_rss_mib"]["release"] == 1250.0 and out["peak_rss_mib"]["reuse"] == 1300.0
    assert out["peak_rss_mib"]["ratio_reuse_vs_release"] == pytest.approx(1300 / 1250)
