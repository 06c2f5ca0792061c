"""The BTCV label table: one row per organ, and the organs the segmentation protocol scores.

Every other BTCV table in the package is read from ``BTCV_ORGANS``: ``BTCV_LABELS`` (the names written
into a dataset.json, as the BTCV download and the phantoms label their organs), ``BTCV13`` (the
snake_case class names that metrics.json, metrics.csv and the figures use) and ``PROTOCOL_ORGANS`` (the
eight organs of the paper's Table 1, TransUNet's protocol, see docs/PROTOCOL.md).
"""

from __future__ import annotations

__all__ = ["BTCV_ORGANS", "BTCV_LABELS", "BTCV13", "PROTOCOL_ORGANS"]

# (label value, name in a dataset.json, class name in the evaluation files)
BTCV_ORGANS: tuple[tuple[int, str, str], ...] = (
    (1, "spleen", "spleen"),
    (2, "right kidney", "right_kidney"),
    (3, "left kidney", "left_kidney"),
    (4, "gallbladder", "gallbladder"),
    (5, "esophagus", "esophagus"),
    (6, "liver", "liver"),
    (7, "stomach", "stomach"),
    (8, "aorta", "aorta"),
    (9, "inferior vena cava", "inferior_vena_cava"),
    (10, "portal and splenic vein", "portal_splenic_vein"),
    (11, "pancreas", "pancreas"),
    (12, "right adrenal gland", "right_adrenal"),
    (13, "left adrenal gland", "left_adrenal"),
)

# label value -> dataset.json name, with the background (value 0)
BTCV_LABELS: dict[int, str] = {0: "background", **{v: name for v, name, _ in BTCV_ORGANS}}

# label value -> evaluation class name, organs only
BTCV13: dict[int, str] = {v: key for v, _, key in BTCV_ORGANS}

# The eight organs that the segmentation protocol scores (the paper's Table 1).
PROTOCOL_ORGANS: tuple[int, ...] = (1, 2, 3, 4, 6, 7, 8, 11)
