"""The one definition of the transform chains (docs/method.md, the recipe table; docs/own_data.md).

Deterministic part, shared by every chain::

    LoadCTd -> Orientationd(orientation) -> Spacingd(spacing; bilinear image, nearest label)
    -> ScaleIntensityRanged([a_min, a_max] -> [b_min, b_max], clip) -> CropForegroundd (optional)
    -> SpatialPadd(roi)          # thin or small scans are padded up to the ROI, never rejected

Training adds random ROI crops (``num_samples`` per volume: positive/negative around the label when
``crop == "label"`` and labels exist, else uniform), flips on each axis, 90-degree rotations in the
axial plane and intensity scale/shift. Validation and prediction are the deterministic part only, so
``monai.transforms.Invertd`` with :func:`predict_transforms` maps a prediction back to the scan.

``LoadCTd`` checks what it loads (NaN/inf, non-integer labels, a label map off its image's grid); the
training chains (pretrain, train, val) also refuse a constant image and, given ``num_classes``, label values
out of range. Each problem is a ``DataError`` naming the file.

Every checkpoint records the chain's parameters as :func:`transforms_spec` (JSON, under "transforms"), and
:func:`transforms_from_spec` can rebuild a chain from such a record. Prediction does not read that record:
:class:`medhpm.segment.predict.Predictor` rebuilds its chain with :func:`predict_transforms` from the data
section of the config stored in the same checkpoint, which holds the same fields, so it runs the
deterministic chain the model was validated with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandomizableTrait,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transform,
)

from medhpm.config import DataConfig
from medhpm.data.ct_reader import LoadCTd

__all__ = [
    "SPEC_VERSION",
    "KINDS",
    "pretrain_transforms",
    "train_transforms",
    "val_transforms",
    "predict_transforms",
    "build_transforms",
    "transforms_spec",
    "transforms_from_spec",
    "config_from_spec",
]

SPEC_VERSION = 1
# The DataConfig fields that define a chain; everything else (data location, caching) does not.
SPEC_FIELDS = (
    "orientation",
    "spacing",
    "a_min",
    "a_max",
    "b_min",
    "b_max",
    "crop_foreground",
    "roi",
    "crop",
    "num_samples",
    "pos",
    "neg",
    "flip_prob",
    "rot90_prob",
    "intensity_scale_prob",
    "intensity_shift_prob",
    "intensity_scale",
    "intensity_shift",
)
# The fields the deterministic (cacheable) part depends on
DETERMINISTIC_FIELDS = ("orientation", "spacing", "a_min", "a_max", "b_min", "b_max", "crop_foreground", "roi")
KINDS = ("pretrain", "pretrain_labelled", "train", "val", "predict")


class _Above:
    """Foreground selector for CropForegroundd: voxels above the lower end of the scaled HU window
    (air after clipping). A class, not a lambda, so the chain pickles for spawned loader workers."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x):
        return x > self.threshold


def _check(cfg: DataConfig) -> None:
    roi = tuple(int(r) for r in cfg.roi)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"data.roi must be three positive sizes, got {cfg.roi}")
    if len(tuple(cfg.spacing)) != 3 or min(cfg.spacing) <= 0:
        raise ValueError(f"data.spacing must be three positive sizes in mm, got {cfg.spacing}")
    if cfg.a_max <= cfg.a_min:
        raise ValueError(f"data.a_min/a_max: the HU window [{cfg.a_min}, {cfg.a_max}] is empty")
    if cfg.rot90_prob > 0 and roi[0] != roi[1]:
        raise ValueError(
            f"data.rot90_prob={cfg.rot90_prob} rotates in the first two axes, which needs roi[0] == roi[1] "
            f"(got roi {roi}); make them equal or set data.rot90_prob=0"
        )
    if cfg.crop not in ("label", "classes", "random"):
        raise ValueError(f"data.crop must be 'label', 'classes' or 'random', got {cfg.crop!r}")
    if cfg.num_samples < 1:
        raise ValueError(f"data.num_samples must be at least 1, got {cfg.num_samples}")


