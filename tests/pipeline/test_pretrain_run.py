"""Tiny self-pre-training runs on phantoms: losses fall, checkpoints and figures appear, the exported
encoder loads by name into a fresh encoder and into UNETR."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medhpm.config import load_config
from medhpm.models import ViTEncoder
from medhpm.pretrain.trainer import export_encoder, pretrain
from medhpm.runtime.checkpoint import load_checkpoint
from medhpm.runtime.logging import read_metrics

from pipeline_settings import TINY


def _epoch_means(run, key):
    recs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "step" and key in r]
    by_epoch = {}
    for r in recs:
        by_epoch.setdefault(r["epoch"], []).append(r[key])
    return [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]


@pytest.fixture(scope="module")
def runs(tiny_phantoms, tmp_path_factory):
    out = {}
    for method in ("mae", "hpm"):
        cfg = load_config(
            "demo",
            TINY
            + [
                f"data.dataset={tiny_phantoms}",
                f"pretrain.method={method}",
                "pretrain.epochs=4",
                "pretrain.steps_per_epoch=6",
                "pretrain.lr=1e-3",
                "pretrain.alpha_0=0.3",
                "pretrain.alpha_T=0.5",
                # 24 steps in all: horizons of 2.4 -> 12 steps (m 0.58 -> 0.92), so the EMA is not a plain copy
                "pretrain.ema_horizon_start=0.1",
                "pretrain.ema_horizon_end=0.5",
            ],
        )
        out[method] = pretrain(cfg, tmp_path_factory.mktemp(f"pt_{method}"))
    return out


@pytest.mark.parametrize("method", ["mae", "hpm"])
def test_losses_fall(runs, method):
    rec = _epoch_means(runs[method], "loss_rec")
    assert len(rec) == 4
    assert rec[-1] < 0.95 * rec[0], rec
    if method == "hpm":
        pred = _epoch_means(runs[method], "loss_pred")
        # the ranking loss starts at log(2) (no information) and must learn something
        assert pred[0] == pytest.approx(np.log(2), abs=0.02)
        assert pred[-1] < pred[0] - 0.01, pred
        recs = read_metrics(runs[method] / "metrics.jsonl")
        assert any("hu_hard_mean" in r for r in recs), "HU statistics of mined patches are logged"
        assert all(0.999 > r["ema_momentum"] > 0 for r in recs if "ema_momentum" in r)
    else:
        assert not any("loss_pred" in r for r in read_metrics(runs[method] / "metrics.jsonl"))


def test_teacher_diagnostics_logged_every_epoch(runs):
    """The teacher's random-initialisation share is the product of the momenta of every EMA update so far
    (checked against the step records, one per optimizer step), and every epoch logs both ranking
    accuracies and the organ shares of mined and random patches (phantoms have labels)."""
    recs = read_metrics(runs["hpm"] / "metrics.jsonl")
    steps = [r for r in recs if r.get("kind") == "step"]
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 25)) and len(epochs) == 4
    share = 1.0
    for e in epochs:
        for r in steps:
            if r["epoch"] == e["epoch"]:
                share *= r["ema_momentum"]
        assert e["teacher_init_share"] == pytest.approx(share, rel=1e-12)
        assert 0.0 < e["ema_momentum"] < 1.0
        for key in ("teacher_rank_acc", "student_rank_acc", "organ_share_hard", "organ_share_random"):
            assert 0.0 <= e[key] <= 1.0, (key, e)
        for key in ("teacher_spearman", "student_spearman"):  # rank correlations beside the pair accuracies
            assert -1.0 <= e[key] <= 1.0, (key, e)
    assert epochs[-1]["teacher_init_share"] < epochs[0]["teacher_init_share"] < 1.0
    mae = [r for r in read_metrics(runs["mae"] / "metrics.jsonl") if r.get("kind") == "epoch"]
    assert not any(k in r for r in mae for k in ("teacher_rank_acc", "student_rank_acc", "teacher_init_share"))


def test_run_folder_contents(runs):
    run = runs["hpm"]
    for name in ("last.pt", "final.pt", "config_pretrain.yaml", "summary.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "figures" / "reconstruction_latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint(run / "final.pt")
    assert state["stage"] == "pretrain" and state["epoch"] == 3
    assert state["teacher"] is not None and not any(k.startswith("decoder_blocks") for k in state["teacher"])
    assert state["transforms"]["roi"] == [32, 32, 32]
    assert state["model_args"]["method"] == "hpm"
    assert load_checkpoint(runs["mae"] / "final.pt")["teacher"] is None


def test_exported_encoder_loads_by_name(runs, tmp_path):
    state = load_checkpoint(runs["hpm"] / "final.pt")
    path = export_encoder(runs["hpm"] / "final.pt", tmp_path / "enc.safetensors")
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["preset"] == "micro" and side["patch_size"] == 8 and side["method"] == "hpm"
    assert side["hu_window"] == [-175.0, 250.0] and len(side["sha256"]) == 64
    enc = ViTEncoder(**side["encoder_args"])
    missing, unexpected = enc.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    student = {k[len("encoder.") :]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, student[k], rtol=0, atol=0)


def test_transfer_into_unetr_keeps_encoder_outputs(runs, tmp_path):
    from medhpm.runtime.weights import load_encoder_weights
    from medhpm.segment.trainer import build_segmentation_model

    cfg = load_config("demo", TINY)
    state = load_checkpoint(runs["hpm"] / "final.pt")
    ref = ViTEncoder(**state["model_args"]["encoder"])
    ref.load_state_dict({k[8:]: v for k, v in state["model"].items() if k.startswith("encoder.")})
    ref.eval()
    unetr = build_segmentation_model(cfg)
    report = load_encoder_weights(unetr, runs["hpm"] / "final.pt")
    assert report.missing == [] and report.unexpected == []
    unetr.eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        a, _ = ref(x)
        b, _ = unetr.encoder(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,columns", [("hpm", 6), ("mae", 5)])
def test_visualize_pretrain_checkpoint_draws_the_training_figure(runs, tiny_phantoms, tmp_path, method, columns):
    """`medhpm visualize pretrain` draws the trainer's figure for a checkpoint: with a teacher it adds the
    predicted-difficulty column (2.3 inches a column at 90 dpi)."""
    import matplotlib.image as mpimg

    from medhpm.viz.reconstruction import visualize_pretrain_checkpoint

    scan = tiny_phantoms.parent / json.loads(tiny_phantoms.read_text())["training"][0]["image"]  # dataset.json
    png, _ = visualize_pretrain_checkpoint(runs[method] / "final.pt", scan, tmp_path / "fig.png")
    width = mpimg.imread(str(png)).shape[1]
    assert abs(width - round(2.3 * columns * 90)) <= 2, width
    trainer_png = runs[method] / "figures" / "reconstruction_latest.png"
    assert abs(mpimg.imread(str(trainer_png)).shape[1] - width) <= 2


def test_pretraining_reads_only_the_training_scans_and_says_so(tiny_phantoms, tmp_path, capsys):
    """Self-pre-training reads the datalist's training scans and any label-free folder, never its
    validation or test cases, and its first line says how many of each."""
    import shutil
    from pathlib import Path

    from medhpm.pretrain.trainer import PretrainTrainer
    from medhpm.runtime.distributed import DistInfo

    src = Path(tiny_phantoms)
    dl = json.loads(src.read_text())
    extra = tmp_path / "unlabelled"
    extra.mkdir()
    for i, e in enumerate(dl["training"][:2]):
        shutil.copy(src.parent / e["image"], extra / f"extra_{i}.nii.gz")
    cfg = load_config("demo", TINY + [f"data.dataset={src}", f"data.extra_unlabelled=[{extra}]"])
    trainer = PretrainTrainer(cfg, tmp_path / "run")
    trainer.dist = DistInfo()
    trainer.build_data()
    read = {Path(e["image"]).name for e in trainer.entries}
    held = {Path(e["image"]).name for e in dl["validation"] + dl["test"]}
    assert len(read) == len(dl["training"]) + 2 and not read & held
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[pretrain]"))
    n_val, n_test = len(dl["validation"]), len(dl["test"])
    assert line == (
        f"[pretrain] {len(dl['training'])} training scans of {src} and 2 label-free scans "
        f"(data.extra_unlabelled); its {n_val} validation and {n_test} test cases are not read"
    ), line


# ------------------------------------------------------------------ the teacher check of `visualize pretrain`
def _medhpm(*args: str, check: bool = True):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "medhpm.cli", *args], capture_output=True, text=True, timeout=600)
    assert not check or p.returncode == 0, p.stdout + p.stderr
    return p


def _scan_and_label(tiny_phantoms):
    dl = json.loads(tiny_phantoms.read_text())
    e = dl["test"][0] if dl.get("test") else dl["training"][0]
    return tiny_phantoms.parent / e["image"], tiny_phantoms.parent / e["label"]


def test_visualize_pretrain_json_for_an_hpm_checkpoint(runs, tiny_phantoms, tmp_path):
    """`medhpm visualize pretrain CKPT --image --label --crops --json`: the figure, one line of figures, and
    a JSON that names the run's own teacher view and holds every measure in its range."""
    scan, label = _scan_and_label(tiny_phantoms)
    out = tmp_path / "check.json"
    p = _medhpm(
        "visualize",
        "pretrain",
        str(runs["hpm"] / "final.pt"),
        "--image",
        str(scan),
        "--label",
        str(label),
        "--crops",
        "6",
        "--json",
        str(out),
        "-o",
        str(tmp_path / "fig.png"),
    )
    assert (tmp_path / "fig.png").is_file()
    res = json.loads(out.read_text())
    assert res["teacher_view"] == "masked" and res["teacher_views"] == 4 and res["crops"] == 6
    for key in ("teacher_spearman", "student_spearman", "position_spearman"):
        assert -1.0 <= res[key] <= 1.0
    for key in ("teacher_pair_accuracy", "student_pair_accuracy", "organ_share_top", "organ_share_all"):
        assert 0.0 <= res[key] <= 1.0
    assert res["organ_lift"] == pytest.approx(res["organ_share_top"] / res["organ_share_all"])
    assert "teacher (masked view) on 6 random crops: Spearman" in p.stdout and "lift" in p.stdout
    assert "position alone" in p.stdout


