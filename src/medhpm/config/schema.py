"""The typed config of every stage: one dataclass per section. Each field is declared once, with its
default, its rule and what it means (:func:`setting`): :func:`medhpm.config.validate.validate` checks the
rules, :mod:`medhpm.config.reference` writes the table of docs/config.md from them. Rules that involve other keys
(an ROI divisible by the patch, a_min below a_max) are said in the field's help and checked by validate()."""

from __future__ import annotations

from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from collections.abc import Mapping
from typing import Any, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


def setting(default: Any, rule: str = "", help: str = "") -> Any:
    """A config field with its ``default``, its ``rule`` and its ``help``, in one declaration.

    ``rule``, checked for every value by validate(): ``">= N"``, ``"> N"``, an interval (``"[0, 1]"``,
    ``"[0, 1)"``, ``"(0, 1]"``, ``"(0, 1)"``) or choices (``"stop | skip"``); empty where the rule
    involves other keys (validate() checks it by hand; ``help`` says it). ``help``: what the value means,
    shown in docs/config.md and after a rule's error (``"0: one pass over the training volumes"``)."""
    return field(default=default, metadata={"rule": rule, "help": help})


@dataclass
class DataConfig:
    # Where the data is: a datalist JSON, an nnU-Net raw folder, a BTCV download folder, a plain folder
    # of NIfTI files / DICOM series, or "phantom" (generated into the run folder).
    dataset: str = setting("phantom", help='a path (checked when the run starts) or "phantom"')
    format: str = setting("auto", "auto | msd | nnunet | btcv | folder")
    split: str = setting("transunet", "transunet | monai", "BTCV only: transunet (18/12), monai (24/6)")
    phantom_cases: int = setting(12, ">= 1", 'only when dataset is "phantom"')
    phantom_seed: int = setting(0, ">= 0")
    phantom_variability: str = setting(
        "standard", "standard | wide", "wide: the variability of real scans (phase, scanner, ...)"
    )
    # Preprocessing recipe (docs/method.md, the recipe table; docs/own_data.md)
    orientation: str = setting("RAS", help="three letters, one of each pair L/R, A/P, S/I (RAS, LPS, ...)")
    spacing: tuple[float, float, float] = setting((1.5, 1.5, 2.0), help="three voxel sizes > 0 (mm)")
    a_min: float = setting(-175.0, help="below data.a_max (HU)")
    a_max: float = setting(250.0, help="above data.a_min (HU)")
    b_min: float = setting(0.0, help="below data.b_max")
    b_max: float = setting(1.0, help="above data.b_min")
    crop_foreground: bool = True
    roi: tuple[int, int, int] = setting(
        (96, 96, 96), help="three sizes > 0, each divisible by model.patch_size (voxels)"
    )
    crop: str = setting(
        "label",
        "label | classes | random",
        "label: pos:neg crops (needs labels); classes: equal odds per organ; random",
    )
    num_samples: int = setting(4, ">= 1", "crops per volume per iteration")
    pos: float = setting(1.0, ">= 0", "data.pos + data.neg > 0")
    neg: float = setting(1.0, ">= 0", "data.pos + data.neg > 0")
    flip_prob: float = setting(0.2, "[0, 1]", "a probability")
    rot90_prob: float = setting(0.2, "[0, 1]", "a probability")
    intensity_scale_prob: float = setting(0.1, "[0, 1]", "a probability")
    intensity_shift_prob: float = setting(0.1, "[0, 1]", "a probability")
    intensity_scale: float = setting(0.1, "[0, 1)", "intensities are scaled by 1 + U(-s, s)")
    intensity_shift: float = setting(0.1, ">= 0", "intensities are shifted by U(-s, s)")
    # Validation subset drawn from the TRAINING cases (never the test cases)
    val_cases: int = setting(2, ">= 0", "fewer than the training cases, checked when the datalist is read")
    # Loading at scale
    cache: str = setting("none", "none | memory | disk | device", "device: training crops drawn on the training device")
    cache_dir: str = setting("", help='a folder; "" = inside the run folder')
    num_workers: int = setting(0, ">= 0")
    prefetch_factor: int = setting(2, ">= 1", "batches per worker loaded ahead")
    extra_unlabelled: list[str] = field(default_factory=list)  # extra scans for label-free pre-training


