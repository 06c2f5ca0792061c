"""The experiment spec's grid: checked before any run, with errors that name the file; the layout it gives."""

from __future__ import annotations

import pytest
import yaml

from medhpm.config import ConfigError
from medhpm.experiment import load_experiment, shares_pretraining


def _spec(tmp_path, **grid_and_more):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({"name": "g", "base": "demo", "methods": ["scratch", "mae"], "seeds": [0, 1], **grid_and_more})
    )
    return path


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"key": "finetune.labelled_case", "values": [1]}, "unknown config key 'finetune.labelled_case'"),
        ({"key": "finetune", "values": [1]}, "grid key 'finetune' is a config section"),
        ({"key": "finetune.nope.deeper", "values": [1]}, "unknown config key"),
        ({"key": "method", "values": ["mae"]}, "grid key 'method' is not a config key"),
        ({"key": "finetune.labelled_cases", "values": []}, "non-empty list"),
        ({"key": "finetune.labelled_cases", "values": 3}, "non-empty list"),
        ({"key": "finetune.labelled_cases"}, "'grid' must be a mapping with 'key'"),
        ({"key": "finetune.labelled_cases", "values": [1, 1]}, "repeat a value"),
        ({"key": "finetune.labelled_cases", "values": [1, -2]}, "grid value finetune.labelled_cases=-2"),
        ({"key": "seed", "values": [1, 2]}, "cannot be a grid axis"),
        ({"key": "pretrain.method", "values": ["mae"]}, "cannot be a grid axis"),
        ({"key": "data.phantom_cases", "values": [8, 16]}, "cannot be a grid axis"),
        ([1, 3], "'grid' must be a mapping"),
    ],
)
def test_a_bad_grid_is_refused_naming_the_file(tmp_path, grid, message):
    path = _spec(tmp_path, grid=grid)
    with pytest.raises(ConfigError) as e:
        load_experiment(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_bad_probe_switch_is_refused(tmp_path):
    path = _spec(tmp_path, probe="yes")
    with pytest.raises(ConfigError, match="'probe' must be true or false"):
        load_experiment(str(path))


def test_which_grid_keys_share_one_pretraining(tmp_path):
    for key, values, shared in [
        ("finetune.labelled_cases", [1, 3], True),
        ("finetune.epochs", [2, 4], True),
        ("inference.overlap", [0.25, 0.5], True),
        ("model.feature_size", [8, 16], True),
        ("pretrain.epochs", [1, 2], False),
        ("data.roi", [[32, 32, 32], [48, 48, 48]], False),
        ("model.skip_blocks", [None, [4, 8]], True),
    ]:
        spec = load_experiment(str(_spec(tmp_path, grid={"key": key, "values": values})))
        assert shares_pretraining(spec) is shared, key
    assert load_experiment(str(_spec(tmp_path)))["grid"] is None


def test_the_packaged_label_efficiency_spec_loads():
    spec = load_experiment("label_efficiency")
    assert spec["grid"] == {"key": "finetune.labelled_cases", "values": [1, 3]}
    assert spec["methods"] == ["scratch", "mae", "hpm"] and len(spec["seeds"]) >= 3 and shares_pretraining(spec)


def test_pipeline_pretrain_dir_needs_a_pretraining_method(tmp_path, capsys):
    from medhpm.pipeline import main, run_stages

    with pytest.raises(SystemExit) as e:
        main(
            [
                "--config",
                "demo",
                "--dataset",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--pretrain-dir",
                str(tmp_path / "pt"),
            ]
        )
    assert e.value.code == 2 and "--pretrain-dir needs --pretrain METHOD" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pretrain_dir=.* needs a pretrain_method"):
        run_stages(None, tmp_path / "o", tmp_path, pretrain_dir=tmp_path / "pt")


# ------------------------------------------------------------------ named method variants
VARIANTS = {
    "hpm_full": {"method": "hpm", "overrides": ["pretrain.teacher_view=full"]},
    "mae_long": {"method": "mae", "overrides": ["pretrain.epochs=20"], "label": "MAE, 20 epochs"},
}


def test_named_variants_carry_their_overrides_into_the_run_config(tmp_path):
    """A variant runs its method under its own name, folders and pre-training, with the experiment's
    overrides, the grid value's, then its own; the plain method keeps the base config."""
    from medhpm.experiment import planned_runs

    spec = load_experiment(
        str(
            _spec(
                tmp_path,
                methods=["scratch", "hpm", "hpm_full", "mae_long"],
                variants=VARIANTS,
                overrides=["pretrain.epochs=3"],
                grid={"key": "finetune.labelled_cases", "values": [1, 3]},
            )
        )
    )
    runs = planned_runs(spec, tmp_path / "exp")
    assert len(runs) == 2 * 2 * 4  # seeds x grid x methods
    by = {(r["method"], r["seed"], r["value"]): r for r in runs}
    for seed in (0, 1):
        for k in (1, 3):
            hpm, full, mae = by[("hpm", seed, k)], by[("hpm_full", seed, k)], by[("mae_long", seed, k)]
            assert hpm["cfg"].pretrain.teacher_view == "masked" and full["cfg"].pretrain.teacher_view == "full"
            assert full["base"] == "hpm" and mae["base"] == "mae" and by[("scratch", seed, k)]["base"] == "scratch"
            assert hpm["cfg"].pretrain.epochs == full["cfg"].pretrain.epochs == 3 and mae["cfg"].pretrain.epochs == 20
            assert full["cfg"].finetune.labelled_cases == k  # the grid value reaches the variant too
            assert (
                full["dir"] == tmp_path / "exp" / "runs" / f"finetune.labelled_cases={k}" / "hpm_full" / f"seed{seed}"
            )
            # each variant pre-trains once per seed, in its own folder, shared by the grid
            assert full["pretrain_dir"] == tmp_path / "exp" / "pretrain" / "hpm_full" / f"seed{seed}"
            assert hpm["pretrain_dir"] == tmp_path / "exp" / "pretrain" / "hpm" / f"seed{seed}"
            assert by[("scratch", seed, k)]["pretrain_dir"] is None


@pytest.mark.parametrize(
    "more, message",
    [
        ({"variants": {"mae": {"method": "mae"}}}, "variant name 'mae' must be a new name"),
        ({"variants": {"hpm-full": {"method": "hpm"}}}, "of letters, digits and '_'"),
        ({"variants": {"x": {"method": "simmim"}}}, "variant 'x' must be {method: one of"),
        (
            {"variants": {"x": {"method": "hpm", "overrides": "pretrain.teacher_view=full"}}},
            "'overrides' must be a list",
        ),
        ({"variants": {"x": {"method": "hpm", "overrides": ["pretrain.method=mae"]}}}, "cannot be overridden"),
        (
            {"variants": {"x": {"method": "hpm", "overrides": ["pretrain.teacher_view=partial"]}}},
            "variant 'x': config key 'pretrain.teacher_view'",
        ),
        ({"variants": {"x": {"method": "hpm", "colour": "red"}}}, "variant 'x' must be"),
        ({"methods": ["scratch", "y"]}, "'methods' must list some of"),
        ({"methods": ["scratch", "scratch"]}, "names a method twice"),
        ({"pairs": [["mae", "hpm"]]}, "'pairs' names ['hpm']"),
        ({"pairs": ["mae", "scratch"]}, "'pairs' must be a list of [A, B]"),
    ],
)
def test_bad_variants_and_pairs_are_refused_naming_the_file(tmp_path, more, message):
    path = _spec(tmp_path, **more)
    with pytest.raises(ConfigError) as e:
        load_experiment(str(path))
    assert message in str(e.value) and str(path) in str(e.value), str(e.value)


def test_pairs_of_a_spec_with_variants():
    from medhpm.experiment import pairs_of

    spec = {"variants": {"hpm_full": {"method": "hpm", "overrides": [], "label": "x"}}, "pairs": [("hpm", "hpm_full")]}
    pairs = pairs_of(spec)
    assert ("hpm_full", "hpm") in pairs and ("hpm_full", "scratch") in pairs and ("hpm_full", "mae") in pairs
    assert ("hpm", "hpm_full") in pairs and ("hpm", "mae") in pairs  # the defaults stay
    assert len(pairs) == len(set(pairs))
