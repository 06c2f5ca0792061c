"""Tiny UNETR fine-tuning on phantoms, prediction in the scan's own geometry (phantoms and the real DICOM
series), and evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medhpm.config import load_config
from medhpm.runtime.logging import read_metrics
from medhpm.segment.predict import Predictor
from medhpm.segment.trainer import finetune

from pipeline_settings import TINY

REAL = Path(__file__).resolve().parents[1] / "data" / "real_ct" / "abdomen_dicom"


@pytest.fixture(scope="module")
def ft_run(tiny_phantoms, tmp_path_factory):
    cfg = load_config(
        "demo",
        TINY
        + [
            f"data.dataset={tiny_phantoms}",
            "finetune.epochs=6",
            "finetune.steps_per_epoch=8",
            "finetune.val_every=1",
            "finetune.lr=6e-3",
            "finetune.layer_decay=0.9",
            "finetune.reported=btcv8",
            "data.crop=classes",
        ],
    )
    return finetune(cfg, tmp_path_factory.mktemp("ft"), init="none")


def test_finetune_lowers_loss_and_raises_validation_dice(ft_run):
    epochs = [r for r in read_metrics(ft_run / "metrics.jsonl") if r.get("kind") == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1]["loss"] < 0.85 * epochs[0]["loss"], [e["loss"] for e in epochs]
    dice = [e["val_dice"] for e in epochs]
    assert max(dice[1:]) > dice[0] + 0.02, dice
    summary = json.loads((ft_run / "summary.json").read_text())
    # the validation case is the datalist's own validation split, never a test case
    dl = json.loads((Path(summary["dataset"])).read_text())
    test_cases = {Path(e["image"]).name.split(".")[0] for e in dl["test"]}
    assert not test_cases & set(summary["validation_cases"])
    assert (ft_run / "best.pt").exists() and (ft_run / "final.pt").exists()


def test_predict_phantom_keeps_geometry_and_evaluates(ft_run, tiny_phantoms, tmp_path):
    pred_dir = tmp_path / "pred"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(ft_run / "best.pt"),
            "-i",
            str(tiny_phantoms),
            "-o",
            str(pred_dir),
            "--probabilities",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    dl = json.loads(Path(tiny_phantoms).read_text())
    for e in dl["test"]:
        src = nib.load(str(Path(tiny_phantoms).parent / e["image"]))
        out = nib.load(str(pred_dir / Path(e["image"]).name))
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
        lab = np.asarray(out.dataobj)
        assert lab.dtype == np.uint8 and lab.max() < 14
        probs = nib.load(str(pred_dir / (Path(e["image"]).name.split(".")[0] + "_probs.nii.gz")))
        assert probs.shape == (*src.shape, 14)
        np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-3)
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "evaluate",
            "--pred",
            str(pred_dir),
            "--label",
            str(tiny_phantoms),
            "--classes",
            "btcv8",
            "-o",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"1", "2", "3", "4", "6", "7", "8", "11"}
    assert "| Method | Avg DSC / HD95 |" in (tmp_path / "eval" / "table.md").read_text()


def test_predict_real_dicom_series_in_its_own_geometry(ft_run, tmp_path):
    """The real DICOM series goes through predict and comes back on the grid of its own label map."""
    p = Predictor.from_checkpoint(ft_run / "best.pt")
    out = p.predict_file(REAL / "dicom", tmp_path, name="abdomen")
    pred = nib.load(str(out))
    ref = nib.load(str(REAL / "labels_btcv13.nii.gz"))  # written on the series' own grid (LPS)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-3)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine)


def test_predict_reports_a_bad_file_and_goes_on(ft_run, tiny_phantoms, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    dl = json.loads(Path(tiny_phantoms).read_text())
    good = Path(tiny_phantoms).parent / dl["test"][0]["image"]
    (folder / "good.nii.gz").write_bytes(good.read_bytes())
    (folder / "broken.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "predict",
            "--model",
            str(ft_run / "best.pt"),
            "-i",
            str(folder),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1
    assert "broken.nii.gz" in r.stdout and "FAILED" in r.stdout
    assert (tmp_path / "out" / "good.nii.gz").exists() and not (tmp_path / "out" / "broken.nii.gz").exists()


def test_labelled_cases_limit_what_finetuning_learns_from(tiny_phantoms, tmp_path, capsys):
    """finetune.labelled_cases=k: the trainer's training cases are k of the data set's training cases (never
    a validation or test case; these phantoms list 4 training, 1 validation, 1 test), chosen by seed."""
    from medhpm.runtime.distributed import DistInfo
    from medhpm.segment.trainer import FinetuneTrainer

    dl = json.loads(Path(tiny_phantoms).read_text())
    test_cases = {Path(e["image"]).name for e in dl["test"]}
    seen = {}
    for seed in (0, 1):
        cfg = load_config("demo", TINY + [f"data.dataset={tiny_phantoms}", "finetune.labelled_cases=2", f"seed={seed}"])
        trainer = FinetuneTrainer(cfg, tmp_path / f"run{seed}", init=None)
        trainer.dist = DistInfo()
        trainer.build_data()
        train = {Path(e["image"]).name for e in trainer.train_entries}
        val = {Path(e["image"]).name for e in trainer.val_entries}
        assert len(train) == 2 and not train & val and not train & test_cases
        assert val == {Path(e["image"]).name for e in dl["validation"]} and len(dl["training"]) == 4
        seen[seed] = train
        assert "learning from the labels of 2 of 4 training cases" in capsys.readouterr().out


def test_finetuning_names_its_validation_cases(tiny_phantoms, tmp_path, capsys):
    """The run's first lines say which cases it validates on and where they came from: the datalist's own
    validation split, else data.val_cases drawn from the training cases (a user must keep those out of a
    later test)."""
    from medhpm.runtime.distributed import DistInfo
    from medhpm.segment.trainer import FinetuneTrainer

    src = Path(tiny_phantoms)
    dl = json.loads(src.read_text())
    given = [Path(e["image"]).name.split(".")[0] for e in dl["validation"]]
    # the same cases without the validation split (paths made absolute, the JSON written elsewhere)
    merged = {
        "labels": dl["labels"],
        "training": [
            {k: str(src.parent / v) for k, v in e.items() if k in ("image", "label")}
            for e in dl["training"] + dl["validation"]
        ],
    }
    (tmp_path / "no_val.json").write_text(json.dumps(merged))
    for dataset, val_cases in ((src, 2), (tmp_path / "no_val.json", 2), (tmp_path / "no_val.json", 0)):
        cfg = load_config("demo", TINY + [f"data.dataset={dataset}", f"data.val_cases={val_cases}"])
        trainer = FinetuneTrainer(cfg, tmp_path / f"run{val_cases}", init=None)
        trainer.dist = DistInfo()
        trainer.build_data()
        line = next(x for x in capsys.readouterr().out.splitlines() if "validation" in x)
        val = [Path(e["image"]).name.split(".")[0] for e in trainer.val_entries]
        if dataset == src:  # the datalist's split wins over data.val_cases
            assert val == given and line.endswith("the datalist's validation split: " + ", ".join(given)), line
            assert line.startswith(f"[finetune] {len(dl['training'])} training cases; 1 validation"), line
        elif val_cases:
            n = len(merged["training"])
            assert len(val) == 2 and line.startswith(f"[finetune] {n - 2} training cases; 2 validation, drawn"), line
            assert line.endswith(": " + ", ".join(val)), line
        else:
            assert val == [] and "no validation (data.val_cases=0)" in line, line


def test_finetuning_warns_when_the_datalists_classes_are_not_the_configs(tiny_phantoms, tmp_path, capsys):
    """The demo and paper configs are set for BTCV's 14 classes; a datalist that names 3 gets a warning at the
    start of the run that gives the settings that fit, and none once they are set."""
    from medhpm.config import parse_class_list
    from medhpm.runtime.distributed import DistInfo
    from medhpm.segment.trainer import FinetuneTrainer

    src = Path(tiny_phantoms)
    dl = json.loads(src.read_text())
    dl["labels"] = {"0": "background", "1": "liver", "2": "left kidney"}
    for split in ("training", "validation"):  # the labels kept to values 0..2: liver and left kidney
        for e in dl[split]:
            lab = nib.load(src.parent / e["label"])
            arr = np.asarray(lab.dataobj)
            three = np.where(arr == 6, 1, np.where(arr == 3, 2, 0)).astype(np.uint8)
            e["label"] = str(tmp_path / Path(e["label"]).name)
            nib.save(nib.Nifti1Image(three, lab.affine, lab.header), e["label"])
            e["image"] = str(src.parent / e["image"])
    dl.pop("test", None)
    (tmp_path / "three.json").write_text(json.dumps(dl))

    def warnings(*extra):
        cfg = load_config("demo", TINY + [f"data.dataset={tmp_path / 'three.json'}", *extra])
        trainer = FinetuneTrainer(cfg, tmp_path / f"run{len(extra)}", init=None)
        trainer.dist = DistInfo()
        trainer.build_data()
        return [x for x in capsys.readouterr().out.splitlines() if x.startswith("[finetune] warning:")]

    (line,) = warnings("finetune.num_classes=14", "finetune.reported=btcv8")
    assert "names 3 classes (background and liver, left kidney) but finetune.num_classes is 14" in line, line
    assert "11 outputs that no label uses" in line and "finetune.reported=btcv8" in line, line
    fit = line.split("For these classes: ")[1].rstrip(".").split()
    assert fit[0] == "finetune.num_classes=3"
    assert parse_class_list(fit[1].split("=", 1)[1]) == {1: "liver", 2: "left_kidney"}
    assert warnings(*fit) == []