def test_visualize_pretrain_refuses_a_teacher_check_it_cannot_make(runs, tiny_phantoms, tmp_path):
    """An MAE checkpoint has no teacher; a label map off the scan's grid cannot be compared patch by patch.
    Both are refused with a sentence naming the file, before anything is written."""
    import nibabel as nib

    scan, label = _scan_and_label(tiny_phantoms)
    out, png = tmp_path / "check.json", tmp_path / "fig.png"
    p = _medhpm(
        "visualize",
        "pretrain",
        str(runs["mae"] / "final.pt"),
        "--image",
        str(scan),
        "--json",
        str(out),
        "-o",
        str(png),
        check=False,
    )
    assert p.returncode != 0 and "holds no EMA teacher (method mae)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not out.exists() and not png.exists()
    img = nib.load(str(label))
    small = tmp_path / "label_small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-4], img.affine), str(small))
    p = _medhpm(
        "visualize",
        "pretrain",
        str(runs["hpm"] / "final.pt"),
        "--image",
        str(scan),
        "--label",
        str(small),
        "--json",
        str(out),
        "-o",
        str(png),
        check=False,
    )
    assert p.returncode != 0 and str(small) in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not out.exists() and not png.exists()


class _PlantedTeacher:
    """A teacher whose scores are given (only its scores are read by the check)."""

    def __init__(self, scores):
        self.scores = scores

    def predict_difficulty(self, x):
        return self.scores


