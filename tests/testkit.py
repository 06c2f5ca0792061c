"""The test packages' shared builders (importable as ``testkit``: tests/ is on sys.path through its
conftest.py): one synthetic CT and one set of tiny settings for seconds-long CPU runs."""

from __future__ import annotations

import math
import os

import numpy as np

# Blobs of a synthetic CT: (centre x, centre y, radius x, radius y, radius z, HU, label, jitter sign x,
# jitter sign y); coordinates run from -1 to 1 along each axis, a radius of inf makes a cylinder along z.
ORGAN_AND_BONE = (
    (0.3, 0.0, 0.3, 0.3, 0.6, 90.0, 1, 1, 1),  # an organ (label 1)
    (-0.35, -0.2, 0.15, 0.15, math.inf, 700.0, 2, 0, 0),  # a bone (label 2)
)
LIVER_AND_SPLEEN = (  # BTCV label values
    (-0.35, 0.0, 0.3, 0.3, 0.7, 100.0, 6, 1, 1),  # liver
    (0.4, -0.2, 0.18, 0.18, 0.5, 60.0, 1, 0, -1),  # spleen
)


def synthetic_ct(
    shape=(40, 40, 24),
    seed: int = 0,
    blobs=ORGAN_AND_BONE,
    body_hu: float = 40.0,
    noise_hu: float = 10.0,
    jitter: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Tiny CT-like volume in HU: air outside an elliptic body of ``body_hu``, ``blobs`` painted in order,
    Gaussian noise of ``noise_hu``; the blob centres move by up to ``jitter`` (drawn from ``seed``; 0: no
    draw). Returns (int16 image, uint8 label map)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    cx, cy = rng.uniform(-jitter, jitter, size=2) if jitter else (0.0, 0.0)
    img = np.full(shape, -1000.0)
    lab = np.zeros(shape, np.uint8)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1
    img[body] = body_hu
    for x0, y0, rx, ry, rz, hu, value, sx, sy in blobs:
        inside = ((x - x0 - sx * cx) / rx) ** 2 + ((y - y0 - sy * cy) / ry) ** 2 + (z / rz) ** 2 <= 1
        img[inside], lab[inside] = hu, value
    img += rng.normal(0.0, noise_hu, shape)
    return np.round(img).astype(np.int16), lab


# Overrides every tiny run shares: a micro ViT on 32^3 crops of 4 mm voxels, one pass over the data per
# epoch (whatever the packaged demo config chooses), no cache, one CPU thread, float32 (the demo's
# bf16-native would make the arithmetic depend on the CI machine's CPU; tests/runtime/test_precision.py and
# the quick demo cover it).
TINY = {
    "model.preset": "micro",
    "model.patch_size": "16",
    "data.roi": "[32,32,32]",
    "model.decoder_dim": "24",
    "model.decoder_heads": "4",
    "model.decoder_depth": "1",
    "model.feature_size": "8",
    "data.spacing": "[4,4,4]",
    "data.num_samples": "1",
    "pretrain.steps_per_epoch": "0",
    "finetune.steps_per_epoch": "0",
    "data.cache": "none",
    "finetune.val_every": "1",
    "inference.sw_batch_size": "1",
    "data.val_cases": "1",
    "runtime.device": "cpu",
    "runtime.progress": "false",
    "runtime.threads": "1",
    "runtime.precision": "fp32",
}


def tiny_settings(dataset: str | os.PathLike, *more: str, **extra) -> list[str]:
    """``key=value`` overrides for seconds-long CPU runs on ``dataset``: :data:`TINY`, then ``extra``
    (a mapping of a test package's own settings, passed as ``**{"key": value}``), then ``more``
    (``key=value`` strings), each replacing or adding keys."""
    ov = {"data.dataset": str(dataset), **TINY, **{k: str(v) for k, v in extra.items()}}
    for item in more:
        key, value = item.split("=", 1)
        ov[key] = value
    return [f"{k}={v}" for k, v in ov.items()]
