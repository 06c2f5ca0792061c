"""Config precedence (defaults -> YAML -> key=value), errors that name the key, resolved config saved."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from medhpm.config import (
    Config,
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    TrainingConfig,
    check_resume,
    from_dict,
    load_config,
    packaged_configs,
    resume_config,
    to_dict,
)
from medhpm.runtime.files import save_config


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    default = Config()
    assert default.pretrain.mask_ratio == 0.75 and default.model.preset == "base"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "small"}, "pretrain": {"epochs": 7, "mask_ratio": 0.6}}))
    cfg = load_config(str(path))
    assert (cfg.model.preset, cfg.pretrain.epochs, cfg.pretrain.mask_ratio) == ("small", 7, 0.6)
    assert cfg.pretrain.lr == default.pretrain.lr  # untouched keys keep the code default
    cfg = load_config(str(path), ["pretrain.epochs=9", "method=mae"])
    assert (cfg.model.preset, cfg.pretrain.epochs, cfg.pretrain.method) == ("small", 9, "mae")


def test_packaged_configs_resolve():
    names = packaged_configs()
    assert {"demo", "btcv_paper", "smwb_paper"} <= set(names)
    btcv = load_config("btcv_paper")
    assert btcv.model.preset == "base" and btcv.data.roi == (96, 96, 96)
    # the recipe table of docs/method.md: the paper's batch of 4 volumes x 4 crops, its lrs absolute there,
    # SelfMedMAE's epochs, skips, fine-tuning loss and optimizer
    assert btcv.pretrain.batch_size == btcv.finetune.batch_size == 16 and btcv.data.num_samples == 4
    assert btcv.pretrain.lr_ref_batch == btcv.finetune.lr_ref_batch == 16
    assert (btcv.pretrain.epochs, btcv.finetune.epochs) == (10000, 5000)
    assert btcv.model.skip_blocks == (4, 7, 10)
    f = btcv.finetune
    assert f.betas == (0.9, 0.95) and f.clip_grad == 0.0 and not f.batch_dice and f.dice_squared_pred
    assert (f.dice_smooth_nr, f.dice_smooth_dr) == (0.0, 1e-6)
    smwb = load_config("smwb_paper")
    assert (smwb.data.a_min, smwb.data.a_max) == (-1000.0, 1000.0)  # lung is not air
    demo = load_config("demo").finetune  # the recipe the demo was measured with
    assert demo.batch_dice and not demo.dice_squared_pred and demo.betas == (0.9, 0.999) and demo.clip_grad == 1.0
    assert btcv.pretrain.lr == pytest.approx(1.5e-4) and btcv.pretrain.weight_decay == pytest.approx(0.05)
    assert btcv.finetune.lr == pytest.approx(8e-4) and btcv.finetune.layer_decay == 0.75
    assert btcv.finetune.drop_path == 0.1 and btcv.finetune.num_classes == 14 and btcv.data.split == "transunet"
    # the paper configs keep the paper's full-volume teacher; everything else asks it from masked views
    assert btcv.pretrain.teacher_view == smwb.pretrain.teacher_view == "full"
    assert load_config("demo").pretrain.teacher_view == "masked" == Config().pretrain.teacher_view


def test_teacher_views_without_masked_views_is_refused():
    with pytest.raises(ConfigError, match="'pretrain.teacher_views'.*only used with pretrain.teacher_view=masked"):
        load_config("btcv_paper", ["pretrain.teacher_views=4"])
    assert (
        load_config("btcv_paper", ["pretrain.teacher_view=masked", "pretrain.teacher_views=4"]).pretrain.teacher_views
        == 4
    )


@pytest.mark.parametrize(
    "override,key,hint",
    [
        ("pretrain.lamda_pred=2", "pretrain.lamda_pred", "pretrain.lambda_pred"),
        ("data.spaceing=[1,1,1]", "data.spaceing", "data.spacing"),
    ],
)
def test_unknown_key_names_it_and_suggests(override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert key in str(e.value) and hint in str(e.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "pretrain.epochz" in str(e.value) and "bad.yaml" in str(e.value) and "pretrain.epochs" in str(e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["pretrain.epochs=ten"])
    assert "pretrain.epochs" in str(e.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.roi=[60,64,64]", "data.roi"),
        ("pretrain.mask_ratio=1.0", "pretrain.mask_ratio"),
        ("pretrain.mask_ratio=0", "pretrain.mask_ratio"),
        ("model.decoder_heads=5", "model.decoder_heads"),
        ("model.preset=huge", "model.preset"),
        ("pretrain.method=simmim", "pretrain.method"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert key in str(e.value)


def test_round_trip_and_saved_config(tmp_path):
    cfg = load_config("demo", ["pretrain.epochs=3", "data.roi=[32,48,64]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(str(path))
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg


def test_cli_reports_unknown_key_without_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "pretrain",
            "--config",
            "demo",
            "pretrain.lamda_pred=2",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "pretrain.lambda_pred" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "last.pt").exists()


def test_version_lists_the_stack():
    r = subprocess.run([sys.executable, "-m", "medhpm.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    import monai
    import torch

    assert f"torch {torch.__version__}" in r.stdout and f"monai {monai.__version__}" in r.stdout
    assert "python 3." in r.stdout and "device cpu" in r.stdout and "cuda" in r.stdout


def test_both_stages_share_the_training_fields_with_their_own_defaults():
    shared = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert {"epochs", "batch_size", "lr", "betas", "clip_grad", "nonfinite", "checkpoint_every"} <= shared
    assert shared <= {f.name for f in dataclasses.fields(PretrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(FinetuneConfig)}
    p, f = Config().pretrain, Config().finetune
    assert (p.lr, tuple(p.betas), p.clip_grad) == (1.5e-4, (0.9, 0.95), 5.0)
    assert (f.lr, tuple(f.betas), f.clip_grad) == (8e-4, (0.9, 0.95), 0.0)  # SelfMedMAE: no clipping in fine-tuning
    cfg = load_config("demo", ["finetune.nonfinite=skip", "pretrain.checkpoint_every=3"])
    assert (cfg.finetune.nonfinite, cfg.pretrain.nonfinite, cfg.pretrain.checkpoint_every) == ("skip", "stop", 3)
    with pytest.raises(ConfigError, match="finetune.nonfinite"):
        load_config("demo", ["finetune.nonfinite=ignore"])


@pytest.mark.parametrize(
    "override,says",
    [
        ("evaluate.overlap=0.25", "'inference.overlap'"),
        ("evaluate.sw_batch_size=2", "'inference.sw_batch_size'"),
        ("evaluate.output_on_cpu=false", "--gpu-output"),
        ("evaluate.save_probabilities=true", "--probabilities"),
        ("pretrain.pred_loss=absolute", "'pretrain.prediction_loss'"),
        ("pretrain.prediction_loss=relative", "'ranking'"),
    ],
)
def test_keys_of_earlier_versions_say_the_new_name(override, says):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert override.split("=")[0] in str(e.value) and says in str(e.value)


def test_an_old_section_in_a_yaml_file_says_the_new_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("evaluate:\n  blend: constant\npretrain:\n  pred_loss: relative\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "'evaluate.blend' is now called 'inference.blend'" in str(e.value) and "old.yaml" in str(e.value)
    cfg = load_config(
        "demo", ["inference.overlap=0.25", "inference.blend=constant", "pretrain.prediction_loss=absolute"]
    )
    assert (cfg.inference.overlap, cfg.inference.blend, cfg.pretrain.prediction_loss) == (0.25, "constant", "absolute")


def test_a_config_stored_by_an_earlier_version_still_loads():
    old = to_dict(load_config("demo"))
    old["evaluate"] = {**old.pop("inference"), "overlap": 0.25, "output_on_cpu": True, "save_probabilities": False}
    del old["pretrain"]["prediction_loss"]
    del old["pretrain"]["teacher_view"], old["pretrain"]["teacher_views"]
    old["pretrain"]["pred_loss"] = "relative"
    cfg = from_dict(old)
    assert cfg.inference.overlap == 0.25 and cfg.pretrain.prediction_loss == "ranking"
    old["pretrain"]["pred_loss"] = "absolute"
    assert from_dict(old).pretrain.prediction_loss == "absolute"
    # written before pretrain.teacher_view existed: its teacher scored the full volume, and keeps doing so
    assert cfg.pretrain.teacher_view == "full"


def test_resume_refuses_another_teacher_view(tmp_path):
    run = tmp_path / "run"
    save_config(load_config("demo", ["pretrain.epochs=2"]), run / "config_pretrain.yaml")
    with pytest.raises(ConfigError, match="pretrain.teacher_view 'masked' -> 'full'"):
        resume_config(run, "pretrain", ["pretrain.epochs=5", "pretrain.teacher_view=full"])


def test_resume_config_extends_the_run_but_keeps_what_its_checkpoint_depends_on(tmp_path):
    run = tmp_path / "run"
    save_config(load_config("demo", ["pretrain.epochs=2"]), run / "config_pretrain.yaml")
    cfg = resume_config(run, "pretrain", ["pretrain.epochs=5", "finetune.num_classes=5"])
    assert cfg.pretrain.epochs == 5 and cfg.model.preset == "tiny"  # the stored config, extended
    check_resume(cfg, run, "pretrain")
    with pytest.raises(ConfigError) as e:
        resume_config(run, "pretrain", ["model.preset=small", "method=mae"])
    assert f"cannot resume {run}" in str(e.value)
    assert "model.preset 'tiny' -> 'small'" in str(e.value) and "pretrain.method 'hpm' -> 'mae'" in str(e.value)
    # the library check, without the CLI: pretrain(cfg, run, resume=True) runs it first
    with pytest.raises(ConfigError, match="data.roi"):
        check_resume(load_config("demo", ["data.roi=[32,32,32]"]), run, "pretrain")
    with pytest.raises(FileNotFoundError, match="config_finetune.yaml"):
        resume_config(run, "finetune")


def test_experiment_specs_are_found_like_configs():
    from medhpm.experiment import load_experiment

    assert {"demo_experiment", "btcv_paper", "smwb_paper"} <= set(packaged_configs("experiments"))
    assert load_experiment("demo_experiment")["base"] == "demo"
    with pytest.raises(ConfigError, match="Did you mean 'demo_experiment'"):
        load_experiment("demo_experimnt")
