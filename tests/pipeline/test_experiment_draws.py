"""Experiments with pre-training seeds apart from label draws (``pretrain_seeds``, ``finetune_from``): each
(method, pre-training seed) is pre-trained once, every (snapshot, k, label draw) fine-tunes from the right
encoder with the draw's seed, runs pair over draws, and the probe curve is read from its files. Planted
pre-trainings, metrics (real evaluation of real NIfTI predictions) and probe files: no training, seconds."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import yaml

from medhpm.config import ConfigError
from medhpm.data.datalist import finetune_cases
from medhpm.evaluate import evaluate_predictions
from medhpm.experiment import (
    label_draws,
    load_experiment,
    pairs_of,
    planned_pretrainings,
    planned_runs,
    run_command,
    run_experiment,
)

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (30, 30, 12)
DRAWS = [0, 1, 2]
KS = [1, 3]
T_975_2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom (3 draws), from tables


def _spec(tmp_path, **more):
    body = {
        "name": "len",
        "base": "demo",
        "methods": ["scratch", "mae", "hpm_full"],
        "seeds": DRAWS,
        "pretrain_seeds": [7],
        "finetune_from": ["last", 300],
        "probe": False,
        "grid": {"key": "finetune.labelled_cases", "values": KS},
        "variants": {"hpm_full": {"method": "hpm", "overrides": ["pretrain.teacher_view=full"]}},
        "overrides": ["pretrain.epochs=50", "pretrain.snapshot_steps=[300,1000]"],
    }
    body.update(more)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_snapshot_methods_and_their_pairs_are_added(tmp_path):
    spec = load_experiment(str(_spec(tmp_path)))
    assert label_draws(spec)
    assert spec["methods"] == ["scratch", "mae", "mae@300", "hpm_full", "hpm_full@300"]
    v = spec["variants"]["hpm_full@300"]
    assert v["method"] == "hpm" and v["pretrained_as"] == "hpm_full" and v["from_step"] == 300
    assert v["overrides"] == ["pretrain.teacher_view=full"]
    pairs = pairs_of(spec)
    assert ("mae@300", "mae") in pairs and ("mae@300", "scratch") in pairs and ("hpm_full@300", "hpm_full") in pairs


def test_each_method_and_pretraining_seed_is_pretrained_once(tmp_path):
    spec = load_experiment(str(_spec(tmp_path, pretrain_seeds=[7, 8])))
    jobs = planned_pretrainings(spec, tmp_path / "exp")
    assert [(j["method"], j["seed"]) for j in jobs] == [("mae", 7), ("hpm_full", 7), ("mae", 8), ("hpm_full", 8)]
    for j in jobs:
        assert (
            j["cfg"].seed == j["seed"]
            and j["pt"] == tmp_path / "exp" / "pretrain" / j["method"] / f"seed{j['seed']}" / "pretrain"
        )
        assert j["cfg"].pretrain.snapshot_steps == (300, 1000)
        assert j["cfg"].pretrain.teacher_view == ("full" if j["method"] == "hpm_full" else "masked")


def test_every_snapshot_k_and_draw_fine_tunes_from_the_right_encoder_with_the_draws_seed(tmp_path):
    out = tmp_path / "exp"
    spec = load_experiment(str(_spec(tmp_path)))
    runs = planned_runs(spec, out)
    assert len(runs) == len(DRAWS) * len(KS) * len(spec["methods"])
    for r in runs:
        cfg, cmd = run_command(r, spec, "DATA")
        assert cfg.seed == r["run_seed"] == r["seed"]  # one pre-training seed: the pairing key is the draw
        assert cfg.finetune.labelled_cases == r["value"]
        assert "--pretrain" not in cmd and cmd[cmd.index("--name") + 1] == r["method"]
        pt = out / "pretrain" / r["method"].split("@")[0] / "seed7" / "pretrain"
        if r["method"] == "scratch":
            assert "--init" not in cmd and r["dir"] == out / "runs" / r["cell"] / "scratch" / f"seed{r['seed']}"
        elif "@" in r["method"]:
            assert cmd[cmd.index("--init") + 1] == str(pt / "snapshots" / "encoder_step0000300.safetensors")
        else:
            assert cmd[cmd.index("--init") + 1] == str(pt / "encoder.safetensors")
    # with several pre-training seeds, runs without pre-training are one per draw, paired with each seed's
    spec2 = load_experiment(str(_spec(tmp_path, pretrain_seeds=[7, 8])))
    runs2 = planned_runs(spec2, out)
    scratch = {(r["seed"], r["dir"]) for r in runs2 if r["method"] == "scratch" and r["value"] == 1}
    assert {k for k, _ in scratch} == {f"p{p}d{d}" for p in (7, 8) for d in DRAWS}
    assert len({d for _, d in scratch}) == len(DRAWS)
    mae = [r for r in runs2 if r["method"] == "mae" and r["value"] == 1 and r["run_seed"] == 0]
    assert sorted(str(r["init"]).split("/pretrain/")[1] for r in mae) == ["mae/seed7", "mae/seed8"]


def test_label_draws_are_the_same_cases_for_every_method():
    """The labelled cases a run learns from depend on the run's seed alone (data.datalist.finetune_cases), and
    every method of a draw runs with the draw's seed (above): the same cases, different draws differ."""
    dl = {"training": [{"image": f"i{i}", "label": f"l{i}", "case": f"c{i}"} for i in range(12)]}
    picks = {d: [e["case"] for e in finetune_cases(dl, 2, 3, seed=d)[0]] for d in DRAWS}
    assert picks == {d: [e["case"] for e in finetune_cases(dl, 2, 3, seed=d)[0]] for d in DRAWS}
    assert len({tuple(p) for p in picks.values()}) > 1


