"""What a checkpoint depends on: the keys a resumed run (or a checkpoint used elsewhere) may not change,
and the config a run folder was started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence


from medhpm.config.load import _resolve, read_yaml
from medhpm.config.schema import Config, ConfigError
from medhpm.config.upgrade import _upgrade


# What a checkpoint's weights and preprocessing depend on: a run resumed (or a checkpoint used) with other
# values of these keys would load mismatched tensors or see differently prepared data.
CHECKPOINT_KEYS = (
    "model.preset",
    "model.patch_size",
    "model.in_chans",
    "model.pos_embed",
    "model.decoder_dim",
    "model.decoder_depth",
    "model.decoder_heads",
    "model.feature_size",
    "model.skip_blocks",
    "model.norm_name",
    "data.roi",
    "data.spacing",
    "data.orientation",
    "data.a_min",
    "data.a_max",
    "data.b_min",
    "data.b_max",
    "pretrain.method",
    "pretrain.teacher_view",
    "pretrain.teacher_views",
    "finetune.architecture",
    "finetune.num_classes",
)


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``"model.preset"``); sequences as tuples."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return tuple(obj) if isinstance(obj, (list, tuple)) else obj


def differences(old: Config, new: Config, keys: Sequence[str] = CHECKPOINT_KEYS) -> list[str]:
    """``"key: OLD -> NEW"`` for each of ``keys`` whose value differs between two configs."""
    out = []
    for key in keys:
        a, b = get_key(old, key), get_key(new, key)
        if a != b:
            out.append(f"{key} {a!r} -> {b!r}")
    return out


# Config keys that only one stage's checkpoints depend on: resuming the other stage may change them.
STAGE_ONLY_KEYS = {
    "pretrain": ("model.decoder_", "pretrain."),
    "finetune": ("model.feature_size", "model.skip_blocks", "model.norm_name", "finetune."),
}


def checkpoint_keys(stage: str) -> tuple[str, ...]:
    """The keys of :data:`CHECKPOINT_KEYS` that a ``stage`` checkpoint depends on (the other stage's own
    keys left out): what a resumed run may not change and what a checkpoint is compared on."""
    other = {"pretrain": "finetune", "finetune": "pretrain"}[stage]
    return tuple(k for k in CHECKPOINT_KEYS if not k.startswith(STAGE_ONLY_KEYS[other]))


def stored_config(run_dir: str | Path, stage: str, overrides: Optional[Sequence[str]] = None) -> Config:
    """The resolved config the ``stage`` run in ``run_dir`` was started with (``config_STAGE.yaml``, written
    by the trainer; one of an earlier version in today's key names), then ``overrides``."""
    path = Path(run_dir) / f"config_{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (is {run_dir} a {stage} run folder?)")
    data, where = read_yaml(str(path))
    return _resolve(_upgrade(data), where, overrides)


def resume_config(run_dir: str | Path, stage: str, overrides: Optional[Sequence[str]] = None) -> Config:
    """The config to resume the ``stage`` run in ``run_dir`` with: the run's own resolved config, then
    ``overrides``, which may only extend it (e.g. more epochs), never change what its checkpoint depends on
    (:func:`check_resume`)."""
    cfg = stored_config(run_dir, stage, overrides)
    check_resume(cfg, run_dir, stage)
    return cfg


def check_resume(cfg: Config, run_dir: str | Path, stage: str) -> None:
    """Raise a :class:`ConfigError` if ``cfg`` differs from the config the ``stage`` run in ``run_dir`` was
    started with in a key its checkpoint depends on (model shape, ROI, spacing, HU window, classes, method;
    :data:`CHECKPOINT_KEYS` less the other stage's own keys)."""
    changed = differences(stored_config(run_dir, stage), cfg, checkpoint_keys(stage))
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the overrides change what its checkpoint was trained with "
            f"({'; '.join(changed)}; see {Path(run_dir) / f'config_{stage}.yaml'}). A resumed run keeps these; "
            "start a new run with another --out instead"
        )