@dataclass
class ModelConfig:
    preset: str = setting("base", help="an encoder preset: micro | tiny | small | base (ENCODER_PRESETS)")
    patch_size: int = setting(16, "> 0", "divides every data.roi size (UNETR: 8 or 16)")
    in_chans: int = setting(1, ">= 1")
    pos_embed: str = setting("sincos", "sincos | learnable", "sincos: fixed")
    # pre-training decoders (docs/method.md, "Parts")
    decoder_dim: int = setting(384, ">= 1", "divisible by model.decoder_heads")
    decoder_depth: int = setting(8, ">= 1")
    decoder_heads: int = setting(12, ">= 1")
    # UNETR
    feature_size: int = setting(16, ">= 1")
    skip_blocks: Optional[tuple[int, ...]] = setting(
        None,
        help="1-based blocks for UNETR's skips: distinct, increasing, within the encoder depth, log2(patch) - 1 "
        "of them; null: (3, 6, 9) for patch 16",
    )
    norm_name: str = setting("instance", "instance | batch")
    grad_checkpointing: bool = False


@dataclass
class TrainingConfig:
    """The optimisation schedule both training stages share; each stage sets its own ``lr``, ``betas`` and
    ``clip_grad`` (and may change any other default). A stage's override of a default keeps the rule here."""

    epochs: int = setting(100, ">= 1")
    steps_per_epoch: int = setting(0, ">= 0", "0: one pass over the training volumes")
    batch_size: int = setting(4, ">= 1", "CROPS per step per process: batch_size / data.num_samples volumes")
    accum_steps: int = setting(1, ">= 1")
    lr: float = setting(MISSING, "> 0")
    lr_ref_batch: int = setting(4, ">= 1", "the lr is scaled by effective batch / lr_ref_batch")
    min_lr: float = setting(0.0, help="in [0, lr]")
    warmup_epochs: float = setting(5.0, ">= 0")
    weight_decay: float = setting(0.05, ">= 0")
    betas: tuple[float, float] = setting(MISSING, help="two values in [0, 1)")
    clip_grad: float = setting(MISSING, ">= 0", "0: no clipping")
    nonfinite: str = setting("stop", "stop | skip", "what a non-finite loss does")
    checkpoint_every: int = setting(1, ">= 1", "epochs between 'last' checkpoints")


@dataclass
class PretrainConfig(TrainingConfig):
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 5.0
    method: str = setting("hpm", help="one of METHODS: mae | hpm | no_lpred | no_learn_to_mask")
    mask_ratio: float = setting(0.75, "(0, 1)")
    alpha_0: float = setting(0.0, "[0, 1]")
    alpha_T: float = setting(0.5, "[0, 1]")
    lambda_pred: float = setting(1.0, ">= 0")
    prediction_loss: str = setting("ranking", help="ranking (eq. 1) | absolute")
    norm_pix_loss: bool = True
    # EMA teacher: its averaging horizon 1/(1-m) as a SHARE of the run's optimizer steps, rising from
    # ema_horizon_start to ema_horizon_end over the first ema_ramp of the run (HPM's ImageNet schedule,
    # 0.999 -> 0.9999 over 100 of 200 epochs, in these terms; docs/method.md)
    ema_horizon_start: float = setting(0.001, "(0, 1]", "a share of the run's optimizer steps")
    ema_horizon_end: float = setting(0.01, "(0, 1]", "a share of the run's optimizer steps")
    ema_ramp: float = setting(0.5, "[0, 1]", "a share of the run's optimizer steps")
    figure_every: int = setting(0, ">= 0", "epochs between reconstruction figures; 0: first and last epoch only")
    # how the EMA teacher scores patches (medhpm.pretrain.step, docs/method.md "How the teacher is queried"):
    # masked - from teacher_views complementary masked views, like the inputs its predictor is trained on;
    # full - one pass over the whole unmasked volume, as the paper and HPM's code (ranks near chance)
    teacher_view: str = setting("masked", "full | masked")
    teacher_views: int = setting(
        0,
        help="0 (views whose visible share is 1 - mask_ratio: 4 at 0.75) or 2 .. the tokens of a crop; "
        "teacher_view masked only",
    )
    snapshot_steps: tuple[int, ...] = setting(
        (),
        help="optimizer steps (>= 1, strictly increasing, within the run) after which the student's encoder is "
        "written to RUN/snapshots/encoder_stepNNNNNNN.safetensors, the format of `medhpm export-encoder`",
    )
    # also keep the whole student (encoder, reconstructor, predictor) at those steps, as
    # RUN/snapshots/student_stepNNNNNNN.safetensors: what the reconstruction loss on held-out scans needs
    # (experiments, pretrain/heldout.py); the encoder alone is all fine-tuning reads
    snapshot_student: bool = False