def _np_spearman(a, b):
    def ranks(v):
        return np.array([(v < x).sum() + ((v == x).sum() + 1) / 2.0 for x in v])

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def test_teacher_check_measures_against_numpy_on_planted_scores():
    """The check's figures equal a plain NumPy computation for planted teacher scores: the truth itself
    gives 1, random scores the NumPy Spearman and pair accuracy, and the organ lift counts the organ
    patches among the top-scored half of each crop's masked patches."""
    from medhpm.pretrain.masking import random_mask
    from medhpm.pretrain.model import HPMPretrainModel
    from medhpm.viz.reconstruction import teacher_ranking_check

    torch.manual_seed(0)
    student = HPMPretrainModel(
        ViTEncoder(img_size=(32, 32, 32), patch_size=8, embed_dim=48, depth=2, num_heads=4),
        decoder_dim=36,
        decoder_depth=1,
        decoder_heads=3,
    )
    n, n_tok, seed = 3, 64, 5
    x = torch.rand(n, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    # the check masks at random from its seed, first draw; the student's measured losses are the truth
    mask = random_mask(n, n_tok, 0.75, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = student.eval()(x, mask)
    truth, ids = out["per_patch_loss"].numpy(), out["ids_masked"].numpy()

    perfect = torch.rand(n, n_tok)
    perfect.scatter_(1, out["ids_masked"], out["per_patch_loss"])
    res = teacher_ranking_check(student, _PlantedTeacher(perfect), x, None, 0.75, "full", 1, seed)
    assert res["teacher_spearman"] == pytest.approx(1.0) and res["teacher_pair_accuracy"] == 1.0
    assert "organ_lift" not in res

    planted = torch.rand(n, n_tok, generator=torch.Generator().manual_seed(7))
    label = torch.zeros(n, 1, 32, 32, 32)
    label[:, :, :16] = 6.0  # the organ fills the patches of the first half along the first axis
    res = teacher_ranking_check(student, _PlantedTeacher(planted), x, label, 0.75, "full", 1, seed)
    sc = planted.numpy()
    assert res["teacher_spearman"] == pytest.approx(np.mean([_np_spearman(sc[i, ids[i]], truth[i]) for i in range(n)]))
    right = total = 0
    for i in range(n):
        for a in range(ids.shape[1]):
            for b in range(a + 1, ids.shape[1]):
                ds, dt = sc[i, ids[i, a]] - sc[i, ids[i, b]], truth[i, a] - truth[i, b]
                if ds != 0 and dt != 0:
                    total += 1
                    right += (ds > 0) == (dt > 0)
    assert res["teacher_pair_accuracy"] == pytest.approx(right / total)
    # organ patches: token index (ih*4 + iw)*4 + id, ih < 2 holds the organ -> tokens 0..31
    organ = np.arange(n_tok) < 32
    hits = cnt = 0
    for i in range(n):
        top = ids[i][np.argsort(-sc[i, ids[i]])[: len(ids[i]) // 2]]
        hits += organ[top].sum()
        cnt += len(top)
    assert res["organ_share_all"] == pytest.approx(0.5)
    assert res["organ_share_top"] == pytest.approx(hits / cnt)
    assert res["organ_lift"] == pytest.approx(hits / cnt / 0.5)
