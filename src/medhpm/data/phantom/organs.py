"""Painting the 13 BTCV organs (and the vessels inside and between them), each carved out of its
neighbours with a thin fat plane.

The order matters: an organ painted later overwrites an earlier one where they overlap, so the
vessels, which run through and between organs, come last.
"""

from __future__ import annotations

import numpy as np

from medhpm.data.phantom.anatomy import _SPINE_Y, _dome_height
from medhpm.data.phantom.canvas import _Canvas, _organ_sdf
from medhpm.data.phantom.shapes import _ellipse2d

_F32 = np.float32


def _paint_organs(c: _Canvas):
    for paint in (
        _paint_liver,
        _paint_spleen,
        _paint_stomach,
        _paint_pancreas,
        _paint_kidneys,
        _paint_adrenals,
        _paint_gallbladder,
        _paint_esophagus,
        _paint_vessels,
    ):
        paint(c)


def _region(c: _Canvas, shape, pad=6.0):
    return c.g.slices(*shape.bbox(pad))


def _dome_clip(c: _Canvas, s, sl, gap=1.0):
    """Keep ``s`` below the diaphragm (``gap`` mm under its surface)."""
    x, y, z = c.g.coords(sl)
    above = z - _dome_height(x, y, c.p["dome_r"], c.p["dome_l"])
    return np.maximum(s, above + _F32(gap))


def _paint_liver(c: _Canvas):
    """Liver, with brighter hepatic and portal vein branches inside it (still labelled liver)."""
    g, p, hu, sh, t = c.g, c.p, c.p["hu"], c.shapes, c.tex
    sl = _region(c, sh["liver"])
    if sl is None:
        return
    s = _organ_sdf(
        c,
        sh["liver"],
        sl,
        bump=p["bump_mm"],
        carve=[
            (sh["stomach"], 3),
            (sh["kidney_r"], 3),
            (sh["gallbladder"], 0),
            (sh["colon"], 2),
            (sh["duodenum"], 2),
            (sh["adrenal_r"], 3),
        ],
    )
    s = _dome_clip(c, s, sl)
    x, y, z = g.coords(sl)
    spine = _ellipse2d(x, y, 0, _SPINE_Y, 21, 15)
    s = np.maximum(s, -(spine - _F32(8)))
    ves = sh["liver_vessels"].sdf(g, sl)
    val = _F32(hu["liver"]) + _F32(5) * t[sl]
    val += np.where(ves < 0, _F32(p["hepatic_vessel_delta"]), _F32(0))
    c.paint(sl, s < 0, val, label=6)


def _paint_spleen(c: _Canvas):
    hu, sh, t = c.p["hu"], c.shapes, c.tex
    sl = _region(c, sh["spleen"])
    if sl is None:
        return
    s = _organ_sdf(
        c,
        sh["spleen"],
        sl,
        bump=c.p["bump_mm"],
        carve=[(sh["spleen_hilum"], 0), (sh["stomach"], 3), (sh["kidney_l"], 3), (sh["colon"], 2)],
    )
    s = _dome_clip(c, s, sl)
    c.paint(sl, s < 0, _F32(hu["spleen"]) + _F32(5) * t[sl], label=1)


def _paint_stomach(c: _Canvas):
    """Stomach wall around fluid, with a gas cap above ``stomach_gas_level``."""
    g, p, hu, sh, t = c.g, c.p, c.p["hu"], c.shapes, c.tex
    sl = _region(c, sh["stomach"])
    if sl is None:
        return
    s = _organ_sdf(c, sh["stomach"], sl, bump=p["bump_mm"] * 0.7)
    s = _dome_clip(c, s, sl, gap=2.0)
    _, y, _ = g.coords(sl)
    ts = t[sl]
    content = np.where(
        y > _F32(p["stomach_gas_level"]), _F32(-960) + _F32(15) * ts, _F32(hu["stomach_fluid"]) + _F32(5) * ts
    )
    val = np.where(s > -4.5, _F32(hu["stomach_wall"]) + _F32(5) * ts, content)
    c.paint(sl, s < 0, val, label=7)


