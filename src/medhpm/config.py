"""Typed configs for every stage, resolved as: code defaults -> YAML file -> ``key=value`` overrides.

A YAML file is either a packaged name (``demo``, ``btcv_paper``, ... in ``medhpm/configs``) or a path.
Unknown keys and wrong types are errors that name the key and suggest the closest existing one;
impossible values (a width not divisible by the heads, an ROI not divisible by the patch, a mask ratio
outside (0, 1)) are errors that name the key and say what would be valid.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


@dataclass
class DataConfig:
    # Valid ranges are written beside each field and enforced by validate() (tests/test_config_ranges.py).
    # Where the data is: a datalist JSON, an nnU-Net raw folder, a BTCV download folder, a plain folder
    # of NIfTI files / DICOM series, or "phantom" (generated into the run folder).
    dataset: str = "phantom"  # a path (checked when the run starts) or "phantom"
    format: str = "auto"  # auto | msd | nnunet | btcv | folder
    split: str = "transunet"  # BTCV only: transunet (18/12) | monai (24/6)
    phantom_cases: int = 12  # >= 1; only when dataset == "phantom"
    phantom_seed: int = 0  # >= 0
    phantom_variability: str = "standard"  # standard | wide (the variability of real scans: phase, scanner, ...)
    # Preprocessing recipe of PROTOCOL.md
    orientation: str = "RAS"  # three letters, one of each pair L/R, A/P, S/I (RAS, LPS, ...)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # three sizes > 0 (mm)
    a_min: float = -175.0  # < a_max (HU)
    a_max: float = 250.0  # > a_min (HU)
    b_min: float = 0.0  # < b_max
    b_max: float = 1.0  # > b_min
    crop_foreground: bool = True
    roi: tuple[int, int, int] = (96, 96, 96)  # three sizes > 0, each divisible by model.patch_size (voxels)
    crop: str = "label"  # label (pos:neg crops, needs labels) | classes (equal odds per organ) | random
    num_samples: int = 4  # >= 1; crops per volume per iteration
    pos: float = 1.0  # >= 0; pos + neg > 0
    neg: float = 1.0  # >= 0; pos + neg > 0
    flip_prob: float = 0.2  # [0, 1]
    rot90_prob: float = 0.2  # [0, 1]
    intensity_scale_prob: float = 0.1  # [0, 1]
    intensity_shift_prob: float = 0.1  # [0, 1]
    intensity_scale: float = 0.1  # [0, 1): intensities scaled by 1 + U(-s, s)
    intensity_shift: float = 0.1  # >= 0: intensities shifted by U(-s, s)
    # Validation subset drawn from the TRAINING cases (never the test cases)
    val_cases: int = 2  # >= 0 (fewer than the training cases, checked when the datalist is read)
    # Loading at scale
    cache: str = "none"  # none | memory | disk | device (training crops drawn on the training device)
    cache_dir: str = ""  # a folder; "" = inside the run folder
    num_workers: int = 0  # >= 0
    prefetch_factor: int = 2  # >= 1 (batches per worker loaded ahead)
    extra_unlabelled: list[str] = field(default_factory=list)  # extra scans for label-free pre-training


@dataclass
class ModelConfig:
    preset: str = "base"  # micro | tiny | small | base (ENCODER_PRESETS)
    patch_size: int = 16  # >= 1, divides every data.roi size (UNETR: 8 or 16)
    in_chans: int = 1  # >= 1
    pos_embed: str = "sincos"  # sincos (fixed) | learnable
    # pre-training decoders (ALGORITHM.md section 1)
    decoder_dim: int = 384  # >= 1, divisible by decoder_heads
    decoder_depth: int = 8  # >= 1
    decoder_heads: int = 12  # >= 1
    # UNETR
    feature_size: int = 16  # >= 1
    # 1-based blocks for UNETR skips, distinct, increasing, within the encoder depth, log2(patch) - 1 of
    # them; None: (3, 6, 9) for patch 16
    skip_blocks: Optional[tuple[int, ...]] = None
    norm_name: str = "instance"  # instance | batch
    grad_checkpointing: bool = False


@dataclass
class TrainingConfig:
    """The optimisation schedule both training stages share; each stage sets its own ``lr``, ``betas`` and
    ``clip_grad`` (and may change any other default)."""

    epochs: int = 100  # >= 1
    steps_per_epoch: int = 0  # >= 0; 0: one pass over the training volumes
    batch_size: int = 4  # >= 1; CROPS per step per process: batch_size / data.num_samples volumes
    accum_steps: int = 1  # >= 1
    lr: float = MISSING  # > 0
    lr_ref_batch: int = 4  # >= 1; lr is scaled by effective_batch / lr_ref_batch
    min_lr: float = 0.0  # [0, lr]
    warmup_epochs: float = 5.0  # >= 0
    weight_decay: float = 0.05  # >= 0
    betas: tuple[float, float] = MISSING  # two values in [0, 1)
    clip_grad: float = MISSING  # >= 0 (0: no clipping)
    nonfinite: str = "stop"  # stop | skip
    checkpoint_every: int = 1  # >= 1; epochs between 'last' checkpoints


@dataclass
class PretrainConfig(TrainingConfig):
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 5.0
    method: str = "hpm"  # one of METHODS: mae | hpm | no_lpred | no_learn_to_mask
    mask_ratio: float = 0.75  # (0, 1)
    alpha_0: float = 0.0  # [0, 1]
    alpha_T: float = 0.5  # [0, 1]
    lambda_pred: float = 1.0  # >= 0
    prediction_loss: str = "ranking"  # ranking (eq. 1) | absolute
    norm_pix_loss: bool = True
    # EMA teacher: its averaging horizon 1/(1-m) as a SHARE of the run's optimizer steps, rising from
    # ema_horizon_start to ema_horizon_end over the first ema_ramp of the run (HPM's ImageNet schedule,
    # 0.999 -> 0.9999 over 100 of 200 epochs, in these terms; docs/method.md)
    ema_horizon_start: float = 0.001  # (0, 1]
    ema_horizon_end: float = 0.01  # (0, 1]
    ema_ramp: float = 0.5  # [0, 1]
    figure_every: int = 0  # >= 0; epochs between reconstruction figures (0: first and last only)
    # how the EMA teacher scores patches (medhpm.pretrain.step, docs/method.md "How the teacher is queried"):
    # masked - from teacher_views complementary masked views, like the inputs its predictor is trained on;
    # full - one pass over the whole unmasked volume, as the paper and HPM's code (ranks near chance)
    teacher_view: str = "masked"  # full | masked
    teacher_views: int = 0  # 0 (views whose visible share is 1 - mask_ratio: 4 at 0.75) or 2 .. the tokens of a crop
    # optimizer steps after which the student's encoder is written to RUN/snapshots/encoder_stepNNNNNNN.safetensors
    # (the format of `medhpm export-encoder`): integers >= 1, strictly increasing, within the run's steps
    snapshot_steps: tuple[int, ...] = ()


@dataclass
class FinetuneConfig(TrainingConfig):
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.95)  # SelfMedMAE's fine-tuning AdamW
    clip_grad: float = 0.0  # 0: no clipping (SelfMedMAE)
    architecture: str = "unetr"  # unetr | dynunet (the CNN reference row, always from scratch)
    layer_decay: float = 0.75  # (0, 1]
    drop_path: float = 0.1  # [0, 1)
    # DiceCE as SelfMedMAE and MONAI's BTCV recipe: Dice per sample, squared denominators, smooth 0 / 1e-6;
    # batch_dice=true takes the Dice over the whole batch (nnU-Net style), steadier for organs absent from a crop
    batch_dice: bool = False
    dice_squared_pred: bool = True
    dice_smooth_nr: float = 0.0  # >= 0
    dice_smooth_dr: float = 1e-6  # > 0
    labelled_cases: int = 0  # >= 0: learn from the labels of only this many training cases, chosen by seed (0: all)
    num_classes: int = 14  # >= 2, including background
    # classes to report: btcv8 | btcv13 (CLASS_PRESETS) | NAME=VALUE,... with at least one value < num_classes
    reported: str = "btcv8"
    # tolerance (mm, >= 0) of the normalised surface Dice in every evaluation (FLARE's abdominal-CT choice: 1 mm)
    surface_tolerance_mm: float = 1.0
    val_every: int = 5  # >= 1
    val_overlap: float = 0.5  # [0, 1)
    use_teacher: bool = False
    allow_partial_init: bool = False


@dataclass
class InferenceConfig:
    """Sliding-window inference of ``medhpm predict`` (and the pipeline's prediction of the test scans)."""

    overlap: float = 0.5  # [0, 1)
    blend: str = "gaussian"  # gaussian | constant
    sw_batch_size: int = 4  # >= 1; windows per forward pass (also used by fine-tuning's validation)


CPU_MEMORY = ("auto", "reuse", "release")  # runtime.cpu_memory (medhpm.runtime.device.configure_cpu_memory)


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | bf16-native (bf16 where native, runtime/device.py)
    # none | default | reduce-overhead (CUDA graphs on CUDA) | max-autotune: torch.compile of the training
    # step's forward and losses (docs/PERFORMANCE.md); the old switch true/false reads as default/none
    compile: str = "none"
    deterministic: bool = False
    threads: int = 0  # >= 0; torch intra-op threads on CPU; 0 = library default within the cgroup CPU quota
    # auto | reuse | release: whether glibc keeps the memory a CPU step frees for the next one (auto: reuse on
    # a CPU device under glibc; runtime/device.py configure_cpu_memory, docs/PERFORMANCE.md)
    cpu_memory: str = "auto"
    log_every: int = 1  # >= 1; steps between JSON-lines log records
    progress: bool = True


@dataclass
class Config:
    name: str = "default"  # free text (default run folder names)
    seed: int = 0  # >= 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------------------------------
# Loading


def packaged_configs(folder: str = "") -> list[str]:
    """Names of the YAML configs shipped inside the package (``folder="experiments"``: the experiment specs)."""
    root = _packaged(folder)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _packaged(folder: str = ""):
    root = resources.files("medhpm") / "configs"
    return root / folder if folder else root


def read_yaml(name_or_path: str, folder: str = "", what: str = "config") -> tuple[dict, str]:
    """The mapping in a YAML file: a path, or the name of one packaged under ``medhpm/configs/FOLDER``.

    Returns the mapping and where it came from (for messages); ``what`` names the kind of file in them.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {name_or_path!r} does not exist")
        text, where = path.read_text(), str(path)
    else:
        res = _packaged(folder) / f"{name_or_path}.yaml"
        if not res.is_file():
            names = packaged_configs(folder)
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"no packaged {what} named {name_or_path!r} (packaged: {', '.join(names)})."
                f"{hint} Give a path to a .yaml file to use your own."
            )
        text, where = res.read_text(), f"packaged {what} {name_or_path!r}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, not {type(data).__name__}")
    return data, where


def _known_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_known_keys(type(default), full + "."))
    return keys


def _suggest(key: str) -> str:
    keys = _known_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # compare the last part too: "pretrain.lamda_pred" -> "pretrain.lambda_pred"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    return f" Did you mean {close[0]!r}?" if close else ""


# Keys of earlier versions: an old key in a YAML file or an override is an error that gives today's name.
# The predictor's sliding-window settings were the `evaluate:` section (evaluation never read them).
RENAMED_KEYS = {"evaluate": "inference", "pretrain.pred_loss": "pretrain.prediction_loss"}
_RENAMED_NOTES = {"pretrain.pred_loss": " (values: ranking | absolute; 'relative' is now 'ranking')"}
REMOVED_KEYS = {  # keys nothing read
    "evaluate.output_on_cpu": "`medhpm predict --gpu-output` (Predictor(output_on_cpu=False)) keeps the output "
                              "on the GPU",
    "evaluate.save_probabilities": "`medhpm predict --probabilities` (predict_path(save_probabilities=True)) "
                                   "writes the class probabilities",
    **{f"pretrain.{k}": "the EMA schedule is now a share of the run's optimizer steps: pretrain.ema_horizon_start, "
                        "pretrain.ema_horizon_end and pretrain.ema_ramp (docs/method.md)"
       for k in ("ema_m_start", "ema_m_end", "ema_ramp_epochs")},
}


def _old_key(key: str) -> Optional[str]:
    """What to say about ``key`` if it is a key of an earlier version, else None."""
    if key in REMOVED_KEYS:
        return f"config key {key!r} was removed: {REMOVED_KEYS[key]}"
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return f"config key {key!r} is now called {new + key[len(old):]!r}{_RENAMED_NOTES.get(old, '')}"
    return None


def _reject_old_keys(keys: Sequence[str], where: str) -> None:
    for key in keys:
        old = _old_key(key)
        if old:
            raise ConfigError(f"{old} (in {where})")


def _leaves(data: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's values (an empty section counts as one)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _merge(base, other, where: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        if not key:  # a tuple of the wrong length is reported without its key: find it leaf by leaf
            key = _failing_key(base, other)
        if "not in struct" in msg or "Key '" in msg and "not" in msg:
            raise ConfigError(f"unknown config key {key!r} in {where}.{_suggest(key)}") from None
        n = re.match(r"TupleConfig length (\d+) does not match type hint length (\d+)", msg)
        if n:
            msg = f"must hold {n.group(2)} values, not {n.group(1)}"
        raise ConfigError(f"bad value for config key {key!r} in {where}: {msg}") from None


def _failing_key(base, other) -> str:
    """The dotted key of ``other`` whose merge into ``base`` fails ("" if none does alone)."""
    data = OmegaConf.to_container(other)
    for key in _leaves(data) if isinstance(data, dict) else []:
        value: Any = data
        for part in key.split("."):
            value = value[part]
        try:
            OmegaConf.merge(base, _nested(key, value))
        except OmegaConfBaseException:
            return key
    return ""


def _nested(key: str, value: Any):
    for part in reversed(key.split(".")):
        value = {part: value}
    return OmegaConf.create(value)


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Resolve a config: defaults, then the YAML (packaged name or path), then ``key=value`` overrides."""
    data, where = read_yaml(name_or_path) if name_or_path else ({}, "")
    return _resolve(data, where, overrides)


def _resolve(data: dict, where: str, overrides: Optional[Sequence[str]]) -> Config:
    """Defaults, then the mapping ``data`` (read from ``where``), then ``key=value`` overrides; validated."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    if data:
        _reject_old_keys(_leaves(data), where)
        cfg = _merge(cfg, OmegaConf.create(data), where)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (e.g. pretrain.epochs=10)")
            key = item.split("=", 1)[0]
            # Short forms that users type most: method=hpm -> pretrain.method=hpm
            if key in _SHORTCUTS:
                item = _SHORTCUTS[key] + item[len(key):]
            _reject_old_keys([item.split("=", 1)[0]], f"command-line override {item!r}")
            cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command-line override {item!r}")
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj  # type: ignore[return-value]


_SHORTCUTS = {"method": "pretrain.method", "seed": "seed", "preset": "model.preset", "roi": "data.roi"}


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """The config stored in a checkpoint (or run folder); one written by an earlier version is read in
    today's key names."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    cfg = _merge(cfg, OmegaConf.create(_upgrade(data)), "stored config")
    obj = OmegaConf.to_object(cfg)
    obj.runtime.compile = compile_mode(obj.runtime.compile)  # type: ignore[attr-defined]  # the old switch
    return obj  # type: ignore[return-value]


def _upgrade(data: dict) -> dict:
    """A stored config with the keys of :data:`RENAMED_KEYS` renamed and those of :data:`REMOVED_KEYS` dropped."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    if isinstance(data.get("evaluate"), dict):
        old = data.pop("evaluate")
        for key in REMOVED_KEYS:
            old.pop(key.split(".", 1)[1], None)
        data.setdefault("inference", old)
    pre = data.get("pretrain")
    for key in REMOVED_KEYS:  # a run of an earlier version resumes with today's EMA schedule
        if key.startswith("pretrain.") and isinstance(pre, dict):
            pre.pop(key.split(".", 1)[1], None)
    if isinstance(pre, dict) and "pred_loss" in pre:
        value = pre.pop("pred_loss")
        pre.setdefault("prediction_loss", "ranking" if value == "relative" else value)
    if isinstance(pre, dict) and pre and "teacher_view" not in pre:  # resolved before teacher_view existed:
        pre["teacher_view"] = "full"  # its teacher scored the full volume, and it keeps doing so
    return data


# What a checkpoint's weights and preprocessing depend on: a run resumed (or a checkpoint used) with other
# values of these keys would load mismatched tensors or see differently prepared data.
CHECKPOINT_KEYS = (
    "model.preset", "model.patch_size", "model.in_chans", "model.pos_embed", "model.decoder_dim",
    "model.decoder_depth", "model.decoder_heads", "model.feature_size", "model.skip_blocks", "model.norm_name",
    "data.roi", "data.spacing", "data.orientation", "data.a_min", "data.a_max", "data.b_min", "data.b_max",
    "pretrain.method", "pretrain.teacher_view", "pretrain.teacher_views", "finetune.architecture",
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
STAGE_ONLY_KEYS = {"pretrain": ("model.decoder_", "pretrain."),
                   "finetune": ("model.feature_size", "model.skip_blocks", "model.norm_name", "finetune.")}


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


# --------------------------------------------------------------------------------------------------
# Validation of values that parse but cannot work

METHODS = ("mae", "hpm", "no_lpred", "no_learn_to_mask")


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config key {key!r}: {msg}")


# Encoder size presets (``model.preset``), here so that validation needs nothing above the config;
# ``medhpm.models.vit.build_encoder`` builds from this table.
ENCODER_PRESETS: dict[str, dict] = {
    # micro: for tests and CPU demos. Depth 12 so UNETR's default skips (blocks 3, 6, 9) exist;
    # width 96 is divisible by 6 (sin-cos) and by its 4 heads (head width 24).
    "micro": dict(embed_dim=96, depth=12, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


# The class syntax of ``finetune.reported`` (and of ``--classes``): a preset name or a ``NAME=VALUE,...``
# list. The rule lives here so that validate() can check it before any data is read; the presets' classes
# (BTCV label values) are ``medhpm.evaluate.classes.PRESETS``, whose names are these.
CLASS_PRESETS = ("btcv8", "btcv13")

# Names end up in CSV cells, JSON keys and NAME=VALUE specs, so separators are not allowed in them.
_CLASS_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def check_class_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _CLASS_NAME_RE.match(name):
        raise ValueError(
            f"Invalid class name {name!r} in {where}: a name starts with a letter and contains only "
            "letters, digits, '_' and '-'."
        )
    return name


def check_label_value(value: object, where: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True=1 is almost surely a mistake
        raise ValueError(f"Invalid label value {value!r} in {where}: expected a positive integer.")
    try:
        as_int = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"Invalid label value {value!r} in {where}: expected a positive integer.") from None
    if as_int <= 0:
        raise ValueError(
            f"Invalid label value {value!r} in {where}: label values must be >= 1 (0 is the background)."
        )
    return as_int


def class_table(pairs: list[tuple[int, str]], where: str) -> dict[int, str]:
    """``{value: name}`` sorted by value from ``(value, name)`` pairs; repeated values or names are errors."""
    if not pairs:
        raise ValueError(f"No classes given in {where}.")
    seen_values: dict[int, str] = {}
    seen_names: dict[str, int] = {}
    for value, name in pairs:
        if value in seen_values:
            raise ValueError(
                f"Label value {value} is given twice in {where} ({seen_values[value]!r} and {name!r})."
            )
        if name in seen_names:
            raise ValueError(f"Class name {name!r} is given twice in {where} (values {seen_names[name]} and {value}).")
        seen_values[value] = name
        seen_names[name] = value
    return dict(sorted(seen_values.items()))


def parse_class_list(spec: str) -> str | dict[int, str]:
    """A class string: the preset's name (lower case, one of :data:`CLASS_PRESETS`) or the ``{value: name}``
    of a ``"NAME=VALUE,NAME=VALUE"`` list. Raises ValueError naming the offending token."""
    text = spec.strip()
    if text.lower() in CLASS_PRESETS:
        return text.lower()
    if "=" not in text:
        raise ValueError(
            f"Unknown class preset {text!r}: use one of {sorted(CLASS_PRESETS)} or a 'NAME=VALUE,...' list "
            "such as 'spleen=1,liver=6'."
        )
    where = f"the class list {text!r}"
    pairs = []
    for token in text.split(","):
        token = token.strip()
        if not token:
            continue  # tolerate a trailing comma
        name, sep, value = token.partition("=")
        if not sep or not name.strip() or not value.strip() or "=" in value:
            raise ValueError(f"Bad item {token!r} in {where}: expected NAME=VALUE, e.g. 'liver=6'.")
        name, value = name.strip(), value.strip()
        if name.isdigit() and not value.isdigit():
            raise ValueError(f"Bad item {token!r} in {where}: the order is NAME=VALUE, e.g. '{value}={name}'.")
        at = f"item {token!r} of {where}"
        pairs.append((check_label_value(value, at), check_class_name(name, at)))
    return class_table(pairs, where)


_AXIS_PAIRS = ("LR", "AP", "SI")


def _orientation_ok(code: str) -> bool:
    return (len(code) == 3 and all(c in "LRAPSI" for c in code)
            and sorted("".join(p for p in _AXIS_PAIRS if c in p) for c in code) == sorted(_AXIS_PAIRS))


def _count(value, key: str, low: int, what: str = "") -> None:
    _check(value >= low, key, f"{value} is out of range: must be at least {low}{what}")


def _unit(value, key: str, what: str = "a probability") -> None:
    _check(0.0 <= value <= 1.0, key, f"{value} is out of range: must lie in [0, 1] ({what})")


def _check_snapshot_steps(p: PretrainConfig) -> None:
    """``pretrain.snapshot_steps``: integers >= 1, strictly increasing, at most the run's optimizer steps
    where ``steps_per_epoch`` fixes them (with 0 the trainer knows them only once the data is read, and
    warns at the start about listed steps beyond the run)."""
    key, steps = "pretrain.snapshot_steps", tuple(p.snapshot_steps)
    for s in steps:
        _check(isinstance(s, int) and not isinstance(s, bool) and s >= 1, key,
               f"{s!r} is out of range: each entry must be an optimizer step, an integer of at least 1")
    for a, b in zip(steps, steps[1:]):
        _check(b > a, key, f"{list(steps)} must be strictly increasing ({b} follows {a})")
    if steps and p.steps_per_epoch > 0:
        total = p.epochs * p.steps_per_epoch
        _check(steps[-1] <= total, key,
               f"step {steps[-1]} is beyond the run: it has {total} optimizer steps (pretrain.epochs {p.epochs} x "
               f"pretrain.steps_per_epoch {p.steps_per_epoch})")


def validate(cfg: Config) -> Config:
    """Raise a :class:`ConfigError` naming the key for any value outside its range (written beside each
    field); called on every resolved config, before any data is read or any folder is made."""
    d, m, p, f = cfg.data, cfg.model, cfg.pretrain, cfg.finetune
    _count(cfg.seed, "seed", 0)
    # data
    _check(d.format in ("auto", "msd", "nnunet", "btcv", "folder"), "data.format",
           "must be auto, msd, nnunet, btcv or folder")
    _check(d.split in ("transunet", "monai"), "data.split", f"{d.split!r} is not transunet or monai")
    _count(d.phantom_cases, "data.phantom_cases", 1)
    _count(d.phantom_seed, "data.phantom_seed", 0)
    _check(d.phantom_variability in ("standard", "wide"), "data.phantom_variability",
           f"{d.phantom_variability!r} is not standard or wide")
    _check(_orientation_ok(d.orientation), "data.orientation",
           f"{d.orientation!r} must be three letters, one of each pair L/R, A/P, S/I (e.g. RAS or LPS)")
    _check(len(d.spacing) == 3 and all(s > 0 for s in d.spacing), "data.spacing",
           f"{tuple(d.spacing)} must be three positive voxel sizes (mm)")
    _check(d.a_max > d.a_min, "data.a_max", f"HU window [data.a_min, data.a_max] = [{d.a_min}, {d.a_max}] is empty")
    _check(d.b_max > d.b_min, "data.b_max",
           f"output range [data.b_min, data.b_max] = [{d.b_min}, {d.b_max}] is empty")
    _check(d.crop in ("label", "classes", "random"), "data.crop", "must be 'label', 'classes' or 'random'")
    _count(d.num_samples, "data.num_samples", 1)
    for k in ("pos", "neg"):
        _check(getattr(d, k) >= 0, f"data.{k}", f"{getattr(d, k)} is out of range: must be 0 or more")
    _check(d.pos + d.neg > 0, "data.pos", "data.pos and data.neg are both 0: no crop centre could be drawn")
    for k in ("flip_prob", "rot90_prob", "intensity_scale_prob", "intensity_shift_prob"):
        _unit(getattr(d, k), f"data.{k}")
    _check(0.0 <= d.intensity_scale < 1.0, "data.intensity_scale",
           f"{d.intensity_scale} is out of range: must lie in [0, 1) (intensities are scaled by 1 + U(-s, s))")
    _check(d.intensity_shift >= 0, "data.intensity_shift", f"{d.intensity_shift} is out of range: must be 0 or more")
    _count(d.val_cases, "data.val_cases", 0)
    _check(d.cache in ("none", "memory", "disk", "device"), "data.cache", "must be none, memory, disk or device")
    _count(d.num_workers, "data.num_workers", 0)
    _count(d.prefetch_factor, "data.prefetch_factor", 1)
    # model
    _check(m.preset in ENCODER_PRESETS, "model.preset", f"{m.preset!r} is not one of {', '.join(ENCODER_PRESETS)}")
    width, heads = ENCODER_PRESETS[m.preset]["embed_dim"], ENCODER_PRESETS[m.preset]["num_heads"]
    _check(width % heads == 0, "model.preset", f"width {width} is not divisible by {heads} heads")
    _check(m.patch_size > 0, "model.patch_size", f"{m.patch_size} is out of range: must be positive")
    _check(len(d.roi) == 3 and all(r > 0 for r in d.roi), "data.roi", f"{tuple(d.roi)} must be three positive sizes")
    _check(
        all(r % m.patch_size == 0 for r in d.roi),
        "data.roi",
        f"{tuple(d.roi)} is not divisible by the patch size {m.patch_size} in every axis",
    )
    _count(m.in_chans, "model.in_chans", 1)
    _check(m.pos_embed in ("sincos", "learnable"), "model.pos_embed", f"{m.pos_embed!r} is not sincos or learnable")
    for k in ("decoder_dim", "decoder_depth", "decoder_heads", "feature_size"):
        _count(getattr(m, k), f"model.{k}", 1)
    _check(m.decoder_dim % m.decoder_heads == 0, "model.decoder_heads",
           f"decoder width {m.decoder_dim} is not divisible by {m.decoder_heads} heads")
    if m.skip_blocks is not None:
        depth, blocks = ENCODER_PRESETS[m.preset]["depth"], tuple(m.skip_blocks)
        _check(all(1 <= b <= depth for b in blocks) and list(blocks) == sorted(set(blocks)), "model.skip_blocks",
               f"{blocks} must be distinct increasing block numbers within the encoder depth 1..{depth}")
        if m.patch_size & (m.patch_size - 1) == 0 and m.patch_size > 1:
            n = m.patch_size.bit_length() - 2  # log2(patch) - 1 intermediate resolutions
            _check(len(blocks) == n, "model.skip_blocks",
                   f"{blocks} has {len(blocks)} block(s); with patch {m.patch_size} UNETR needs {n}")
    _check(m.norm_name in ("instance", "batch"), "model.norm_name", f"{m.norm_name!r} is not instance or batch")
    # both training stages
    for sec, name in ((p, "pretrain"), (f, "finetune")):
        _count(sec.epochs, f"{name}.epochs", 1)
        _count(sec.steps_per_epoch, f"{name}.steps_per_epoch", 0, " (0: one pass over the training volumes)")
        _count(sec.batch_size, f"{name}.batch_size", 1)
        _count(sec.accum_steps, f"{name}.accum_steps", 1)
        _check(sec.lr > 0, f"{name}.lr", f"{sec.lr} is out of range: must be positive")
        _count(sec.lr_ref_batch, f"{name}.lr_ref_batch", 1, " (the lr is scaled by effective batch / lr_ref_batch)")
        _check(0 <= sec.min_lr <= sec.lr, f"{name}.min_lr",
               f"{sec.min_lr} is out of range: must lie in [0, {name}.lr] = [0, {sec.lr}]")
        _check(sec.warmup_epochs >= 0, f"{name}.warmup_epochs", f"{sec.warmup_epochs} is out of range: must be 0 or more")
        _check(sec.weight_decay >= 0, f"{name}.weight_decay", f"{sec.weight_decay} is out of range: must be 0 or more")
        _check(len(sec.betas) == 2 and all(0 <= b < 1 for b in sec.betas), f"{name}.betas",
               f"{tuple(sec.betas)} must be two values in [0, 1)")
        _check(sec.clip_grad >= 0, f"{name}.clip_grad", "must be 0 (no clipping) or a positive gradient norm")
        _check(sec.nonfinite in ("stop", "skip"), f"{name}.nonfinite", "must be stop or skip")
        _count(sec.checkpoint_every, f"{name}.checkpoint_every", 1)
    # pre-training
    _check(p.method in METHODS, "pretrain.method", f"{p.method!r} is not one of {', '.join(METHODS)}")
    _check(0.0 < p.mask_ratio < 1.0, "pretrain.mask_ratio", f"{p.mask_ratio} is outside (0, 1)")
    for k in ("alpha_0", "alpha_T"):
        _check(0.0 <= getattr(p, k) <= 1.0, f"pretrain.{k}", "must lie in [0, 1]")
    _check(p.lambda_pred >= 0, "pretrain.lambda_pred", f"{p.lambda_pred} is out of range: must be 0 or more")
    _check(p.prediction_loss in ("ranking", "absolute"), "pretrain.prediction_loss",
           "must be ranking or absolute" + (" ('relative' is now called 'ranking')" if p.prediction_loss == "relative" else ""))
    for k in ("ema_horizon_start", "ema_horizon_end"):
        _check(0.0 < getattr(p, k) <= 1.0, f"pretrain.{k}", "must lie in (0, 1]: a share of the run's optimizer steps")
    _check(0.0 <= p.ema_ramp <= 1.0, "pretrain.ema_ramp", "must lie in [0, 1]: a share of the run's optimizer steps")
    _count(p.figure_every, "pretrain.figure_every", 0, " (0: first and last epoch only)")
    _check(p.teacher_view in ("full", "masked"), "pretrain.teacher_view", f"{p.teacher_view!r} is not full or masked")
    n_tokens = math.prod(int(r) // m.patch_size for r in d.roi)  # roi and patch size were checked above
    _check(p.teacher_views == 0 or 2 <= p.teacher_views <= n_tokens, "pretrain.teacher_views",
           f"{p.teacher_views} is out of range: must be 0 (one view per visible share 1 - mask_ratio) or 2 to "
           f"{n_tokens} (the tokens of a data.roi crop)")
    _check(p.teacher_views == 0 or p.teacher_view == "masked", "pretrain.teacher_views",
           f"{p.teacher_views} views are only used with pretrain.teacher_view=masked (it is {p.teacher_view!r}): "
           "set pretrain.teacher_view=masked, or leave teacher_views at 0")
    _check_snapshot_steps(p)
    # fine-tuning
    _check(f.architecture in ("unetr", "dynunet"), "finetune.architecture", "must be unetr or dynunet")
    _check(0.0 < f.layer_decay <= 1.0, "finetune.layer_decay", "must lie in (0, 1]")
    _check(0.0 <= f.drop_path < 1.0, "finetune.drop_path", "must lie in [0, 1)")
    _check(f.labelled_cases >= 0, "finetune.labelled_cases", "must be 0 (all training cases) or a count of cases")
    _check(f.dice_smooth_nr >= 0, "finetune.dice_smooth_nr", "must be 0 or more")
    _check(f.dice_smooth_dr > 0, "finetune.dice_smooth_dr", "must be positive (it keeps an empty class's Dice finite)")
    _check(f.num_classes >= 2, "finetune.num_classes", "must be at least 2 (background and one organ)")
    try:
        reported = parse_class_list(f.reported)
    except ValueError as e:
        raise ConfigError(f"config key 'finetune.reported': {e}") from None
    if isinstance(reported, dict):  # a preset always holds label 1, below any num_classes >= 2
        _check(min(reported) < f.num_classes, "finetune.reported",
               f"none of its label values {sorted(reported)} is below finetune.num_classes={f.num_classes}: "
               "nothing would be reported")
    _check(math.isfinite(f.surface_tolerance_mm) and f.surface_tolerance_mm >= 0, "finetune.surface_tolerance_mm",
           f"{f.surface_tolerance_mm} is out of range: must be 0 or more millimetres")
    _count(f.val_every, "finetune.val_every", 1)
    _check(0.0 <= f.val_overlap < 1.0, "finetune.val_overlap", f"{f.val_overlap} is out of range: must lie in [0, 1)")
    # inference
    _check(0.0 <= cfg.inference.overlap < 1.0, "inference.overlap", "must lie in [0, 1)")
    _check(cfg.inference.blend in ("gaussian", "constant"), "inference.blend",
           f"{cfg.inference.blend!r} is not gaussian or constant")
    _count(cfg.inference.sw_batch_size, "inference.sw_batch_size", 1)
    # runtime
    r = cfg.runtime
    _check(r.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", r.device) is not None, "runtime.device",
           f"{r.device!r} is not a device: use auto, cpu, cuda or cuda:N")
    _check(r.precision in ("auto", "fp32", "bf16", "bf16-native"), "runtime.precision",
           f"{r.precision!r} is not auto, fp32, bf16 or bf16-native")
    _count(r.threads, "runtime.threads", 0, " (0: the library default)")
    _check(r.cpu_memory in CPU_MEMORY, "runtime.cpu_memory", f"{r.cpu_memory!r} is not {', '.join(CPU_MEMORY)}")
    _count(r.log_every, "runtime.log_every", 1)
    r.compile = compile_mode(r.compile)
    return cfg


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def compile_mode(value: Any) -> str:
    """``runtime.compile`` as one of :data:`COMPILE_MODES`; the old switch (``true``/``false``, also as the
    strings a YAML file or ``key=value`` gives for it) reads as ``default``/``none``."""
    if isinstance(value, bool):
        return "default" if value else "none"
    text = str(value).strip().lower()
    old = {"true": "default", "false": "none", "yes": "default", "no": "none", "on": "default", "off": "none"}
    text = old.get(text, text)
    if text not in COMPILE_MODES:
        raise ConfigError(f"config key 'runtime.compile': {value!r} is not one of {', '.join(COMPILE_MODES)} "
                          "(or the old switch true/false)")
    return text