def _deterministic(cfg: DataConfig, keys: list[str], num_classes: int | None = None, training: bool = False) -> list:
    roi = tuple(int(r) for r in cfg.roi)
    labelled = "label" in keys
    chain: list = [
        # training data must be finite, not constant, with integer labels below num_classes on the image's grid
        LoadCTd(keys, label_keys=("label",), num_classes=num_classes, reject_constant=training),
        # labels=None: axis codes follow the MetaTensor's space (RAS for both our readers)
        Orientationd(keys, axcodes=cfg.orientation, labels=None),
        Spacingd(
            keys,
            pixdim=tuple(float(s) for s in cfg.spacing),
            mode=["bilinear" if k == "image" else "nearest" for k in keys],
        ),
        ScaleIntensityRanged("image", a_min=cfg.a_min, a_max=cfg.a_max, b_min=cfg.b_min, b_max=cfg.b_max, clip=True),
    ]
    if cfg.crop_foreground:
        chain.append(
            CropForegroundd(
                keys,
                source_key="image",
                select_fn=_Above(cfg.b_min),
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    # pad the image with the value of air after scaling, the label with background
    chain.append(SpatialPadd("image", spatial_size=roi, mode="constant", value=float(cfg.b_min)))
    if labelled:
        chain.append(SpatialPadd("label", spatial_size=roi, mode="constant", value=0.0))
    return chain


def _random(
    cfg: DataConfig, keys: list[str], label_crops: bool, num_classes: int | None = None, pretraining: bool = False
) -> list:
    """Random crops and flips; for fine-tuning also 90-degree rotations and intensity scale and shift.
    Self-pre-training uses crops and flips only, as the paper and SelfMedMAE's
    ``get_mae_pretrain_transforms`` do (docs/method.md, recipe table)."""
    roi = tuple(int(r) for r in cfg.roi)
    if label_crops and cfg.crop == "classes" and num_classes:
        # centres drawn class by class with equal odds (nnU-Net-style oversampling of small organs);
        # a class absent from a scan is skipped for that scan
        crop: Any = RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=roi,
            num_classes=num_classes,
            num_samples=cfg.num_samples,
            image_key="image",
            image_threshold=cfg.b_min,
            warn=False,
        )
    elif label_crops:
        crop = RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=roi,
            pos=cfg.pos,
            neg=cfg.neg,
            num_samples=cfg.num_samples,
            image_key="image",
            image_threshold=cfg.b_min,  # negative centres inside the body, not in air
        )
    else:
        crop = RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=cfg.num_samples, random_size=False)
    flips = [
        crop,
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=0),
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=1),
        RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=2),
    ]
    if pretraining:
        return flips
    return flips + [
        RandRotate90d(keys, prob=cfg.rot90_prob, max_k=3),
        RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_scale_prob),
        RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_shift_prob),
    ]


def _finish(cfg: DataConfig, kind: str, chain: list, keys: list[str]) -> Compose:
    chain.append(EnsureTyped(keys, dtype=torch.float32))
    out = Compose(chain)
    # carried along so a dataset can key its disk cache on the chain's parameters
    out.medhpm_spec = {**transforms_spec(cfg), "kind": kind}  # type: ignore[attr-defined]
    return out


def pretrain_transforms(cfg: DataConfig, labelled: bool = False) -> Compose:
    """Chain for self-pre-training. ``labelled``: the entries have labels, which then guide the crops
    (``cfg.crop == "label"``) and travel with the image; otherwise crops are uniform and only "image"
    is loaded. Returns a Compose giving a list of ``cfg.num_samples`` dicts per volume."""
    _check(cfg)
    keys = ["image", "label"] if labelled else ["image"]
    # class-balanced crops need the class count, which pre-training does not know: pos/neg crops there
    chain = _deterministic(cfg, keys, training=True) + _random(
        cfg, keys, label_crops=labelled and cfg.crop != "random", pretraining=True
    )
    return _finish(cfg, "pretrain_labelled" if labelled else "pretrain", chain, keys)


