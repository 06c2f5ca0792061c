"""How much phantoms differ from case to case: ``standard`` (the phantoms of earlier versions, unchanged
byte for byte) or ``wide`` (the variability of real clinical CT, for experiments where pre-training on
many unlabelled scans should pay off over a few labelled ones).

``wide`` draws, from its own random stream of the case seed (so ``standard`` cases stay as they were):

* **Contrast phase**: non-contrast (20 %), late arterial (20 %), portal-venous (45 %, the standard
  table) or delayed/nephrographic (15 %), each with its own HU table for the enhancing tissues
  (:data:`PHASE_HU`); tissues a phase does not list keep their portal-venous draw.
* **Scanner**: a calibration offset of -20 to +20 HU on every tissue but air (kVp, kernel and
  calibration drift), noise of sigma 6-40 HU (low-dose to thin-slice), blur of 0.4-1.2 voxel.
* **Body size and fat**: body scale 0.76-1.06 (left-right), 0.78-1.08 (antero-posterior), 0.88-1.10
  (cranio-caudal), subcutaneous fat 3-35 mm, muscle 6-15 mm.
* **Organ shape and position**: per-organ-group scale 0.8-1.2 per axis (times 0.9-1.1 overall) and
  shift of up to 12 mm per axis, surface bumps of 1.5-5 mm, a smooth deformation of 2.5-7 mm.
* **Lesions**: 0-3 per case in the liver (60 %), spleen or a kidney (spheres of 4-15 mm radius):
  cysts (0-20 HU), hypo-enhancing (25-60 HU below the organ) or hyper-enhancing (25-60 HU above); the
  lesion keeps its organ's label, as in BTCV, whose organ masks include their lesions.
* **Partial field of view**: in 30 % of cases the cranio-caudal coverage is 40-120 mm anywhere from the
  lung bases to the pelvis (a thin slab such as a limited or PET/CT scan), instead of 205-245 mm.

Every drawn value is a plain number in ``p`` (see ``params``), so a case's parameters can be read back.
"""

from __future__ import annotations

import numpy as np

VARIABILITY = ("standard", "wide")

PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")
PHASE_ODDS = (0.20, 0.20, 0.45, 0.15)

# HU ranges per phase for the tissues that enhance; portal-venous is the standard table (params.py).
PHASE_HU: dict[str, dict[str, tuple[float, float]]] = {
    "non_contrast": {
        "liver": (50, 65),
        "spleen": (40, 50),
        "cortex": (28, 38),
        "medulla": (25, 35),
        "aorta": (35, 50),
        "ivc": (35, 48),
        "portal": (35, 48),
        "blood": (35, 50),
        "pancreas": (35, 50),
        "adrenal": (20, 35),
        "stomach_wall": (35, 45),
        "bowel_wall": (35, 45),
        "myocardium": (40, 50),
    },
    "arterial": {
        "liver": (60, 80),
        "spleen": (90, 130),
        "cortex": (170, 250),
        "medulla": (60, 100),
        "aorta": (250, 400),
        "ivc": (60, 100),
        "portal": (100, 150),
        "blood": (250, 400),
        "pancreas": (95, 130),
        "adrenal": (50, 80),
        "stomach_wall": (80, 110),
        "bowel_wall": (60, 90),
        "myocardium": (100, 130),
    },
    "portal_venous": {},
    "delayed": {
        "liver": (75, 95),
        "spleen": (75, 95),
        "cortex": (140, 180),
        "medulla": (140, 185),
        "aorta": (120, 160),
        "ivc": (110, 140),
        "portal": (110, 140),
        "blood": (120, 160),
        "pancreas": (60, 80),
        "urine": (30, 300),
    },
}
# Vessels inside the liver against the parenchyma (HU), per phase.
PHASE_HEPATIC_DELTA = {"non_contrast": (-15, -5), "arterial": (0, 25), "portal_venous": (30, 60), "delayed": (10, 30)}