@dataclass
class FinetuneConfig(TrainingConfig):
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.95)  # SelfMedMAE's fine-tuning AdamW
    clip_grad: float = 0.0  # 0: no clipping (SelfMedMAE)
    architecture: str = setting("unetr", "unetr | dynunet", "dynunet: the CNN reference row, always from scratch")
    layer_decay: float = setting(0.75, "(0, 1]")
    drop_path: float = setting(0.1, "[0, 1)")
    # DiceCE as SelfMedMAE and MONAI's BTCV recipe: Dice per sample, squared denominators, smooth 0 / 1e-6;
    # batch_dice=true takes the Dice over the whole batch (nnU-Net style), steadier for organs absent from a crop
    batch_dice: bool = False
    dice_squared_pred: bool = True
    dice_smooth_nr: float = setting(0.0, ">= 0")
    dice_smooth_dr: float = setting(1e-6, "> 0", "it keeps an empty class's Dice finite")
    labelled_cases: int = setting(
        0, ">= 0", "learn from the labels of only this many training cases, chosen by seed; 0: all training cases"
    )
    num_classes: int = setting(14, ">= 2", "background and the organs")
    reported: str = setting(
        "btcv8",
        help="classes to report: btcv8 | btcv13 (CLASS_PRESETS) | NAME=VALUE,... with a value below num_classes",
    )
    surface_tolerance_mm: float = setting(
        1.0, ">= 0", "millimetres, the normalised surface Dice's tolerance; 1 mm is FLARE's abdominal-CT choice"
    )
    val_every: int = setting(5, ">= 1")
    val_overlap: float = setting(0.5, "[0, 1)")
    use_teacher: bool = False
    allow_partial_init: bool = False


@dataclass
class InferenceConfig:
    """Sliding-window inference of ``medhpm predict`` (and the pipeline's prediction of the test scans)."""

    overlap: float = setting(0.5, "[0, 1)")
    blend: str = setting("gaussian", "gaussian | constant")
    sw_batch_size: int = setting(4, ">= 1", "windows per forward pass, also in fine-tuning's validation")


CPU_MEMORY = ("auto", "reuse", "release")  # runtime.cpu_memory (medhpm.runtime.device.configure_cpu_memory)


@dataclass
class RuntimeConfig:
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    precision: str = setting(
        "auto",
        "auto | fp32 | bf16 | bf16-native",
        "auto: bf16 on CUDA, fp32 on CPU; bf16-native: bf16 where the CPU has it (runtime/device.py)",
    )
    compile: str = setting(
        "none",
        help="none | default | reduce-overhead (CUDA graphs on CUDA) | max-autotune: torch.compile of the training "
        "step's forward and losses (docs/PERFORMANCE.md); the old switch true/false reads as default/none",
    )
    deterministic: bool = False
    threads: int = setting(
        0, ">= 0", "torch intra-op threads on CPU; 0: the library default within the cgroup CPU quota"
    )
    cpu_memory: str = setting(
        "auto",
        " | ".join(CPU_MEMORY),
        "whether glibc keeps the memory a CPU step frees for the next one (auto: reuse on a CPU under glibc)",
    )
    log_every: int = setting(1, ">= 1", "steps between JSON-lines log records")
    progress: bool = True


@dataclass
class Config:
    name: str = setting("default", help="free text (default run folder names)")
    seed: int = setting(0, ">= 0")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def declarations(section: type = Config, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """``(key, default, rule, help)`` of every leaf field, in declaration order. A field a subclass
    re-declares only to change its default (``pretrain.lr``) keeps the rule and help of its first
    declaration."""
    out: list[tuple[str, Any, str, str]] = []
    for f in fields(section):
        key = f"{prefix}{f.name}"
        if f.default_factory is not NO_DEFAULT and is_dataclass(f.default_factory):
            out += declarations(f.default_factory, key + ".")
            continue
        declared = [getattr(c, "__dataclass_fields__", {}).get(f.name) for c in reversed(section.__mro__)]
        meta: Mapping[str, str] = next(
            (d.metadata for d in declared if d is not None and d.metadata), {}
        )  # the first declaration
        default = f.default if f.default is not NO_DEFAULT else f.default_factory()  # type: ignore[misc]
        out.append((key, default, meta.get("rule", ""), meta.get("help", "")))
    return out