def _paint_pancreas(c: _Canvas):
    hu, sh, t = c.p["hu"], c.shapes, c.tex
    sl = _region(c, sh["pancreas"])
    if sl is None:
        return
    s = _organ_sdf(
        c,
        sh["pancreas"],
        sl,
        bump=c.p["bump_mm"] * 0.6,
        carve=[(sh["duodenum"], 1), (sh["stomach"], 2), (sh["kidney_l"], 3)],
    )
    # Lobulated, slightly fatty parenchyma.
    c.paint(sl, s < 0, _F32(hu["pancreas"]) + _F32(9) * t[sl], label=11)


def _paint_kidneys(c: _Canvas):
    """Cortex and medulla, with sinus fat and the renal pelvis (urine) at the hilum."""
    g, hu, sh, t = c.g, c.p["hu"], c.shapes, c.tex
    for key, lab, side in (("kidney_r", 2, "r"), ("kidney_l", 3, "l")):
        sl = _region(c, sh[key])
        if sl is None:
            continue
        s = _organ_sdf(c, sh[key], sl, bump=c.p["bump_mm"] * 0.5, carve=[(sh[f"sinus_{side}"], 0)])
        ts = t[sl]
        val = np.where(s > -8, _F32(hu["cortex"]), _F32(hu["medulla"])) + _F32(6) * ts
        c.paint(sl, s < 0, val, label=lab)
        sinus = np.maximum(sh[f"sinus_{side}"].sdf(g, sl), sh[key].sdf(g, sl) - _F32(3))
        c.paint(sl, sinus < 0, _F32(hu["sinus_fat"]) + _F32(8) * ts, material=1)
        pel = sh[f"pelvis_{side}"].sdf(g, sl)
        c.paint(sl, (pel < 0) & (sinus < 0), _F32(hu["urine"]) + _F32(4) * ts, material=3)


def _paint_adrenals(c: _Canvas):
    hu, sh, t = c.p["hu"], c.shapes, c.tex
    for key, lab in (("adrenal_r", 12), ("adrenal_l", 13)):
        sl = _region(c, sh[key])
        if sl is not None:
            s = _organ_sdf(c, sh[key], sl, bump=0.8)
            c.paint(sl, s < 0, _F32(hu["adrenal"]) + _F32(4) * t[sl], label=lab)


def _paint_gallbladder(c: _Canvas):
    hu, sh, t = c.p["hu"], c.shapes, c.tex
    sl = _region(c, sh["gallbladder"])
    if sl is not None:
        s = _organ_sdf(c, sh["gallbladder"], sl, bump=1.0)
        c.paint(sl, s < 0, _F32(hu["gallbladder"]) + _F32(3) * t[sl], label=4)


def _paint_esophagus(c: _Canvas):
    hu, sh, t = c.p["hu"], c.shapes, c.tex
    sl = _region(c, sh["esophagus"])
    if sl is not None:
        s = _organ_sdf(c, sh["esophagus"], sl, bump=0.8, carve=[(sh["stomach"], 0)])
        val = _F32(hu["esophagus"]) + _F32(4) * t[sl]
        c.paint(sl, s < 0, val, label=5)


def _paint_vessels(c: _Canvas):
    """Vessels last among soft tissue: they run through and between organs. The unlabelled veins and
    arteries first, then portal vein, IVC and aorta (the last two may leave the cavity's clip)."""
    hu, sh, t = c.p["hu"], c.shapes, c.tex
    vessels = (
        ("veins", None, hu["portal"] - 10),
        ("arteries", None, hu["aorta"]),
        ("portal", 10, hu["portal"]),
        ("ivc", 9, hu["ivc"]),
        ("aorta", 8, hu["aorta"]),
    )
    for key, lab, val in vessels:
        sl = _region(c, sh[key])
        if sl is None:
            continue
        s = _organ_sdf(c, sh[key], sl, bump=0.6, cavity_clip=key not in ("aorta", "ivc"))
        if key in ("ivc", "aorta"):
            s = np.maximum(s, c.cav[sl] + _F32(1))
        c.paint(sl, s < 0, _F32(val) + _F32(4) * t[sl], label=lab)
