"""Template anatomy in millimetres (x patient left, y anterior, z superior; z = 0 near L1 / the renal
hila): the abdominal cavity, the diaphragm domes, the organ and vessel shapes, and their per-case
shifts and scalings."""

from __future__ import annotations

import numpy as np

from medhpm.data.phantom.shapes import _Ellipsoid, _frame, _Shape, _Tube

_F32 = np.float32

_CAV_A = 120.0  # half-width of the abdominal cavity inside the muscle wall
_CAV_B_ANT = 80.0
_CAV_B_POST = 82.0
_SPINE_Y = -40.0  # centre of the vertebral bodies


def _cavity_sdf(x, y):
    b = np.where(y >= 0, _F32(_CAV_B_ANT), _F32(_CAV_B_POST))
    k0 = np.sqrt((x / _F32(_CAV_A)) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / _F32(_CAV_A**2)) ** 2 + (y / (b * b)) ** 2)
    eps = _F32(1e-6)
    return (k0 - 1) * (k0 + eps) / (k1 + eps / _F32(_CAV_A))


def _dome_height(x, y, right_top, left_top):
    """Height of the diaphragm surface (template z) above each (x, y)."""
    yy = (y / _F32(70)) ** 2
    # Elliptic paraboloids: level sets are ellipses, so organ tops clipped by them stay rounded.
    r = _F32(right_top) - _F32(40) * ((x + _F32(50)) / _F32(62)) ** 2
    l_ = _F32(left_top) - _F32(40) * ((x - _F32(55)) / _F32(62)) ** 2
    # Smooth maximum of the two domes, so that no crease runs through the liver or the lungs.
    k = _F32(10)
    h = np.clip(0.5 + 0.5 * (r - l_) / k, 0, 1)
    top = l_ * (1 - h) + r * h + k * h * (1 - h)
    # The posterior costophrenic recesses reach far down behind the liver and spleen.
    return top - _F32(22) * yy - _F32(0.5) * np.maximum(-y - _F32(30), 0)


def _organ_templates() -> dict:
    """Shapes of the organs and vessels before per-case variation."""
    t: dict = {}
    _solid_organs(t)
    _vessels_and_esophagus(t)
    _bowel(t)
    _muscles_and_heart(t)
    return t


def _solid_organs(t: dict) -> None:
    """Liver, gallbladder, spleen (with its hilum), kidneys, adrenals, stomach and pancreas."""
    E, T = _Ellipsoid, _Tube
    t["liver"] = _Shape(
        [
            E((-55, 5, 32), (72, 85, 62)),
            E((-78, -5, -18), (38, 55, 50)),
            E((2, 50, 48), (62, 30, 28), _frame((1, -0.25, -0.15), (0, 1, 0))),
            E((-16, -12, 30), (18, 16, 26)),
        ],
        blend=12.0,
    )
    t["gallbladder"] = _Shape(
        [T([(-36, 16, 18), (-44, 32, 2), (-54, 50, -22)], [8, 13, 16]), E((-54, 50, -22), (16, 16, 16))]
    )
    spleen_dir = np.array([0.70, -0.72, 0.0])
    t["spleen"] = _Shape([E((78, -24, 30), (26, 62, 54), _frame(spleen_dir, (0.72, 0.70, -0.35)))])
    t["spleen_hilum"] = _Shape([E(np.array((78, -24, 30)) - 60 * spleen_dir, (45, 45, 58))])
    t["kidney_r"] = _Shape([E((-66, -44, -27), (56, 30, 24), _frame((0.22, -0.15, 1), (0.8, 0.6, 0)))])
    t["kidney_l"] = _Shape([E((64, -46, -16), (56, 30, 24), _frame((-0.22, -0.15, 1), (-0.8, 0.6, 0)))])
    t["adrenal_r"] = _Shape(
        [
            E((-36, -28, 38), (13, 4.5, 14), _frame((0.5, 1, 0), (0, 0, 1))),
            E((-40, -30, 36), (13, 4.5, 12), _frame((-0.4, 1, 0), (0, 0, 1))),
        ]
    )
    t["adrenal_l"] = _Shape(
        [
            E((36, -24, 26), (13, 4.5, 14), _frame((-0.5, 1, 0), (0, 0, 1))),
            E((40, -26, 24), (13, 4.5, 12), _frame((0.4, 1, 0), (0, 0, 1))),
        ]
    )
    t["stomach"] = _Shape(
        [
            T(
                [(38, 0, 62), (48, 18, 40), (46, 36, 12), (26, 50, -6), (2, 48, -14), (-12, 36, -12)],
                [25, 29, 27, 22, 15, 11],
            )
        ]
    )
    t["pancreas"] = _Shape(
        [
            T(
                [(-30, 8, -28), (-14, 18, -14), (4, 22, -10), (30, 14, -2), (52, 2, 6), (66, -12, 14)],
                [19, 15, 13, 14, 13, 11],
            ),
            E((-22, -2, -38), (12, 10, 12)),
        ]
    )


