"""Every config value is range-checked in ``validate()``, before any data is read, with the key named (issue 15).

The table below holds, for EVERY field of every config section, values outside its range; a field that
takes no range (free text, switches) is listed in EXEMPT with the reason. A new field with neither makes
``test_every_field_has_an_entry`` fail.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, is_dataclass

import pytest

from medhpm.config import CLASS_PRESETS, Config, ConfigError, load_config

# key -> values outside its range (each given as a command-line override of the default config)
BAD: dict[str, list[str]] = {
    "seed": ["-1"],
    "data.format": ["zip"],
    "data.split": ["random"],
    "data.phantom_cases": ["0"],
    "data.phantom_seed": ["-1"],
    "data.phantom_variability": ["huge"],
    "data.orientation": ["XYZ", "RAR", "RA", "ras"],
    "data.spacing": ["[0,1,1]", "[1,-1,1]", "[1,1]", "[1,1,1,1]"],
    "data.a_min": ["300"],  # above a_max
    "data.a_max": ["-200"],  # below a_min
    "data.b_min": ["2"],
    "data.b_max": ["-1"],
    "data.roi": ["[0,96,96]", "[96,96]", "[40,96,96]"],
    "data.crop": ["centre"],
    "data.num_samples": ["0"],
    "data.pos": ["-1"],
    "data.neg": ["-1"],
    "data.flip_prob": ["1.5", "-0.1"],
    "data.rot90_prob": ["2"],
    "data.intensity_scale_prob": ["-1"],
    "data.intensity_shift_prob": ["1.01"],
    "data.intensity_scale": ["-0.1", "1.0"],
    "data.intensity_shift": ["-0.1"],
    "data.val_cases": ["-1"],
    "data.cache": ["ram"],
    "data.num_workers": ["-1"],
    "data.prefetch_factor": ["0"],
    "model.preset": ["huge"],
    "model.patch_size": ["0", "-16"],
    "model.in_chans": ["0"],
    "model.pos_embed": ["rope"],
    "model.decoder_dim": ["0"],
    "model.decoder_depth": ["0"],
    "model.decoder_heads": ["0", "5"],
    "model.feature_size": ["0"],
    "model.skip_blocks": ["[0,6,9]", "[3,6,13]", "[6,3,9]", "[3,6]"],
    "model.norm_name": ["banana"],
    **{
        f"{stage}.{k}": v
        for stage in ("pretrain", "finetune")
        for k, v in {
            "epochs": ["0"],
            "steps_per_epoch": ["-3"],
            "batch_size": ["0"],
            "accum_steps": ["0"],
            "lr": ["0", "-1e-4"],
            "lr_ref_batch": ["0"],
            "min_lr": ["-1e-6", "1.0"],  # above lr
            "warmup_epochs": ["-1"],
            "weight_decay": ["-0.1"],
            "betas": ["[0.9,1.0]", "[-0.1,0.9]", "[0.9]", "[0.9,0.95,0.99]"],
            "clip_grad": ["-1"],
            "nonfinite": ["ignore"],
            "checkpoint_every": ["0"],
        }.items()
    },
    "pretrain.method": ["simmim"],
    "pretrain.mask_ratio": ["0", "1.0"],
    "pretrain.alpha_0": ["-0.1"],
    "pretrain.alpha_T": ["1.5"],
    "pretrain.lambda_pred": ["-1"],
    "pretrain.prediction_loss": ["relative", "l2"],
    "pretrain.ema_horizon_start": ["0", "1.5"],
    "pretrain.ema_horizon_end": ["0"],
    "pretrain.ema_ramp": ["-0.5", "2"],
    "pretrain.figure_every": ["-1"],
    "pretrain.teacher_view": ["partial", "masked_views"],
    "pretrain.teacher_views": ["1", "-2", "217"],  # the demo's crop has 216 tokens
    "pretrain.snapshot_steps": ["[0]", "[-1]", "[5,3]", "[3,3]", "[1.5]", "300"],  # beyond the run: test_snapshots.py
    "finetune.architecture": ["swin"],
    "finetune.layer_decay": ["0", "1.5"],
    "finetune.drop_path": ["1.0", "-0.1"],
    "finetune.dice_smooth_nr": ["-1"],
    "finetune.labelled_cases": ["-1"],
    "finetune.dice_smooth_dr": ["0"],
    "finetune.num_classes": ["1"],
    "finetune.reported": ["foo", "liver", "liver=0", "liver=six", "6=liver", "liver=6,liver=7", "liver=20"],
    "finetune.surface_tolerance_mm": ["-1", "nan"],
    "finetune.val_every": ["0"],
    "finetune.val_overlap": ["1.0", "-0.5"],
    "inference.overlap": ["1.0", "-0.1"],
    "inference.blend": ["linear"],
    "inference.sw_batch_size": ["0"],
    "runtime.device": ["banana", "cuda:x", "gpu"],
    "runtime.precision": ["fp16"],
    "runtime.threads": ["-1"],
    "runtime.cpu_memory": ["keep", "true"],
    "runtime.log_every": ["0"],
    "runtime.compile": ["fast", "2"],
}

EXEMPT: dict[str, str] = {
    "name": "free text, used only in default run folder names",
    "data.dataset": "a path (or 'phantom'); checked when the run starts, with the file named",
    "data.cache_dir": "a folder path; checked when the cache is written",
    "data.extra_unlabelled": "paths; checked with the datalist when the run starts",
    "data.crop_foreground": "a switch (the type is checked when the config is merged)",
    "model.grad_checkpointing": "a switch",
    "pretrain.norm_pix_loss": "a switch",
    "finetune.batch_dice": "a switch",
    "finetune.dice_squared_pred": "a switch",
    "finetune.use_teacher": "a switch",
    "finetune.allow_partial_init": "a switch",
    "runtime.deterministic": "a switch",
    "pretrain.snapshot_student": "a switch",
    "runtime.progress": "a switch",
}


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out += _all_keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_field_has_an_entry():
    keys = _all_keys()
    missing = [k for k in keys if k not in BAD and k not in EXEMPT]
    assert not missing, f"config fields without a range test or an exemption: {missing}"
    stale = [k for k in list(BAD) + list(EXEMPT) if k not in keys]
    assert not stale, f"entries for fields that do not exist: {stale}"
    assert not set(BAD) & set(EXEMPT)


CASES = [(key, value) for key, values in BAD.items() for value in values]


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_value_outside_its_range_names_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    msg = str(e.value)
    assert f"'{key}'" in msg or key in msg, msg
    assert "config key ''" not in msg


def test_the_defaults_and_every_packaged_config_are_valid():
    from medhpm.config import packaged_configs

    for name in packaged_configs():
        load_config(name)
    load_config(None)


def test_the_class_presets_of_the_config_are_those_of_evaluation():
    from medhpm.evaluate.classes import PRESETS, parse_classes

    assert tuple(PRESETS) == CLASS_PRESETS
    assert parse_classes("BTCV8") == PRESETS["btcv8"] and parse_classes("spleen=1,liver=6") == {1: "spleen", 6: "liver"}


def test_a_tuple_of_the_wrong_length_in_a_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("pretrain:\n  betas: [0.9]\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "'pretrain.betas'" in str(e.value) and "mine.yaml" in str(e.value) and "2 values" in str(e.value)


def test_negative_steps_per_epoch_stops_before_anything_runs(tmp_path):
    out = tmp_path / "X"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medhpm.cli",
            "pretrain",
            "--config",
            "demo",
            "pretrain.steps_per_epoch=-3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "error: config key 'pretrain.steps_per_epoch': -3 is out of range: must be at least 0 "
        "(0: one pass over the training volumes)"
    ], r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "rule,inside,outside",
    [
        (">= 1", [1, 2, 10**9], [0, -1, 0.5]),
        (">= 0", [0, 0.0, 3.5], [-1e-9, -2]),
        ("> 0", [1e-12, 1, 8e-4], [0, 0.0, -1]),
        ("[0, 1]", [0, 0.5, 1], [-0.01, 1.01]),
        ("[0, 1)", [0, 0.999], [1, 1.0, -0.1]),
        ("(0, 1]", [1e-6, 1], [0, 1.5]),
        ("(0, 1)", [0.25, 0.75], [0, 1]),
        ("stop | skip", ["stop", "skip"], ["Stop", "", "stop "]),
    ],
)
def test_a_declared_rule_admits_exactly_its_range(rule, inside, outside):
    from medhpm.config.validate import rule_problem

    for v in inside:
        assert rule_problem(v, rule) is None, (rule, v)
    for v in outside:
        assert rule_problem(v, rule), (rule, v)
    if "|" not in rule:  # a number's rule refuses what is not a finite number
        for v in (float("nan"), float("inf"), True, "1"):
            assert rule_problem(v, rule), (rule, v)


def test_every_default_obeys_its_declared_rule_and_the_reference_table_is_current():
    """One declaration per key (schema.setting): its default obeys its rule, every rule is one the checker
    reads, and docs/config.md holds the table written from the declarations."""
    from pathlib import Path

    from omegaconf import MISSING

    from medhpm.config.reference import config_reference
    from medhpm.config.schema import declarations
    from medhpm.config.validate import rule_problem

    keys = [k for k, *_ in declarations()]
    assert len(keys) == len(set(keys)) and "pretrain.lr" in keys and "runtime.log_every" in keys
    for key, default, rule, _ in declarations():
        if rule and default != MISSING:
            assert rule_problem(default, rule) is None, key
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert config_reference() in doc, "docs/config.md is out of date: python -m medhpm.config.reference docs/config.md"
    assert "| `pretrain.lr` | `0.00015` | > 0 |" in doc and "| `finetune.lr` | `0.0008` | > 0 |" in doc


def _float_keys() -> list[str]:
    from medhpm.config import load_config

    cfg = load_config(None)
    keys = []
    for section in ("data", "model", "pretrain", "finetune", "inference", "runtime"):
        for f in fields(getattr(cfg, section)):
            if isinstance(getattr(getattr(cfg, section), f.name), float):
                keys.append(f"{section}.{f.name}")
    return keys


@pytest.mark.parametrize("key", _float_keys())
def test_every_number_is_finite(key):
    """No float key takes inf or nan, with a declared rule or without (a_max=inf is no HU window)."""
    assert len(_float_keys()) > 20
    for bad in ("inf", "-inf", "nan"):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(None, [f"{key}={bad}"])


def test_tuples_of_numbers_are_finite():
    for override in ("data.spacing=[1.5,nan,2]", "pretrain.betas=[0.9,inf]", "finetune.betas=[nan,0.9]"):
        with pytest.raises(ConfigError, match="not a finite number"):
            load_config(None, [override])
