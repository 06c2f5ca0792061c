"""The typed config of every stage: one dataclass per section, each field with its default and its range
in a comment (checked by :mod:`medhpm.config.validate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


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
    # Preprocessing recipe (docs/method.md, the recipe table; docs/own_data.md)
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
    # pre-training decoders (docs/method.md, "Parts")
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
    # also keep the whole student (encoder, reconstructor, predictor) at those steps, as
    # RUN/snapshots/student_stepNNNNNNN.safetensors: what the reconstruction loss on held-out scans needs
    # (experiments, pretrain/heldout.py); the encoder alone is all fine-tuning reads
    snapshot_student: bool = False


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
    precision: str = (
        "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | bf16-native (bf16 where native, runtime/device.py)
    )
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
