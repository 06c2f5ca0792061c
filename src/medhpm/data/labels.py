"""The BTCV label table: one row per organ, and the organs the segmentation protocol scores.

Every other BTCV table in the package is read from ``BTCV_ORGANS``: ``BTCV_LABELS`` (the names written
into a dataset.json, as the BTCV download and the phantoms label their organs), ``BTCV13`` (the
snake_case class names that metrics.json, metrics.csv and the figures use) and ``PROTOCOL_ORGANS`` (the
eight organs of the paper's Table 1, TransUNet's protocol, see docs/reproduce_btcv.md).

``LABEL_PALETTE`` / :func:`label_rgb` are the one colour table of label values: the overlay figures paint
with it and every predicted label map's 3D Slicer and ITK-SNAP colour tables carry it.
"""

from __future__ import annotations

__all__ = ["BTCV_ORGANS", "BTCV_LABELS", "BTCV13", "PROTOCOL_ORGANS", "LABEL_PALETTE", "label_rgb"]

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

# Label value -> colour. 1-13 are the BTCV organs; the list is a set of well-separated colours so that
# neighbouring organs (kidney/adrenal, liver/IVC, stomach/spleen) stay distinguishable.
LABEL_PALETTE: tuple[str, ...] = (
    "#e6194b",  # 1 spleen
    "#3cb44b",  # 2 right kidney
    "#ffe119",  # 3 left kidney
    "#4363d8",  # 4 gallbladder
    "#f58231",  # 5 esophagus
    "#911eb4",  # 6 liver
    "#42d4f4",  # 7 stomach
    "#f032e6",  # 8 aorta
    "#bfef45",  # 9 inferior vena cava
    "#fabed4",  # 10 portal and splenic vein
    "#469990",  # 11 pancreas
    "#dcbeff",  # 12 right adrenal
    "#9a6324",  # 13 left adrenal
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
    "#fffac8",
    "#a9a9a9",
)


def label_rgb(value: int) -> tuple[int, int, int]:
    """(R, G, B) in 0-255 of a label value; values past the table reuse it cyclically (e.g. SMWB's 41
    organs)."""
    value = int(value)
    if value <= 0:
        raise ValueError(f"label value {value} has no colour: 0 is the background.")
    hexa = LABEL_PALETTE[(value - 1) % len(LABEL_PALETTE)]
    return int(hexa[1:3], 16), int(hexa[3:5], 16), int(hexa[5:7], 16)
