"""``pretrain.snapshot_steps``: the student's encoder written at listed optimizer steps of one run, in the
format of an exported encoder (``RUN/snapshots/encoder_stepNNNNNNN.safetensors`` and its JSON sidecar).

Tiny in-process runs on phantoms, on the CPU. The lr warm-up outlasts every run, alpha_0 == alpha_T and the EMA
horizons are under one step (m = 0), so no schedule depends on the run's length: the first N steps of a
long run are those of a run that ends at step N, and a snapshot of step N must equal that run's final
weights bit for bit.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from medhpm.config import ConfigError, load_config, resume_config
from medhpm.models import ViTEncoder
from medhpm.pretrain.trainer import pretrain
from medhpm.runtime.checkpoint import load_checkpoint
from medhpm.runtime.loop import TrainingError

from pipeline_settings import TINY


def _cfg(dataset, *more):
    return load_config(
        "demo",
        TINY
        + [
            f"data.dataset={dataset}",
            "pretrain.method=hpm",
            "pretrain.warmup_epochs=10",
            "pretrain.lr=1e-3",
            "pretrain.alpha_0=0.5",
            "pretrain.alpha_T=0.5",
            "pretrain.ema_horizon_start=0.01",
            "pretrain.ema_horizon_end=0.01",
            "runtime.device=cpu",  # bit-for-bit comparisons: CUDA's backward may sum in another order each run
            *more,
        ],
    )


def _snapshots(run):
    folder = run / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _encoder(path):
    return {k[len("encoder.") :]: v for k, v in load_checkpoint(path)["model"].items() if k.startswith("encoder.")}


def _same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def length_runs(tiny_phantoms, tmp_path_factory):
    """One run of 6 steps with snapshots at 2 and 5, and runs that end at step 2 and at step 5."""
    tmp = tmp_path_factory.mktemp("snapshots")
    one = "pretrain.steps_per_epoch=1"
    return {
        "long": pretrain(_cfg(tiny_phantoms, one, "pretrain.epochs=6", "pretrain.snapshot_steps=[2,5]"), tmp / "long"),
        2: pretrain(_cfg(tiny_phantoms, one, "pretrain.epochs=2"), tmp / "to2"),
        5: pretrain(_cfg(tiny_phantoms, one, "pretrain.epochs=5"), tmp / "to5"),
    }


def test_snapshots_are_the_encoder_at_exactly_the_listed_steps(length_runs):
    run = length_runs["long"]
    assert _snapshots(run) == [
        "encoder_step0000002.json",
        "encoder_step0000002.safetensors",
        "encoder_step0000005.json",
        "encoder_step0000005.safetensors",
    ]
    for step in (2, 5):
        snap = load_file(str(run / "snapshots" / f"encoder_step{step:07d}.safetensors"))
        _same(snap, _encoder(length_runs[step] / "final.pt"), f"snapshot of step {step}")
        side = json.loads((run / "snapshots" / f"encoder_step{step:07d}.json").read_text())
        assert side["format"] == "medhpm-encoder" and side["step"] == step and side["epochs"] == step
        assert side["weights"] == "student" and side["method"] == "hpm" and side["preset"] == "micro"
    assert not _snapshots(length_runs[2])  # none listed, none written
    # the snapshot's steps went on: the run's final encoder is not the one of step 5
    assert not torch.equal(
        _encoder(run / "final.pt")["patch_embed.proj.weight"],
        _encoder(length_runs[5] / "final.pt")["patch_embed.proj.weight"],
    )


def test_a_snapshot_loads_like_an_exported_encoder(length_runs):
    from medhpm.runtime.weights import load_encoder_weights, read_encoder_sidecar

    path = length_runs["long"] / "snapshots" / "encoder_step0000005.safetensors"
    side = read_encoder_sidecar(path)
    enc = ViTEncoder(**side["encoder_args"])
    report = load_encoder_weights(enc, path)  # checks the sha256 its sidecar records
    assert report.missing == [] and report.unexpected == []
    _same(enc.state_dict(), _encoder(length_runs[5] / "final.pt"), "loaded snapshot")


def test_a_resumed_run_writes_the_snapshots_of_an_uninterrupted_one(tiny_phantoms, tmp_path):
    """2 epochs with snapshots at steps 1 and 3, resumed to 3 epochs adding step 5 (a resumed run may add
    snapshot steps), against 3 epochs with all three: the same files. Steps 1, 3 and 5 lie inside an
    epoch and inside a log interval (the step count there runs ahead of the flush)."""
    two = ("pretrain.steps_per_epoch=2", "runtime.log_every=2")
    full = pretrain(_cfg(tiny_phantoms, *two, "pretrain.epochs=3", "pretrain.snapshot_steps=[1,3,5]"), tmp_path / "a")
    half = pretrain(_cfg(tiny_phantoms, *two, "pretrain.epochs=2", "pretrain.snapshot_steps=[1,3]"), tmp_path / "b")
    assert len(_snapshots(half)) == 4
    cfg = resume_config(half, "pretrain", ["pretrain.epochs=3", "pretrain.snapshot_steps=[1,3,5]"])
    pretrain(cfg, half, resume=True)
    assert _snapshots(half) == _snapshots(full) and len(_snapshots(full)) == 6
    for step in (1, 3, 5):
        name = f"encoder_step{step:07d}"
        _same(
            load_file(str(full / "snapshots" / f"{name}.safetensors")),
            load_file(str(half / "snapshots" / f"{name}.safetensors")),
            f"snapshot of step {step}",
        )
        sides = [json.loads((r / "snapshots" / f"{name}.json").read_text()) for r in (full, half)]
        assert sides[0]["sha256"] == sides[1]["sha256"] and sides[0]["step"] == step
    _same(_encoder(full / "final.pt"), _encoder(half / "final.pt"), "final encoder")


def test_an_existing_snapshot_is_kept_and_another_file_is_not_replaced(tiny_phantoms, tmp_path, capsys):
    """A run killed after writing the snapshot of step 6 but before its epoch's last.pt resumes from the
    epoch before, reaches step 6 again and keeps the file; a file there that its sidecar says is another
    step's stops the resumed run before it trains. Steps per epoch are counted from the data (4 here), so a
    listed step beyond the run is named at the start, not by the config."""
    run = tmp_path / "k"
    pretrain(
        _cfg(
            tiny_phantoms,
            "pretrain.method=mae",
            "pretrain.steps_per_epoch=0",
            "pretrain.epochs=1",
            "pretrain.snapshot_steps=[2,9]",
        ),
        run,
    )
    assert "pretrain.snapshot_steps [9] lie beyond this run's 4 optimizer steps" in capsys.readouterr().out
    assert _snapshots(run) == ["encoder_step0000002.json", "encoder_step0000002.safetensors"]
    shutil.copyfile(run / "last.pt", tmp_path / "last_epoch1.pt")

    def resume():
        return pretrain(
            resume_config(run, "pretrain", ["pretrain.epochs=2", "pretrain.snapshot_steps=[2,6]"]), run, resume=True
        )

    resume()
    snap = run / "snapshots" / "encoder_step0000006.safetensors"
    assert f"snapshot of the encoder at step 6: {snap}\n" in capsys.readouterr().out
    before = (snap.stat().st_mtime_ns, snap.stat().st_ino, snap.read_bytes())
    shutil.copyfile(tmp_path / "last_epoch1.pt", run / "last.pt")  # the kill: back to the end of epoch 1
    resume()
    assert "(already there, written before the run resumed; kept)" in capsys.readouterr().out
    assert (snap.stat().st_mtime_ns, snap.stat().st_ino, snap.read_bytes()) == before

    side = snap.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "step": 7}))
    shutil.copyfile(tmp_path / "last_epoch1.pt", run / "last.pt")
    with pytest.raises(TrainingError, match=r"encoder_step0000006\.safetensors is in the way .*records step 7"):
        resume()
    assert snap.read_bytes() == before[2]


def test_a_skipped_step_is_not_counted(tiny_phantoms, tmp_path, monkeypatch):
    """With pretrain.nonfinite=skip a masked step does not count: the 2nd of 4 optimizer calls has a NaN
    loss, so step 3 is the 4th call, and all four lie in one log interval (the step count there runs
    ahead until the flush). The snapshot of step 3 is the run's final encoder."""
    from medhpm.pretrain.trainer import PretrainTrainer

    calls, train_step = [], PretrainTrainer.train_step

    def nan_on_the_second(self, batch, epoch_f):
        loss, logs = train_step(self, batch, epoch_f)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), logs

    monkeypatch.setattr(PretrainTrainer, "train_step", nan_on_the_second)
    run = pretrain(
        _cfg(
            tiny_phantoms,
            "pretrain.method=mae",
            "pretrain.nonfinite=skip",
            "runtime.log_every=4",
            "pretrain.epochs=1",
            "pretrain.steps_per_epoch=4",
            "pretrain.snapshot_steps=[3]",
        ),
        tmp_path / "s",
    )
    assert len(calls) == 4 and load_checkpoint(run / "final.pt")["step"] == 3
    assert _snapshots(run) == ["encoder_step0000003.json", "encoder_step0000003.safetensors"]
    _same(
        load_file(str(run / "snapshots" / "encoder_step0000003.safetensors")),
        _encoder(run / "final.pt"),
        "snapshot of step 3",
    )