LESION_ORGANS = (("liver", 6), ("spleen", 1), ("kidney_r", 2), ("kidney_l", 3))
LESION_ODDS = (0.6, 0.15, 0.125, 0.125)
LESION_KINDS = ("cyst", "hypo", "hyper")
LESION_KIND_ODDS = (0.4, 0.4, 0.2)


def check_variability(variability: str) -> str:
    if variability not in VARIABILITY:
        raise ValueError(f"variability must be one of {', '.join(VARIABILITY)}, got {variability!r}.")
    return variability


def _draw_wide(rng: np.random.Generator, p: dict) -> None:
    """Widen the standard draws of ``p`` in place (one fixed order of draws from ``rng``)."""
    u = rng.uniform
    phase = PHASES[int(rng.choice(len(PHASES), p=PHASE_ODDS))]
    p["phase"] = phase
    for tissue, (lo, hi) in PHASE_HU[phase].items():
        p["hu"][tissue] = u(lo, hi)
    if phase != "portal_venous":
        p["hepatic_vessel_delta"] = u(*PHASE_HEPATIC_DELTA[phase])
    p["hu_offset"] = u(-20, 20)
    p["noise_hu"] = u(6, 40)
    p["blur_vox"] = u(0.4, 1.2)
    p["scale"] = np.array([u(0.76, 1.06), u(0.78, 1.08), u(0.88, 1.10)])
    p["fat_mm"] = u(3.0, 35.0)
    p["muscle_mm"] = u(6.0, 15.0)
    p["jitter"] = {g: (u(0.8, 1.2, 3) * u(0.9, 1.1), u(-12, 12, 3)) for g in p["jitter"]}
    p["bump_mm"] = u(1.5, 5.0)
    p["deform_mm"] = u(2.5, 7.0)
    partial = rng.random() < 0.3
    fov_z, z_center = u(40, 120), u(-60, 70)
    if partial:
        p["fov_z"], p["z_center"] = fov_z, z_center
    p["partial_fov"] = bool(partial)
    lesions = []
    for _ in range(int(rng.integers(0, 4))):
        organ, label = LESION_ORGANS[int(rng.choice(len(LESION_ORGANS), p=LESION_ODDS))]
        kind = LESION_KINDS[int(rng.choice(len(LESION_KINDS), p=LESION_KIND_ODDS))]
        lesions.append(
            {
                "organ": organ,
                "label": label,
                "kind": kind,
                "where": u(-0.45, 0.45, 3),
                "radius_mm": u(4.0, 15.0),
                "delta_hu": u(25, 60),
                "cyst_hu": u(0, 20),
            }
        )
    p["lesions"] = lesions


def _lesion_centre(shape, where: np.ndarray) -> np.ndarray:
    """A point inside the organ's largest ellipsoid (template mm): ``where`` (each in [-0.45, 0.45]) is the
    offset from its centre in units of its semi-axes, so the centre is inside it and does not depend on the
    grid."""
    leaves = [leaf for prim in shape.prims for leaf in prim.leaves() if hasattr(leaf, "s")]
    big = max(leaves, key=lambda e: float(np.prod(e.s)))
    offset = where * big.s
    return big.c + (offset if big.frame is None else offset @ big.frame)


def _paint_lesions(c) -> None:
    """Spheres inside their organ's label (painted after the organs, before the bones); the label stays."""
    for les in c.p.get("lesions", ()):
        centre = _lesion_centre(c.shapes[les["organ"]], les["where"])
        r = les["radius_mm"]
        sl = c.g.slices(centre - r, centre + r)
        if sl is None:
            continue
        x, y, z = c.g.coords(sl)
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < r * r
        inside &= c.label[sl] == les["label"]
        organ_hu = c.p["hu"]["liver" if les["organ"] == "liver" else "spleen" if les["organ"] == "spleen" else "cortex"]
        if les["kind"] == "cyst":
            val = les["cyst_hu"]
        else:
            val = organ_hu + (les["delta_hu"] if les["kind"] == "hyper" else -les["delta_hu"])
        hu = np.float32(val) + np.float32(4) * c.tex[sl]
        c.paint(sl, inside, hu, label=les["label"], material=3)