def _vessels_and_esophagus(t: dict) -> None:
    """Labelled vessels (aorta, IVC, portal and splenic vein), the oesophagus, and unlabelled
    vessels."""
    T = _Tube
    t["aorta"] = _Shape(
        [
            T(
                [(22, -22, 180), (20, -20, 120), (16, -14, 60), (14, -12, 0), (12, -12, -60), (10, -10, -160)],
                [13, 13, 12.5, 12, 11, 10],
            )
        ]
    )
    t["ivc"] = _Shape(
        [
            T(
                [
                    (-24, -12, -160),
                    (-24, -10, -60),
                    (-24, -6, 0),
                    (-26, -6, 30),
                    (-22, -6, 60),
                    (-14, 0, 95),
                    (-8, 8, 130),
                ],
                [11, 11, 12, 12, 12.5, 13, 14],
            )
        ]
    )
    t["portal"] = _Shape(
        [
            T([(-4, 8, -14), (-24, 10, 4), (-42, 10, 16)], [7, 7.5, 6.5]),
            T([(-4, 8, -14), (20, -4, -6), (44, -12, 4), (68, -22, 18)], [6, 5, 5, 5]),
        ]
    )
    t["esophagus"] = _Shape(
        [T([(6, -16, 190), (10, -12, 130), (16, -4, 95), (26, 2, 72), (38, 2, 58)], [8, 8, 8, 8.5, 9])]
    )
    # Unlabelled vessels: coeliac trunk, SMA, SMV, left renal vein, hepatic veins, portal branches.
    t["arteries"] = _Shape(
        [
            T([(14, -2, 16), (12, 18, 20), (0, 26, 22)], [4, 3.5, 3], smooth=False),
            T([(14, -2, 4), (10, 22, -12), (6, 28, -60), (2, 30, -120)], [4, 4, 3.5, 3]),
            T([(16, -14, -6), (44, -36, -10)], [3, 3], smooth=False),
            T([(12, -14, -10), (-40, -36, -24)], [3, 3], smooth=False),
        ]
    )
    t["veins"] = _Shape(
        [
            T([(-4, 8, -16), (-6, 16, -60), (-10, 22, -120)], [6, 5, 4]),
            T([(44, -34, -12), (14, 8, -12), (-22, -4, -10)], [5, 5, 5.5], smooth=False),
        ]
    )
    t["liver_vessels"] = _Shape(
        [
            T([(-22, -4, 72), (-60, 10, 58), (-95, 12, 40)], [6, 4.5, 3]),
            T([(-20, -2, 74), (-30, 30, 58), (-40, 55, 40)], [5.5, 4, 3]),
            T([(-16, 0, 76), (5, 30, 62), (25, 50, 52)], [5, 4, 3]),
            T([(-42, 10, 16), (-70, 0, 22), (-95, -8, 22)], [5.5, 4, 3]),
            T([(-42, 10, 16), (-25, 35, 30), (-5, 55, 40)], [5, 4, 3]),
        ]
    )


