"""A tiny `label_efficiency` experiment end to end: a grid over finetune.labelled_cases beside methods and
seeds, one pre-training per (method, seed), paired differences, the frozen-encoder probe, the plot, resume."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline_settings import TINY

METHODS = ["scratch", "mae", "hpm"]
SEEDS = [0, 1]
KS = [1, 2]
T_975_1 = 12.706204736174707  # Student t, 0.975 quantile, 1 degree of freedom (2 seeds), from tables


def _paired_reference(a: dict, b: dict) -> dict:
    """Mean, sample sd and the 95 % t interval of a[s] - b[s], written out by hand."""
    d = [a[s] - b[s] for s in sorted(a)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = T_975_1 * sd / math.sqrt(n)
    return {"mean": mean, "std": sd, "lo": mean - half, "hi": mean + half, "n": n}


@pytest.mark.slow
def test_label_efficiency_grid_end_to_end(tiny_phantoms, tmp_path):
    spec = tmp_path / "label_efficiency.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "label_efficiency",
                "base": "demo",
                "methods": METHODS,
                "seeds": SEEDS,
                "grid": {"key": "finetune.labelled_cases", "values": KS},
                "overrides": TINY
                + [
                    f"data.dataset={tiny_phantoms}",
                    "pretrain.epochs=1",
                    "pretrain.steps_per_epoch=2",
                    "finetune.epochs=1",
                    "finetune.steps_per_epoch=2",
                    "finetune.val_every=1",
                ],
            }
        )
    )
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "medhpm.cli", "experiment", "--config", str(spec), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # layout: runs/KEY=VALUE/METHOD/seedS, one pre-training per (method, seed) under pretrain/
    for k in KS:
        for m in METHODS:
            for s in SEEDS:
                run = out / "runs" / f"finetune.labelled_cases={k}" / m / f"seed{s}"
                assert (run / "evaluation" / "metrics.json").exists()
                assert not (run / "pretrain").exists()
                ft = json.loads((run / "finetune" / "summary.json").read_text())
                assert len(ft["training_cases"]) == k
                if m != "scratch":  # every k fine-tuned from the one pre-training of its (method, seed)
                    assert ft["init"] == str(out / "pretrain" / m / f"seed{s}" / "encoder.safetensors")
                else:
                    assert ft["init"] == "none"
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("pretrain/*/*/final.pt")) == [
        f"pretrain/{m}/seed{s}/final.pt" for m in ("hpm", "mae") for s in SEEDS
    ]
    # pre-trained once per (method, seed), not once per k (each pre-training prints one "done in" line; the
    # other k find it done and say "done before, kept")
    assert len(re.findall(r"self-pre-training \((?:mae|hpm)\): done in", r.stdout)) == len(SEEDS) * 2
    assert len(re.findall(r"self-pre-training \((?:mae|hpm)\): done before, kept", r.stdout)) == len(SEEDS) * 2 * (
        len(KS) - 1
    )

    # results.json: per grid value, per method, and paired differences equal to a slow recomputation
    res = json.loads((out / "results.json").read_text())
    assert [c["value"] for c in res["cells"]] == KS
    assert "Student-t" in res["interval"]
    for cell in res["cells"]:
        dice, hd = {}, {}
        for m in METHODS:
            for s in SEEDS:
                run = out / "runs" / cell["name"] / m / f"seed{s}"
                summ = json.loads((run / "evaluation" / "metrics.json").read_text())["summary"]
                labels = [k for k in summ if k != "mean"]
                per_organ = [summ[k]["dice_mean"] for k in labels if summ[k]["dice_mean"] is not None]
                dice.setdefault(m, {})[s] = sum(per_organ) / len(per_organ)
                hd.setdefault(m, {})[s] = summ["mean"]["hd95_mean"]
            mean = sum(dice[m].values()) / len(SEEDS)
            assert cell["methods"][m]["dice"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert set(cell["paired"]["dice"]) == {"hpm-mae", "mae-scratch", "hpm-scratch"}
        for pair, got in cell["paired"]["dice"].items():
            a, b = pair.split("-")
            want = _paired_reference(dice[a], dice[b])
            for key in ("mean", "std", "lo", "hi"):
                if want["std"] == 0:
                    continue
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (pair, key)
            assert got["n"] == 2
        for pair, got in cell["paired"]["hd95"].items():
            a, b = pair.split("-")
            if all(v is not None for v in (*hd[a].values(), *hd[b].values())):
                assert got["mean"] == pytest.approx(_paired_reference(hd[a], hd[b])["mean"], abs=1e-9)

    # the probe: once per (method, seed), fitted on the smallest k's labelled cases, accuracies in [0, 1]
    for m in METHODS:
        for s in SEEDS:
            p = json.loads((out / "probe" / m / f"seed{s}" / "probe.json").read_text())
            assert 0.0 <= p["balanced_accuracy"] <= 1.0 and 0.0 <= p["train_balanced_accuracy"] <= 1.0
            ft = json.loads(
                (out / "runs" / "finetune.labelled_cases=1" / m / f"seed{s}" / "finetune" / "summary.json").read_text()
            )
            assert p["training_cases"] == ft["training_cases"] and p["labelled_cases"] == 1
            assert len(p["test_cases"]) == 1
            assert res["probe"]["cells"]["all"]["methods"][m]["seeds"][str(s)] == p["balanced_accuracy"]
    assert not list(out.glob("runs/*/*/*/probe.json"))
    assert set(res["probe"]["cells"]["all"]["paired"]) == {"hpm-mae", "mae-scratch", "hpm-scratch"}

    # the plot, linked from results.md, with the paired table and the probe
    png = out / "dice_vs_finetune.labelled_cases.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert f"({png.name})" in md and "Paired differences" in md and "Frozen-encoder probe" in md
    assert "| 1 | hpm-mae |" in md and "Student-t" in md and "1 labelled training case" in md

    # a rerun skips everything and rewrites only the tables
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == len(METHODS) * len(SEEDS) * len(KS)
    # a stage's start line (a stage found done prints "=== [n/m] NAME: done before, kept ===" instead)
    started = re.compile(r"=== \[\d+/\d+\] (self-pre-training \([a-z_]+\)|UNETR fine-tuning) ===")
    assert "[probe]" not in again.stdout and not started.search(again.stdout)

    # an unfinished run and a missing probe are redone; the rest is skipped; the probe comes out the same
    probe_file = out / "probe" / "mae" / "seed1" / "probe.json"
    before = json.loads(probe_file.read_text())
    probe_file.unlink()
    shutil.rmtree(out / "runs" / "finetune.labelled_cases=2" / "hpm" / "seed1" / "evaluation")
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert third.stdout.count("done, skipped") == len(METHODS) * len(SEEDS) * len(KS) - 1
    assert not started.search(third.stdout)  # only prediction and evaluation of the unfinished run
    assert third.stdout.count("[probe]") == 1
    assert json.loads(probe_file.read_text())["balanced_accuracy"] == pytest.approx(
        before["balanced_accuracy"], abs=1e-6
    )