@pytest.mark.parametrize(
    "value,says",
    [
        ("[0]", "0 is out of range"),
        ("[5,3]", "strictly increasing"),
        ("[3,3]", "strictly increasing"),
        ("[2,7]", "step 7 is beyond the run: it has 6 optimizer steps"),
    ],
)
def test_bad_snapshot_steps_are_refused_with_the_key_named(value, says):
    with pytest.raises(ConfigError) as e:
        load_config(
            "demo", TINY + ["pretrain.epochs=3", "pretrain.steps_per_epoch=2", f"pretrain.snapshot_steps={value}"]
        )
    assert "config key 'pretrain.snapshot_steps'" in str(e.value) and says in str(e.value), str(e.value)


def test_snapshot_steps_are_not_what_a_checkpoint_depends_on():
    from medhpm.config import CHECKPOINT_KEYS

    assert "pretrain.snapshot_steps" not in CHECKPOINT_KEYS
    assert load_config("demo", ["pretrain.snapshot_steps=[30,240]"]).pretrain.snapshot_steps == (30, 240)


def _slow_reconstruction_loss(model, x, mask, p: int) -> float:
    """L_rec written out: every masked patch cut from the crop by hand in the token order of docs/method.md
    ((ih*G+iw)*G+id, voxels in (ph, pw, pd) order), normalised by its own mean and unbiased variance, the
    squared error against the model's reconstruction of it averaged over its voxels, then over patches."""
    out = model(x, mask)
    n, g = x.shape[0], x.shape[-1] // p
    errors = []
    for b in range(n):
        masked = [t for t in range(g**3) if bool(mask[b, t])]
        for j, t in enumerate(masked):
            ih, iw, idd = t // (g * g), (t // g) % g, t % g
            patch = x[b, 0, ih * p : (ih + 1) * p, iw * p : (iw + 1) * p, idd * p : (idd + 1) * p].reshape(-1).double()
            target = (patch - patch.mean()) / torch.sqrt(patch.var(unbiased=True) + 1e-6)
            errors.append(float(((out["pred"][b, j].double() - target) ** 2).mean()))
    return sum(errors) / len(errors)