@pytest.mark.parametrize(
    "more, message",
    [
        ({"finetune_from": ["last", 500]}, "'finetune_from' steps [500] are not in mae's pretrain.snapshot_steps"),
        ({"finetune_from": [300]}, "must include 'last'"),
        ({"finetune_from": ["last", "end"]}, "'finetune_from' must list 'last' and/or snapshot steps"),
        ({"pretrain_seeds": []}, "'pretrain_seeds' must be a non-empty list of distinct integers"),
        ({"pretrain_seeds": [1, 1]}, "'pretrain_seeds' must be a non-empty list of distinct integers"),
        ({"pretrain_seeds": None}, "'finetune_from' needs 'pretrain_seeds'"),
        (
            {"grid": {"key": "pretrain.epochs", "values": [50, 60]}},
            "the grid key must be one pre-training does not read",
        ),
        ({"methods": ["scratch", "unet"], "finetune_from": None}, "no method in 'methods' pre-trains"),
    ],
)
def test_bad_draw_settings_are_refused_naming_the_file(tmp_path, more, message):
    path = _spec(tmp_path, **more)
    with pytest.raises(ConfigError) as e:
        load_experiment(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


# ---- results over planted runs ----------------------------------------------------------------------------


def _label(shift: int = 0) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4 + shift : 16 + shift, 4:14, 2:9] = 6  # liver, moved along x by `shift`
    lab[20:27, 8:16, 3:9] = 1  # spleen
    return lab


def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))


def _datalist(tmp_path):
    data = tmp_path / "data"
    _save(np.full(SHAPE, 40, np.int16), data / "img" / "case0.nii.gz")
    _save(_label(), data / "lab" / "case0.nii.gz")
    path = data / "dataset.json"
    path.write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "spleen", "6": "liver"},
                "training": [],
                "test": [{"image": "img/case0.nii.gz", "label": "lab/case0.nii.gz", "case": "case0"}],
            }
        )
    )
    return path


def _plant_pretraining(job, steps: int, losses):
    """A finished pre-training job as the runner finds it: final.pt and the encoder (placeholders: nothing
    reads them here), summary.json, the epoch records and the job's timings.json."""
    pt = job / "pretrain"
    (pt / "snapshots").mkdir(parents=True)
    for name in ("final.pt", "encoder.safetensors"):
        (pt / name).write_bytes(b"planted")
    (pt / "summary.json").write_text(json.dumps({"steps": steps}))
    (pt / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"kind": "epoch", "epoch": i, "steps": steps // len(losses), "loss_rec": v}) + "\n"
            for i, v in enumerate(losses)
        )
    )
    (job / "timings.json").write_text(json.dumps({"self-pre-training (mae)": 60.0, "self-pre-training (hpm)": 90.0}))