def _bowel(t: dict) -> None:
    """Colon and duodenum."""
    T = _Tube
    t["colon"] = _Shape(
        [
            T(
                [
                    (-92, -20, -170),
                    (-95, -14, -100),
                    (-95, -6, -60),
                    (-80, 20, -45),
                    (-40, 58, -56),
                    (0, 66, -58),
                    (42, 56, -44),
                    (80, 22, -8),
                    (92, -16, -12),
                    (96, -22, -60),
                    (94, -18, -170),
                ],
                [22, 22, 21, 20, 19, 19, 19, 18, 17, 17, 16],
            )
        ]
    )
    t["duodenum"] = _Shape(
        [
            T(
                [
                    (-12, 36, -12),
                    (-32, 26, -10),
                    (-48, 10, -24),
                    (-50, 4, -52),
                    (-30, 8, -66),
                    (0, 12, -68),
                    (24, 12, -56),
                    (32, 16, -40),
                ],
                [11, 12, 12, 12, 11, 10, 10, 10],
            )
        ]
    )


def _muscles_and_heart(t: dict) -> None:
    """Psoas and quadratus lumborum muscles, and the heart."""
    E, T = _Ellipsoid, _Tube
    for side, sx in (("r", -1), ("l", 1)):
        t[f"psoas_{side}"] = _Shape(
            [T([(sx * 24, -40, 12), (sx * 30, -38, -40), (sx * 38, -32, -110), (sx * 46, -24, -170)], [3, 13, 20, 22])]
        )
    t["ql_r"] = _Shape([T([(-54, -64, 0), (-58, -64, -60), (-62, -60, -170)], [4, 12, 14])])
    t["ql_l"] = _Shape([T([(54, -64, 0), (58, -64, -60), (62, -60, -170)], [4, 12, 14])])
    t["heart"] = _Shape([E((18, 28, 116), (72, 55, 60))])


_TEMPLATES = None


def _templates():
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _organ_templates()
    return _TEMPLATES


def _shapes_for_case(p: dict) -> dict:
    t = _templates()
    j = p["jitter"]
    out = {}

    def tr(name, group, anchor):
        scale, shift = j[group]
        out[name] = t[name].transformed(np.asarray(anchor, float), scale, shift)

    tr("liver", "liver", (-40, 10, 30))
    tr("liver_vessels", "liver", (-40, 10, 30))
    tr("gallbladder", "gallbladder", (-45, 33, -2))
    tr("spleen", "spleen", (78, -24, 30))
    tr("spleen_hilum", "spleen", (78, -24, 30))
    tr("kidney_r", "kidney_r", (-66, -44, -27))
    tr("kidney_l", "kidney_l", (64, -46, -16))
    tr("stomach", "stomach", (40, 25, 25))
    tr("pancreas", "pancreas", (10, 10, -8))
    tr("portal", "pancreas", (10, 10, -8))
    tr("veins", "pancreas", (10, 10, -8))
    tr("duodenum", "pancreas", (10, 10, -8))
    tr("colon", "colon", (0, 20, -60))
    tr("adrenal_r", "adrenals", (0, -27, 30))
    tr("adrenal_l", "adrenals", (0, -27, 30))
    # Vessels move with the spine only slightly: they are tethered to it.
    vs, vt = j["vessels"]
    for name in ("aorta", "ivc", "esophagus", "arteries"):
        out[name] = t[name].transformed(np.array((0.0, _SPINE_Y, 0.0)), 1 + 0.3 * (vs - 1), 0.3 * vt)
    for name in ("psoas_r", "psoas_l", "ql_r", "ql_l", "heart"):
        out[name] = t[name]
    # Kidney sinus fat and renal pelvis live in each kidney's own frame.
    for side, key in (("r", "kidney_r"), ("l", "kidney_l")):
        e = out[key].prims[0]
        f = e.frame
        sinus = _Ellipsoid(e.c + f[1] * 0.5 * e.s[1], e.s * (0.5, 0.55, 0.45), f)
        pelvis = _Ellipsoid(e.c + f[1] * 0.75 * e.s[1], e.s * (0.22, 0.35, 0.3), f)
        out[f"sinus_{side}"] = _Shape([sinus])
        out[f"pelvis_{side}"] = _Shape([pelvis])
    return out
