"""Smoke test of the benchmark suite: runs every benchmark at the "smoke" size into a temporary folder and
checks the JSON schema. Never asserts a timing: ratios only have to be positive finite numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.common import SCHEMA  # noqa: E402

TOP_KEYS = {
    "schema",
    "name",
    "device",
    "size",
    "created",
    "duration_s",
    "machine",
    "title",
    "measures",
    "settings",
    "results",
    "ratios",
}
MACHINE_KEYS = {"cpu", "logical_cores", "usable_cores", "torch", "monai", "threads", "device", "python"}


def _positive_finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # one thread: a busy shared machine would otherwise make the tiny steps crawl (OpenMP barriers)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--size",
        "smoke",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--no-memory",
        "--quiet",
        "--results-dir",
        str(out),
        "--docs",
        str(out / "PERFORMANCE.md"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_every_benchmark_writes_a_valid_json(smoke_run):
    files = sorted(smoke_run.glob("*.json"))
    assert {f.name for f in files} == {f"{name}_cpu_smoke.json" for name in BENCHMARKS}
    for f in files:
        doc = json.loads(f.read_text())
        assert TOP_KEYS <= doc.keys(), (f.name, TOP_KEYS - doc.keys())
        assert doc["schema"] == SCHEMA and doc["device"] == "cpu" and doc["size"] == "smoke"
        assert MACHINE_KEYS <= doc["machine"].keys()
        assert doc["results"] and doc["ratios"]
        for key, r in doc["results"].items():
            assert _positive_finite(r["wall_s"]["median"]), (f.name, key)
            assert r["wall_s"]["n"] == len(r["wall_s"]["samples"]) >= 1
        for r in doc["ratios"]:
            assert {"name", "numerator", "denominator", "ratio", "target", "meets_target"} <= r.keys()
            assert _positive_finite(r["ratio"]), (f.name, r)
            assert r["numerator"] in doc["results"] and r["denominator"] in doc["results"]


def test_step_benchmarks_report_flops_and_phases(smoke_run):
    pre = json.loads((smoke_run / "pretrain_step_cpu_smoke.json").read_text())
    for key, r in pre["results"].items():
        assert _positive_finite(r["flops_per_step"]), key
        assert _positive_finite(r["achieved_tflops"]), key
        assert r["mfu"] is None  # no peak on a CPU
    hpm = pre["results"]["micro/hpm_a0.5"]["phases_s"]
    assert {"forward", "teacher_pass", "backward", "optimizer", "ema"} <= hpm.keys()
    assert "teacher_pass" not in pre["results"]["micro/hpm_a0"]["phases_s"]  # alpha 0 skips the teacher
    # the masked teacher view: the step, the teacher pass alone, and their ratios
    assert pre["settings"]["teacher_views"] == 4  # default_teacher_views(0.75)
    assert "teacher_pass" in pre["results"]["micro/hpm_a0.5_masked"]["phases_s"]
    res = pre["results"]
    for view in ("full", "masked"):
        assert res[f"micro/teacher_{view}"]["spec"]["view"] == view
        assert "teacher_pass" in res[f"micro/teacher_{view}"]["phases_s"]
    # counted, not timed: the masked view runs the predictor over all N positions of each of its V views
    assert res["micro/teacher_masked"]["flops_per_step"] > res["micro/teacher_full"]["flops_per_step"]
    names = {r["name"]: r for r in pre["ratios"]}
    for name in (
        "micro: hpm_a0.5 / mae",
        "micro: hpm_a0 / mae",
        "micro: hpm_a0.5_masked / mae",
        "micro: hpm_a0.5_masked / hpm_a0.5",
        "micro: teacher_masked / teacher_full",
        "micro: teacher_pass of hpm_a0.5_masked / hpm_a0.5",
        "micro: hpm_a0.5_fused / hpm_a0.5",
    ):
        assert name in names, (name, sorted(names))
    assert names["micro: teacher_pass of hpm_a0.5_masked / hpm_a0.5"]["phase"] == "teacher_pass"


def test_demo_size_is_the_demo_configs_model():
    from benchmarks.pretrain_step import MASK_RATIO, SIZES
    from medhpm.config import load_config

    cfg = load_config("demo")
    s = SIZES["demo"]
    assert s["models"] == (cfg.model.preset,) and s["patch"] == cfg.model.patch_size
    assert [s["roi"]] * 3 == list(cfg.data.roi) and s["batch"] == cfg.pretrain.batch_size
    assert s["decoder"] == (cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads)
    assert MASK_RATIO == cfg.pretrain.mask_ratio


def test_docs_are_generated(smoke_run):
    text = (smoke_run / "PERFORMANCE.md").read_text()
    assert "## Headline figures" in text
    for name in BENCHMARKS:
        assert f"`{name}`" in text


def test_retired_benchmarks_keep_their_figures(tmp_path):
    """A retired benchmark's script and JSON are gone; its headline rows and Results section are rendered from
    ``report.RETIRED`` whatever JSON is present, next to the commit that measured it."""
    from benchmarks import report

    assert set(report.ORDER) == set(BENCHMARKS) | set(report.RETIRED)
    text = report.render(tmp_path)  # no JSON at all
    for name, frozen in report.RETIRED.items():
        assert name not in BENCHMARKS and not (ROOT / "benchmarks" / f"{name}.py").exists()
        assert not list((ROOT / "benchmarks" / "results").glob(f"{name}_*.json"))
        assert frozen["headline"] in text and frozen["results"] in text
        assert f"measured by `benchmarks/{name}.py`, retired; see commit" in text


def test_performance_md_is_what_the_report_renders():
    """docs/PERFORMANCE.md is regenerated by every ``python -m benchmarks`` run: text written into it by hand
    and not into benchmarks/report.py would be lost at the next run."""
    from benchmarks.common import DOCS_PATH, RESULTS_DIR
    from benchmarks.report import render

    assert render(RESULTS_DIR) == DOCS_PATH.read_text(), "edit benchmarks/report.py, then python -m benchmarks.report"


def test_memory_probe_runs_in_a_fresh_process(tmp_path):
    from benchmarks.common import Context, measure_memory

    ctx = Context(device="cpu", size="smoke", results_dir=tmp_path, verbose=False)
    spec = dict(preset="micro", roi=32, batch=1, decoder=[96, 1, 4], method="mae", alpha=0.0, fused=False)
    mem = measure_memory(ctx, "benchmarks.pretrain_step", spec, steps=1)
    assert "error" not in mem, mem
    assert _positive_finite(mem["peak_mib"]) and mem["peak_mib"] >= mem["static_mib"] >= 0
