"""The experiment runner over finished runs (metrics.json written by the real evaluation of real NIfTI
predictions): it skips them, and its results per grid value (mean ± std, paired differences with their
t interval, the plot) equal a slow recomputation. No training: seconds."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import yaml

from medhpm.evaluate import evaluate_predictions
from medhpm.experiment import run_experiment

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (30, 30, 12)
METHODS = ["scratch", "mae", "hpm"]
SEEDS = [0, 1, 2]
KS = [1, 3]
T_975_2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom (3 seeds), from tables


def _label(shift: int = 0) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4 + shift : 16 + shift, 4:14, 2:9] = 6  # liver, moved along x by `shift`
    lab[20:27, 8:16, 3:9] = 1  # spleen
    return lab


def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    return path


def _finished_run(run, datalist, shift: int):
    """A run folder holding what a finished run leaves for the runner: evaluation/metrics.json, computed
    by the real evaluation of a prediction whose liver is off by ``shift`` voxels."""
    _save(_label(shift), run / "predictions" / "case0.nii.gz")
    evaluate_predictions(run / "predictions", datalist, "spleen=1,liver=6", run / "evaluation", method="x")


def _one_case_datalist(tmp_path):
    """A datalist of one labelled test case (spleen and liver) for the finished runs to be evaluated against."""
    data = tmp_path / "data"
    _save(np.full(SHAPE, 40, np.int16), data / "img" / "case0.nii.gz")
    _save(_label(), data / "lab" / "case0.nii.gz")
    datalist = data / "dataset.json"
    datalist.write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "spleen", "6": "liver"},
                "training": [],
                "test": [{"image": "img/case0.nii.gz", "label": "lab/case0.nii.gz", "case": "case0"}],
            }
        )
    )
    return datalist


def _run_grid_experiment(tmp_path, datalist, out, probe: bool) -> None:
    """The runner over the finished runs under ``out``: METHODS x SEEDS x the labelled-cases grid KS."""
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "sim",
                "base": "demo",
                "methods": METHODS,
                "seeds": SEEDS,
                "probe": probe,
                "grid": {"key": "finetune.labelled_cases", "values": KS},
                "overrides": [f"data.dataset={datalist}", "finetune.reported=spleen=1,liver=6"],
            }
        )
    )
    run_experiment(str(spec), out)


def _reference(a: dict, b: dict) -> dict:
    d = [a[s] - b[s] for s in SEEDS]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return {"mean": mean, "std": sd, "lo": mean - T_975_2 * sd / math.sqrt(n), "hi": mean + T_975_2 * sd / math.sqrt(n)}


def test_grid_results_over_finished_runs(tmp_path, capsys):
    datalist = _one_case_datalist(tmp_path)
    out = tmp_path / "exp"
    shift = {"scratch": 3, "mae": 2, "hpm": 1}
    for k in KS:
        for m in METHODS:
            for s in SEEDS:
                _finished_run(
                    out / "runs" / f"finetune.labelled_cases={k}" / m / f"seed{s}",
                    datalist,
                    shift[m] + (s == 2) - (k == 3),
                )
    _run_grid_experiment(tmp_path, datalist, out, probe=False)
    assert capsys.readouterr().out.count("done, skipped") == len(KS) * len(METHODS) * len(SEEDS)
    assert not (out / "pretrain").exists()  # nothing ran

    res = json.loads((out / "results.json").read_text())
    assert [c["value"] for c in res["cells"]] == KS and res["probe"] is None
    for cell in res["cells"]:
        dice, hd = {}, {}
        for m in METHODS:
            for s in SEEDS:
                m_json = json.loads(
                    (out / "runs" / cell["name"] / m / f"seed{s}" / "evaluation" / "metrics.json").read_text()
                )
                per_case = m_json["cases"]["case0"]
                dice.setdefault(m, {})[s] = (per_case["1"]["dice"] + per_case["6"]["dice"]) / 2
                hd.setdefault(m, {})[s] = (per_case["1"]["hd95"] + per_case["6"]["hd95"]) / 2
            got = cell["methods"][m]["dice"]
            mean = sum(dice[m].values()) / 3
            assert got["mean"] == pytest.approx(mean, abs=1e-12)
            assert got["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in dice[m].values()) / 2), abs=1e-12)
        assert set(cell["paired"]["dice"]) == {"hpm-mae", "mae-scratch", "hpm-scratch"}
        for pair in cell["paired"]["dice"]:
            a, b = pair.split("-")
            for what, values in (("dice", dice), ("hd95", hd)):
                got, want = cell["paired"][what][pair], _reference(values[a], values[b])
                assert got["n"] == 3 and got["seeds"] == SEEDS
                for key in ("mean", "std", "lo", "hi"):
                    assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (cell["name"], what, pair, key)
    # a smaller liver shift is a better segmentation: hpm above mae above scratch in every seed
    assert res["cells"][0]["paired"]["dice"]["hpm-scratch"]["lo"] > 0

    png = out / "dice_vs_finetune.labelled_cases.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert f"]({png.name})" in md and "| 3 | hpm-scratch |" in md and "Student-t" in md
    assert "Frozen-encoder probe" not in md  # probe: false


def test_probe_summary_over_finished_probes(tmp_path):
    """With the probe on, finished probe.json files are read back (not recomputed) and summarised per method
    with paired intervals equal to a slow recomputation (a regression: the summary once crashed on the
    experiment folder's name being shadowed, after an hour of runs)."""
    datalist = _one_case_datalist(tmp_path)
    out = tmp_path / "exp"
    acc = {"scratch": 0.30, "mae": 0.40, "hpm": 0.45}
    bal = {}
    for m in METHODS:
        for s in SEEDS:
            for k in KS:
                _finished_run(out / "runs" / f"finetune.labelled_cases={k}" / m / f"seed{s}", datalist, 1)
            if m != "scratch":  # a finished pre-training, as the shared grid leaves it
                (out / "pretrain" / m / f"seed{s}").mkdir(parents=True)
                (out / "pretrain" / m / f"seed{s}" / "final.pt").write_bytes(b"")
            bal.setdefault(m, {})[s] = acc[m] + 0.01 * s * (m == "hpm")
            p = out / "probe" / m / f"seed{s}" / "probe.json"
            p.parent.mkdir(parents=True)
            p.write_text(
                json.dumps(
                    {
                        "balanced_accuracy": bal[m][s],
                        "chance": 0.25,
                        "labelled_cases": 1,
                        "metric": "balanced accuracy (planted)",
                        "seconds": 2.0,
                    }
                )
            )
    _run_grid_experiment(tmp_path, datalist, out, probe=True)
    probe = json.loads((out / "results.json").read_text())["probe"]
    cell = probe["cells"]["all"]
    for m in METHODS:
        assert cell["methods"][m]["mean"] == pytest.approx(sum(bal[m].values()) / 3, abs=1e-12)
        assert cell["methods"][m]["files"]["0"] == f"probe/{m}/seed0/probe.json"
    for pair in ("hpm-mae", "mae-scratch", "hpm-scratch"):
        a, b = pair.split("-")
        want = _reference(bal[a], bal[b])
        for key in ("mean", "lo", "hi"):
            assert cell["paired"][pair][key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    md = (out / "results.md").read_text()
    assert "Frozen-encoder probe" in md and "| UNETR+HPM | 46.0 ± 1.0 | 25.0 | 3 |" in md
    # the probes' own run times (9 probes of 2 s) are counted in the budget; these runs have no timings
    assert json.loads((out / "results.json").read_text())["budget"]["probe_seconds"] == pytest.approx(18.0)
    assert "the frozen-encoder probes 0.3 min" in md and "18 run(s) were made before runs recorded" in md


def test_budget_and_wall_time_from_the_runs_records(tmp_path):
    """results.md and results.json give each method's steps and the wall time of its stages per run, read
    from each run's timings.json and summary.json (planted here): a pre-training shared by the grid counts
    once, and a run without a record is named as not counted."""
    datalist = _one_case_datalist(tmp_path)
    out = tmp_path / "exp"
    planted = {}
    for m in METHODS:
        for s in SEEDS:
            if m != "scratch":
                pt = out / "pretrain" / m / f"seed{s}"
                pt.mkdir(parents=True)
                (pt / "final.pt").write_bytes(b"")
                (pt / "summary.json").write_text(json.dumps({"steps": 600}))
            for k in KS:
                run = out / "runs" / f"finetune.labelled_cases={k}" / m / f"seed{s}"
                _finished_run(run, datalist, 1)
                (run / "finetune").mkdir()
                (run / "finetune" / "summary.json").write_text(json.dumps({"steps": 400}))
                if (m, s, k) == ("hpm", 2, 3):
                    continue  # made before runs recorded their times
                times = {
                    "UNETR fine-tuning": 100.0 + 10 * s + k,
                    "prediction of the test scans": 2.0,
                    "evaluation (Dice, HD95)": 1.0,
                }
                if m != "scratch" and k == KS[0]:  # the first grid value made the shared pre-training
                    times = {f"self-pre-training ({m})": 60.0 * (1 + s) + (m == "hpm") * 30, **times}
                (run / "timings.json").write_text(json.dumps(times))
                planted[(m, s, k)] = times
    _run_grid_experiment(tmp_path, datalist, out, probe=False)
    budget = json.loads((out / "results.json").read_text())["budget"]
    assert budget["runs"] == 18 and budget["timed_runs"] == 17
    assert budget["stage_seconds"] == pytest.approx(sum(sum(t.values()) for t in planted.values()))
    hpm = budget["methods"]["hpm"]
    assert sorted(hpm["pretrain_s"]) == [90.0, 150.0, 210.0]  # once per seed, not once per grid value
    assert hpm["pretrain_steps"] == [600] * 3 and hpm["finetune_steps"] == [400] * 6 and hpm["runs"] == 6
    assert sorted(hpm["finetune_s"]) == sorted(t["UNETR fine-tuning"] for (m, _, _), t in planted.items() if m == "hpm")
    assert budget["methods"]["scratch"]["pretrain_s"] == [] and budget["methods"]["scratch"]["pretrain_steps"] == []
    md = (out / "results.md").read_text()
    # hpm pre-training: 90, 150, 210 s -> 2.5 ± 1.0 min; fine-tuning 101, 103, 111, 113, 121 s (seed 2, k 3 untimed)
    assert "| UNETR+HPM | 600 | 400 | 2.5 ± 1.0 | 1.8 ± 0.1 | 3.0 ± 0.0 | 6 |" in md, md[-1500:]
    assert "| UNETR | - | 400 | - |" in md
    assert "1 run(s) were made before runs recorded their times" in md


def test_variant_results_pair_the_variant_with_its_method(tmp_path):
    """A named variant is a row of its own (its label in the tables) and is paired with its method, with
    scratch and mae, and as the spec's pairs ask, from the finished runs' metrics (planted shifts)."""
    datalist = _one_case_datalist(tmp_path)
    out = tmp_path / "exp"
    methods = ["scratch", "mae", "hpm", "hpm_full"]
    shift = {"scratch": 3, "mae": 2, "hpm": 0, "hpm_full": 1}
    dice = {}
    for m in methods:
        for s in SEEDS:
            run = out / "runs" / m / f"seed{s}"
            _finished_run(run, datalist, shift[m] + (s == 1))
            per_case = json.loads((run / "evaluation" / "metrics.json").read_text())["cases"]["case0"]
            dice.setdefault(m, {})[s] = (per_case["1"]["dice"] + per_case["6"]["dice"]) / 2
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "variants",
                "base": "demo",
                "methods": methods,
                "seeds": SEEDS,
                "probe": False,
                "variants": {
                    "hpm_full": {
                        "method": "hpm",
                        "overrides": ["pretrain.teacher_view=full"],
                        "label": "UNETR+HPM (full view)",
                    }
                },
                "pairs": [["hpm", "hpm_full"]],
                "overrides": [f"data.dataset={datalist}", "finetune.reported=spleen=1,liver=6"],
            }
        )
    )
    run_experiment(str(spec), out)
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    assert {"hpm_full-hpm", "hpm_full-scratch", "hpm_full-mae", "hpm-hpm_full", "hpm-mae"} <= set(
        cell["paired"]["dice"]
    )
    for pair in ("hpm_full-hpm", "hpm-hpm_full", "hpm_full-scratch"):
        a, b = pair.split("-")
        want = _reference(dice[a], dice[b])
        for key in ("mean", "lo", "hi"):
            assert cell["paired"]["dice"][pair][key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    assert cell["paired"]["dice"]["hpm-hpm_full"]["mean"] > 0  # the smaller shift segments better
    md = (out / "results.md").read_text()
    assert "| UNETR+HPM (full view) |" in md and "| hpm_full-hpm |" in md