def test_results_pair_over_label_draws_and_scratch_runs_once_per_draw(tmp_path, capsys):
    datalist = _datalist(tmp_path)
    out = tmp_path / "exp"
    path = _spec(
        tmp_path,
        overrides=[
            "pretrain.epochs=50",
            "pretrain.snapshot_steps=[300,1000]",
            f"data.dataset={datalist}",
            "finetune.reported=spleen=1,liver=6",
        ],
    )
    spec = load_experiment(str(path))
    for m in ("mae", "hpm_full"):
        _plant_pretraining(out / "pretrain" / m / "seed7", 1000, [1.0, 0.8])
    shift = {"scratch": 4, "mae": 2, "mae@300": 3, "hpm_full": 1, "hpm_full@300": 3}
    for r in planned_runs(spec, out):
        run = r["dir"]
        _save(
            _label(shift[r["method"]] + (r["run_seed"] == 1) - (r["value"] == 3)), run / "predictions" / "case0.nii.gz"
        )
        evaluate_predictions(run / "predictions", datalist, "spleen=1,liver=6", run / "evaluation", method=r["method"])
        (run / "timings.json").write_text(json.dumps({"UNETR fine-tuning": 10.0}))
    run_experiment(str(path), out)
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 2 + len(DRAWS) * len(KS) * 5  # 2 pre-trainings, every run

    res = json.loads((out / "results.json").read_text())
    for cell in res["cells"]:
        per = {m: {int(s): v for s, v in cell["methods"][m]["dice"]["seeds"].items()} for m in shift}
        for m in shift:
            for d in DRAWS:
                mj = json.loads(
                    (out / "runs" / cell["name"] / m / f"seed{d}" / "evaluation" / "metrics.json").read_text()
                )
                c = mj["cases"]["case0"]
                assert per[m][d] == pytest.approx((c["1"]["dice"] + c["6"]["dice"]) / 2, abs=1e-12)
        for pair in ("mae-scratch", "mae@300-mae", "mae@300-scratch", "hpm_full@300-hpm_full", "hpm_full-mae"):
            a, b = pair.split("-")
            diff = [per[a][d] - per[b][d] for d in DRAWS]
            mean = sum(diff) / 3
            sd = math.sqrt(sum((x - mean) ** 2 for x in diff) / 2)
            got = cell["paired"]["dice"][pair]
            assert got["n"] == 3 and [int(x) for x in got["seeds"]] == DRAWS
            assert got["mean"] == pytest.approx(mean, abs=1e-12)
            assert got["lo"] == pytest.approx(mean - T_975_2 * sd / math.sqrt(3), abs=1e-12)
    budget = res["budget"]
    assert budget["runs"] == len(DRAWS) * len(KS) * 5 and budget["timed_runs"] == budget["runs"]
    assert budget["methods"]["mae"]["pretrain_s"] == [60.0] and budget["methods"]["hpm_full"]["pretrain_s"] == [90.0]
    assert budget["stage_seconds"] == pytest.approx(150.0 + 10.0 * budget["runs"])
    md = (out / "results.md").read_text()
    assert "UNETR+MAE at step 300" in md and "| 1 | mae@300-mae |" in md


def _plant_probe(path, fixed, cv, knn):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "balanced_accuracy": fixed,
                "linear_cv": {"balanced_accuracy": cv},
                "knn": {"balanced_accuracy": knn},
                "seconds": 1.0,
            }
        )
    )


