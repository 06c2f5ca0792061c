"""The README's main job at its smoke size: `medhpm demo --quick` end to end, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "medhpm.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # every stage reports its time, and the run folder layout is printed at the end
    for stage in (
        "phantom CT data",
        "self-pre-training (hpm)",
        "UNETR fine-tuning",
        "prediction of the test scans",
        "evaluation (Dice, HD95)",
        "figures and report",
    ):
        assert re.search(rf"=== {re.escape(stage)}: done in [0-9.]+ s ===", r.stdout), stage
    assert "report.html" in r.stdout and "run folder" in r.stdout
    timings = json.loads((out / "timings.json").read_text())
    assert timings["total"] > 0

    # predictions of the held-out test phantoms, each in its scan's own geometry
    dl = json.loads((out / "phantom" / "dataset.json").read_text())
    assert dl["test"]
    for e in dl["test"]:
        src = nib.load(str(out / "phantom" / e["image"]))
        pred = nib.load(str(out / "predictions" / Path(e["image"]).name))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)

    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"1", "2", "3", "4", "6", "7", "8", "11"}
    assert "hd95" in json.dumps(metrics["conventions"]).lower()

    # the report: one self-contained page with the figures embedded and the Table-1-style table
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "Avg DSC / HD95" in html and "Spleen" in html and "Pancreas" in html
    assert "Resolved configuration" in html and "Run times" in html
    assert (out / "pretrain" / "encoder.safetensors").exists() and (out / "finetune" / "best.pt").exists()

    # the same demo again: every finished stage is kept with the time it took, and timings.json keeps them
    r1 = subprocess.run(
        [sys.executable, "-m", "medhpm.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    kept = (
        "phantom CT data",
        "self-pre-training (hpm)",
        "UNETR fine-tuning",
        "prediction of the test scans",
        "evaluation (Dice, HD95)",
    )
    for n, stage in enumerate(kept, start=1):
        assert f"=== [{n}/6] {stage}: done before (in {timings[stage]:.1f} s), kept ===" in r1.stdout, stage
    assert "=== [6/6] figures and report ===" in r1.stdout and "5 stages done before" in r1.stdout
    again = json.loads((out / "timings.json").read_text())
    assert {k: again[k] for k in kept} == {k: timings[k] for k in kept}
    assert again["total"] >= sum(timings[k] for k in kept)
    assert json.loads((out / "evaluation" / "metrics.json").read_text()) == metrics

    # the folder is resumable, so a default demo into it must refuse rather than report the quick results
    r2 = subprocess.run(
        [sys.executable, "-m", "medhpm.cli", "demo", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert r2.returncode != 0
    msg = r2.stdout + r2.stderr
    assert "demo_settings.json" in msg and "'quick': True" in msg and "--out" in msg
    assert json.loads((out / "evaluation" / "metrics.json").read_text()) == metrics  # nothing overwritten


def test_stage_times_are_recorded_after_each_stage_and_kept_when_skipped(tmp_path, capsys):
    """A call cut short keeps the times of the stages it finished; the next call skips them with those."""
    from medhpm.pipeline import Stages

    record = tmp_path / "timings.json"
    first = Stages(3, record=record)
    first.run("a", lambda: None)
    assert set(json.loads(record.read_text())) == {"a"}  # written before the next stage starts
    with pytest.raises(KeyboardInterrupt):  # the call cut short in its second stage
        first.run("b", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    took_a = json.loads(record.read_text())["a"]
    second = Stages(3, record=record)
    second.skip("a")
    second.run("b", lambda: None)
    second.skip("c")  # done before, but never timed: kept without a time
    assert second.kept == ["a", "c"] and second.times["a"] == took_a and "c" not in second.times
    out = capsys.readouterr().out
    assert f"=== [1/3] a: done before (in {took_a:.1f} s), kept ===" in out
    assert "=== [3/3] c: done before, kept ===" in out
    assert set(json.loads(record.read_text())) == {"a", "b"}