def test_student_snapshots_hold_the_whole_student_and_score_held_out_scans(length_runs, tiny_phantoms, tmp_path):
    """pretrain.snapshot_student: at each listed step the whole student (encoder, reconstructor, predictor)
    beside the encoder, equal bit for bit to the student of a run that ends there; its reconstruction loss
    on the test scans (pretrain/heldout.py) is L_rec on seeded random crops and masks, the same for every
    model, and equals a slow recomputation."""
    from medhpm.data.datalist import load_datalist
    from medhpm.pretrain.heldout import heldout_reconstruction, load_student, random_crops, run_heldout
    from medhpm.pretrain.masking import random_mask

    cfg = _cfg(
        tiny_phantoms,
        "pretrain.steps_per_epoch=1",
        "pretrain.epochs=6",
        "pretrain.snapshot_steps=[2,5]",
        "pretrain.snapshot_student=true",
    )
    run = pretrain(cfg, tmp_path / "students")
    assert _snapshots(run) == [
        "encoder_step0000002.json",
        "encoder_step0000002.safetensors",
        "encoder_step0000005.json",
        "encoder_step0000005.safetensors",
        "student_step0000002.safetensors",
        "student_step0000005.safetensors",
    ]
    for step in (2, 5):
        _same(
            load_file(str(run / "snapshots" / f"student_step{step:07d}.safetensors")),
            dict(load_checkpoint(length_runs[step] / "final.pt")["model"]),
            f"student of step {step}",
        )
    assert not (length_runs["long"] / "snapshots" / "student_step0000002.safetensors").exists()  # off by default

    test = [e["image"] for e in load_datalist(tiny_phantoms)["test"]]
    early = load_student(cfg, run / "snapshots" / "student_step0000002.safetensors")
    late = load_student(cfg, run / "snapshots" / "student_step0000005.safetensors")
    a = heldout_reconstruction(early, cfg, test, crops=2, seed=3)
    assert a == heldout_reconstruction(early, cfg, test, crops=2, seed=3)  # the same crops and masks
    assert a["loss_rec"] != heldout_reconstruction(late, cfg, test, crops=2, seed=3)["loss_rec"]
    x, _ = random_crops(cfg.data, test[0], None, 2, 3)
    mask = random_mask(
        2, early.encoder.num_patches, cfg.pretrain.mask_ratio, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        want = _slow_reconstruction_loss(early, x, mask, cfg.model.patch_size)
    assert a["per_scan"][0] == pytest.approx(want, rel=1e-5)
    res = run_heldout(
        cfg, tiny_phantoms, run / "snapshots" / "student_step0000002.safetensors", tmp_path / "h.json", crops=2, seed=3
    )
    assert res["loss_rec"] == pytest.approx(a["loss_rec"]) and res["cases"] and res["split"] == "test"