def test_the_probe_curve_reads_every_snapshot_and_the_noise_floor(tmp_path):
    """The curve of probes at each snapshot and the end (the probe files planted: run_probe reads a finished
    one back), against the noise floor; the Dice table's probe column is the cross-validated probe of the
    encoder each method fine-tunes from (scratch: the floor's mean)."""
    from medhpm.experiment.report import _curve_as_probe, _curve_md
    from medhpm.experiment.runner import _run_probe_curve
    from medhpm.experiment.spec import grid_cells
    from medhpm.viz.report import curve_figure

    out = tmp_path / "exp"
    spec = load_experiment(str(_spec(tmp_path, overrides=["pretrain.epochs=50", "pretrain.snapshot_steps=[300,1000]"])))
    jobs = planned_pretrainings(spec, out)
    for j in jobs:
        _plant_pretraining(j["dir"], 1500, [1.0, 0.9, 0.7])  # the end (1500) is not a snapshot: probed too
    values = {"mae": {300: 0.60, 1000: 0.70, 1500: 0.75}, "hpm_full": {300: 0.50, 1000: 0.55, 1500: 0.58}}
    for m, at in values.items():
        for step, v in at.items():
            _plant_probe(out / "probe" / m / "seed7" / f"step{step:07d}.json", v - 0.1, v, v - 0.2)
    floor_vals = [0.52, 0.56, 0.54]
    summ = {
        k: {
            "values": [v + off for v in floor_vals],
            "mean": 0.54 + off,
            "std": 0.02,
            "min": 0.52 + off,
            "max": 0.56 + off,
            "n": 3,
        }
        for k, off in (("linear_fixed", -0.1), ("linear_cv", 0.0), ("knn", -0.2))
    }
    (out / "probe").mkdir(parents=True, exist_ok=True)
    (out / "probe" / "noise_floor.json").write_text(
        json.dumps(
            {
                "summary": summ,
                "seeds": DRAWS,
                "labelled_cases": 0,
                "cases_seed": DRAWS[0],
                "seconds": 3.0,
                "training_cases": ["a", "b"],
                "test_cases": ["c"],
            }
        )
    )
    curve = _run_probe_curve(spec, grid_cells(spec, None), jobs, "unused", out)
    for m, at in values.items():
        e = curve["methods"][m][7]
        assert e["steps"] == [300, 1000, 1500] and e["linear_cv"] == [at[s] for s in (300, 1000, 1500)]
        assert e["knn"] == pytest.approx([at[s] - 0.2 for s in (300, 1000, 1500)])
        assert e["loss_rec"] == [[500, 1.0], [1000, 0.9], [1500, 0.7]]
    assert curve["floor"]["linear_cv"]["max"] == 0.56 and curve["seconds"] == pytest.approx(3.0 + 6 * 1.0)
    table = _curve_as_probe(spec, curve)["cells"]["all"]["methods"]
    assert table["mae"]["mean"] == 0.75 and table["mae@300"]["mean"] == 0.60 and table["hpm_full@300"]["mean"] == 0.50
    assert table["scratch"]["mean"] == 0.54
    png = curve_figure(curve["methods"], curve["floor"], out / "curve.png")
    md = _curve_md(spec, curve, png)
    assert "| UNETR+MAE (7) | 60.0* | 70.0* | 75.0* |" in md  # above the floor's max 56
    assert "| UNETR+HPM (hpm_full) (7) | 50.0 | 55.0 | 58.0* |" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_tiny_pretraining_length_study_end_to_end(tiny_phantoms, tmp_path):
    """Real processes on tiny phantoms: one pre-training (with snapshots) per method and pre-training seed,
    its probes at each snapshot and the noise floor, fine-tuning per label draw from the end and from a
    snapshot, the draws' labelled cases the same for every method; a second call skips everything."""
    import subprocess
    import sys

    from pipeline_settings import TINY

    spec = tmp_path / "length.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "length",
                "base": "demo",
                "methods": ["scratch", "mae"],
                "seeds": [0, 1],
                "pretrain_seeds": [5],
                "finetune_from": ["last", 2],
                "grid": {"key": "finetune.labelled_cases", "values": [1]},
                "overrides": TINY
                + [
                    f"data.dataset={tiny_phantoms}",
                    "pretrain.epochs=2",
                    "pretrain.steps_per_epoch=2",
                    "pretrain.snapshot_steps=[2,4]",
                    "pretrain.snapshot_student=true",
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

    pt = out / "pretrain" / "mae" / "seed5" / "pretrain"
    assert yaml.safe_load((out / "pretrain" / "mae" / "seed5" / "config.yaml").read_text())["seed"] == 5
    assert (pt / "final.pt").exists() and json.loads((pt / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (pt / "snapshots").glob("*.safetensors")) == [
        "encoder_step0000002.safetensors",
        "encoder_step0000004.safetensors",
        "student_step0000002.safetensors",
        "student_step0000004.safetensors",
    ]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("pretrain/*/*/pretrain/final.pt")) == [
        "pretrain/mae/seed5/pretrain/final.pt"
    ]  # once, for every draw and snapshot
    cases = {}
    for m, init in (
        ("scratch", "none"),
        ("mae", str(pt / "encoder.safetensors")),
        ("mae@2", str(pt / "snapshots" / "encoder_step0000002.safetensors")),
    ):
        for d in (0, 1):
            run = out / "runs" / "finetune.labelled_cases=1" / m / f"seed{d}"
            ft = json.loads((run / "finetune" / "summary.json").read_text())
            assert ft["init"] == init and not (run / "pretrain").exists()
            cases.setdefault(d, set()).add(tuple(ft["training_cases"]))
    assert all(len(v) == 1 for v in cases.values())  # one draw: the same labelled case for every method

    res = json.loads((out / "results.json").read_text())
    curve = res["probe_curve"]
    assert curve["methods"]["mae"]["5"]["steps"] == [2, 4]
    held = curve["methods"]["mae"]["5"]["heldout_loss"]  # the students' loss on the test scans
    assert len(held) == 2 and all(isinstance(v, float) and v > 0 for v in held)
    assert (out / "probe" / "mae" / "seed5" / "heldout_step0000004.json").exists()
    for step in (2, 4):
        probe = json.loads((out / "probe" / "mae" / "seed5" / f"step{step:07d}.json").read_text())
        assert probe["encoder"].endswith(f"encoder_step{step:07d}.safetensors")
    floor = json.loads((out / "probe" / "noise_floor.json").read_text())
    assert floor["seeds"] == [0, 1] and curve["floor"]["linear_cv"]["n"] == 2
    assert set(res["cells"][0]["paired"]["dice"]) >= {"mae-scratch", "mae@2-mae", "mae@2-scratch"}
    assert (out / "probe_vs_pretraining_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "Frozen-encoder probes against pre-training steps" in md and "Reconstruction loss on the test scans" in md

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 1 + 6 and "[probe]" not in again.stdout


@pytest.mark.parametrize("name", ["pretraining_length", "benchmarks/device/pretraining_length_gpu.yaml"])
def test_the_pretraining_length_specs_load_with_what_the_study_asks(name):
    """Both teacher views, MAE and scratch; one pre-training per method to at least 30,000 steps with
    log-spaced snapshots; k = 1 and 3 from at least 8 label draws; at least 16 test phantoms."""
    from pathlib import Path

    from medhpm.data.phantom.write import _split_counts  # the phantoms' 60/20/20 split

    root = Path(__file__).resolve().parents[2]
    spec = load_experiment(name if "/" not in name else str(root / name))
    assert spec["methods"] == ["scratch", "mae", "hpm_masked", "hpm_full"] and spec["pretrain_seeds"] == [0]
    assert len(spec["seeds"]) >= 8 and spec["grid"] == {"key": "finetune.labelled_cases", "values": [1, 3]}
    assert {("hpm_masked", "hpm_full"), ("hpm_masked", "mae")} <= {tuple(p) for p in spec["pairs"]}
    jobs = planned_pretrainings(spec, root / "unused")
    assert [j["cfg"].pretrain.teacher_view for j in jobs] == ["masked", "masked", "full"]
    for j in jobs:
        p = j["cfg"].pretrain
        assert p.epochs * p.steps_per_epoch >= 30000 and p.snapshot_steps[-1] == p.epochs * p.steps_per_epoch
        assert len(p.snapshot_steps) >= 5
    d = jobs[0]["cfg"].data
    assert d.phantom_variability == "wide" and _split_counts(d.phantom_cases, (0.6, 0.2, 0.2))[2] >= 16
