"""``benchmarks/device/run.sh``, the one command for a GPU machine that reaches no package index: it checks
that every import the GPU benchmarks need works and that there is a GPU before it spends the machine's
minutes, says what is missing, and runs ``benchmarks.gpu_all`` with its output in ``$OUT``. Run here with
this environment's Python first on PATH (gpu_all only asked for ``--help``: its own test runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device" / "run.sh"


def _run(tmp_path, **env):
    e = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "OUT": str(tmp_path / "out"),
        "WHEELS": str(tmp_path / "no_wheels"),
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)


def test_ready_environment_runs_gpu_all_and_keeps_the_log(tmp_path):
    p = _run(tmp_path, REQUIRE_CUDA="0", GPU_ALL_ARGS="--help")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    check = (tmp_path / "out" / "device_check.txt").read_text()
    assert f"torch {torch.__version__}" in check and check.strip().endswith("ready")
    assert "--budget-s" in (tmp_path / "out" / "gpu_all.log").read_text()  # gpu_all's own usage text


def test_a_missing_package_stops_before_any_benchmark(tmp_path):
    shadow = tmp_path / "shadow" / "omegaconf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('omegaconf is not installed here')\n")
    p = _run(tmp_path, REQUIRE_CUDA="0", GPU_ALL_ARGS="--help", PYTHONPATH=str(shadow.parent))
    assert p.returncode == 4
    assert "NOT READY" in p.stdout and "omegaconf: ImportError: omegaconf is not installed here" in p.stdout
    assert "medhpm.pretrain.trainer" in p.stdout  # what needs it is named too
    assert not (tmp_path / "out" / "gpu_all.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_refused_by_default(tmp_path):
    p = _run(tmp_path, GPU_ALL_ARGS="--help")
    assert p.returncode == 4 and "no CUDA device" in p.stdout
    assert not (tmp_path / "out" / "gpu_all.log").exists()