def train_transforms(cfg: DataConfig, num_classes: int | None = None) -> Compose:
    """Fine-tuning chain (image and label): ``cfg.num_samples`` random ROI crops per volume, each
    {"image": (1, *roi) float32 in [b_min, b_max], "label": (1, *roi) float32 integer values}.
    ``num_classes`` (``finetune.num_classes``): a label value not below it is an error naming the file."""
    _check(cfg)
    keys = ["image", "label"]
    chain = _deterministic(cfg, keys, num_classes, training=True) + _random(
        cfg, keys, label_crops=cfg.crop != "random", num_classes=num_classes
    )
    return _finish(cfg, "train", chain, keys)


def val_transforms(cfg: DataConfig, num_classes: int | None = None) -> Compose:
    """Validation chain (image and label): the deterministic part, whole volumes, invertible.
    ``num_classes`` as in :func:`train_transforms`."""
    _check(cfg)
    keys = ["image", "label"]
    return _finish(cfg, "val", _deterministic(cfg, keys, num_classes, training=True), keys)


def predict_transforms(cfg: DataConfig) -> Compose:
    """Prediction chain (image only): the deterministic part, invertible with ``monai.transforms.Invertd``
    (orig_keys="image") to bring a prediction back to the scan's own grid."""
    _check(cfg)
    keys = ["image"]
    return _finish(cfg, "predict", _deterministic(cfg, keys), keys)


def build_transforms(cfg: DataConfig, kind: str, num_classes: int | None = None) -> Compose:
    """The chain of ``kind``: pretrain | pretrain_labelled | train | val | predict (``num_classes``: train
    and val only)."""
    if kind == "pretrain":
        return pretrain_transforms(cfg, labelled=False)
    if kind == "pretrain_labelled":
        return pretrain_transforms(cfg, labelled=True)
    if kind == "train":
        return train_transforms(cfg, num_classes)
    if kind == "val":
        return val_transforms(cfg, num_classes)
    if kind == "predict":
        return predict_transforms(cfg)
    raise ValueError(f"unknown transform chain {kind!r}; use one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------------
# Serialisation (stored with every checkpoint)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def transforms_spec(cfg: DataConfig) -> dict:
    """JSON-able description of the chains: {"version": 1, <the DataConfig fields of SPEC_FIELDS>}."""
    spec: dict[str, Any] = {"version": SPEC_VERSION}
    for name in SPEC_FIELDS:
        spec[name] = _jsonable(getattr(cfg, name))
    return spec


def config_from_spec(spec: dict) -> DataConfig:
    """A DataConfig whose chain fields are those of ``spec`` (other fields at their defaults)."""
    if not isinstance(spec, dict):
        raise ValueError(f"transform spec must be a dict, got {type(spec).__name__}")
    version = spec.get("version")
    if version != SPEC_VERSION:
        raise ValueError(
            f"transform spec version {version!r} is not supported by this medhpm (reads version {SPEC_VERSION}); "
            "the checkpoint was written by a different medhpm version"
        )
    missing = [k for k in SPEC_FIELDS if k not in spec]
    unknown = [k for k in spec if k not in SPEC_FIELDS and k not in ("version", "kind")]
    if missing or unknown:
        raise ValueError(f"transform spec: missing fields {missing}, unknown fields {unknown}")
    values = {}
    for k in SPEC_FIELDS:
        v = spec[k]
        if isinstance(v, list):  # JSON has no tuples; DataConfig's sequences here are tuples
            v = tuple(v)
        values[k] = v
    return dataclasses.replace(DataConfig(), **values)


def transforms_from_spec(spec: dict, kind: str) -> Compose:
    """Rebuild the chain ``kind`` (pretrain | pretrain_labelled | train | val | predict) from a spec."""
    return build_transforms(config_from_spec(spec), kind)


# ----------------------------------------------------------------------------------------- chain anatomy
def flat_transforms(transform: Any) -> list:
    """The transforms of a (nested) Compose chain, in order."""
    # not Compose.flatten(): it builds a new Compose, whose constructor re-seeds the shared transforms
    if isinstance(transform, Compose):
        return [t for sub in transform.transforms for t in flat_transforms(sub)]
    return [transform]


def deterministic_head(transform: Any) -> list:
    """The transforms of a chain up to its first random one: what a cache may compute once per case."""
    head = []
    for t in flat_transforms(transform):
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
            break
        head.append(t)
    return head
