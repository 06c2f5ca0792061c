"""The experiment runner end to end at a tiny size: runs per method and seed, tables, resumable."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from pipeline_settings import TINY


def test_experiment_runs_tables_and_skips_finished_runs(tiny_phantoms, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "tiny_experiment",
                "base": "demo",
                "methods": ["scratch", "hpm", "unet"],
                "seeds": [0],
                "overrides": TINY
                + [
                    f"data.dataset={tiny_phantoms}",
                    "pretrain.epochs=1",
                    "pretrain.steps_per_epoch=3",
                    "finetune.epochs=1",
                    "finetune.steps_per_epoch=3",
                    "finetune.val_every=1",
                    # the default (None): the U-Net row once crashed saving its checkpoint with it
                    "model.skip_blocks=null",
                ],
            }
        )
    )
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "medhpm.cli", "experiment", "--config", str(spec), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "results.md").read_text()
    assert "| UNETR |" in md and "| UNETR+HPM |" in md and "| U-Net (DynUNet) |" in md and "Avg DSC / HD95" in md
    assert "| hpm |" in md  # pre-training cost row
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"scratch", "hpm", "unet"}
    for m in ("scratch", "hpm", "unet"):
        assert (out / "runs" / m / "seed0" / "evaluation" / "metrics.json").exists()
    assert not (out / "runs" / "scratch" / "seed0" / "pretrain").exists()
    assert not (out / "runs" / "unet" / "seed0" / "pretrain").exists()
    # each run recorded its stage times; the budget table reads them (hpm: 3 pre-training steps, 3 fine-tuning)
    hpm_times = json.loads((out / "runs" / "hpm" / "seed0" / "timings.json").read_text())
    assert set(hpm_times) == {
        "self-pre-training (hpm)",
        "UNETR fine-tuning",
        "prediction of the test scans",
        "evaluation (Dice, HD95)",
    } and all(v > 0 for v in hpm_times.values())
    assert res["budget"]["timed_runs"] == 3 and res["budget"]["methods"]["hpm"]["pretrain_steps"] == [3]
    assert "## Budget and wall time" in md and "| UNETR+HPM | 3 | 3 |" in md
    # a second call finds every run finished and only rewrites the tables
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 3
