"""Painting everything but the labelled organs: body wall, thorax, muscles, bowel and bones."""

from __future__ import annotations

import math

import numpy as np

from medhpm.data.phantom.anatomy import _SPINE_Y, _cavity_sdf, _dome_height
from medhpm.data.phantom.canvas import _Canvas, _organ_sdf
from medhpm.data.phantom.fields import _smooth_field
from medhpm.data.phantom.shapes import _Ellipsoid, _ellipse2d

_F32 = np.float32


def _paint_body(c: _Canvas):
    g, p, hu = c.g, c.p, c.p["hu"]
    x, y = g.qx, g.qy
    cav = _cavity_sdf(x, y)
    c.cav = cav
    r = np.sqrt(x * x + y * y) + _F32(1e-3)
    cpost = -y / r  # +1 posterior midline, -1 anterior midline
    side = np.sqrt(np.maximum(1 - cpost * cpost, 0))
    fat = _F32(p["fat_mm"]) * (_F32(0.72) - _F32(0.27) * cpost + _F32(0.25) * side)
    fat = fat * (1 + _F32(0.06) * c.bump)
    muscle = _F32(p["muscle_mm"]) + _F32(12.0) * np.exp(-(((1 - cpost) / _F32(0.18)) ** 2))
    outer = muscle + fat
    layer = (cav >= 0).view(np.uint8) + (cav >= muscle).view(np.uint8)
    layer += (cav >= outer).view(np.uint8)
    layer += (cav >= outer + _F32(2.0)).view(np.uint8)
    # Layers: cavity fat, wall muscle, subcutaneous fat, skin, air.
    base = np.array([hu["fat"], hu["muscle"], hu["fat"], hu["skin"], -1000], dtype=_F32)
    amp = np.array([6, 5, 6, 0, 0], dtype=_F32)
    c.hu[:] = base[layer] + amp[layer] * c.tex
    c.material[:] = np.array([1, 2, 2, 2, 0], dtype=np.uint8)[layer]
    c.wall_muscle = muscle


def _paint_thorax(c: _Canvas):
    g, p, hu = c.g, c.p, c.p["hu"]
    sl = g.slices((-130, -130, -10), (130, 130, 250))
    if sl is None:
        return
    x, y, z = g.coords(sl)
    above = z - _dome_height(x, y, p["dome_r"], p["dome_l"])
    inside = c.cav[sl] < 0
    # Diaphragm muscle, then lung above it.
    dia = inside & (above > 0) & (above < 5)
    c.paint(sl, dia, _F32(hu["muscle"]) + _F32(4) * c.tex[sl], material=2)
    lung = inside & (above >= 5)
    t = c.tex[sl]
    lung_hu = np.where(t > 1.9, _F32(30), _F32(hu["lung"]) + _F32(20) * t)
    c.paint(sl, lung, lung_hu, material=2)
    # Posterior mediastinum (fat around aorta and oesophagus) and the heart.
    med = inside & (above >= 0) & (_ellipse2d(x, y, 8, -32, 24, 40) < 0)
    c.paint(sl, med, _F32(hu["fat"] + 30) + _F32(6) * t, material=1)
    heart = c.shapes["heart"]
    hsl = g.slices(*heart.bbox(5))
    if hsl is not None:
        hx, hy, hz = g.coords(hsl)
        hs = heart.sdf(g, hsl)
        hab = hz - _dome_height(hx, hy, p["dome_r"], p["dome_l"])
        hs = np.maximum(hs, -(hab - _F32(5)))
        hin = c.cav[hsl] < 0
        c.paint(hsl, hin & (hs < 4) & (hs >= 0), _F32(hu["fat"]) + _F32(5) * c.tex[hsl], material=1)
        c.paint(
            hsl,
            hin & (hs < 0),
            np.where(hs < -9, _F32(hu["blood"]), _F32(hu["myocardium"])) + _F32(5) * c.tex[hsl],
            material=2,
        )


def _paint_muscles(c: _Canvas):
    g, hu = c.g, c.p["hu"]
    for name in ("psoas_r", "psoas_l", "ql_r", "ql_l"):
        sh = c.shapes[name]
        sl = g.slices(*sh.bbox(4))
        if sl is None:
            continue
        s = _organ_sdf(c, sh, sl, bump=1.5)
        c.paint(sl, s < 0, _F32(hu["muscle"]) + _F32(5) * c.tex[sl], material=2)
    # Paraspinal muscles fill the gutters either side of the spinous processes.
    sl = g.slices((-60, -125, -400), (60, -50, 400))
    if sl is not None:
        x, y, _ = g.coords(sl)
        es = np.minimum(_ellipse2d(x, y, -27, -86, 23, 20), _ellipse2d(x, y, 27, -86, 23, 20))
        es = es + c.bump[sl] * _F32(1.5)
        m = (es < 0) & (c.material[sl] > 0)
        c.paint(sl, m, _F32(hu["muscle"]) + _F32(5) * c.tex[sl], material=2)


def _paint_bowel(c: _Canvas, fields_rng):
    g, p, hu = c.g, c.p, c.p["hu"]
    t = c.tex
    # Colon: gas with mottled stool.
    colon = c.shapes["colon"]
    sl = g.slices(*colon.bbox(4))
    if sl is not None:
        s = _organ_sdf(c, colon, sl, bump=2.0)
        ts = t[sl]
        gas = ts + _F32(p["colon_gas"]) > 0.2
        content = np.where(gas, _F32(-950) + _F32(30) * ts, _F32(-40) + _F32(60) * ts)
        val = np.where(s > -2.5, _F32(hu["bowel_wall"]), content)
        c.paint(sl, s < 0, val + _F32(5) * ts, material=3)
    duo = c.shapes["duodenum"]
    sl = g.slices(*duo.bbox(4))
    if sl is not None:
        s = _organ_sdf(c, duo, sl, bump=1.5)
        ts = t[sl]
        val = np.where(s > -3, _F32(hu["bowel_wall"]), _F32(hu["bowel_fluid"]) + _F32(5) * ts)
        c.paint(sl, s < 0, val, material=3)
    # Small-bowel loops: tubes along the intersection curves of two smooth random surfaces.
    sl = g.slices((-115, -40, -220), (115, 85, 5))
    n1 = _smooth_field(fields_rng, g.axes, 24.0)
    n2 = _smooth_field(fields_rng, g.axes, 24.0)
    n3 = _smooth_field(fields_rng, g.axes, 45.0)
    if sl is None:
        return
    x, y, z = g.coords(sl)
    region = _Ellipsoid((0, 25, -95), (112, 68, 100)).sdf(x, y, z)
    rr = n1[sl] ** 2 + n2[sl] ** 2
    tube = rr < _F32(1.1)
    free = (c.material[sl] == 1) & (region < 0)
    ts = t[sl]
    gas = n3[sl] > _F32(p["bowel_gas"])
    content = np.where(gas, _F32(-950) + _F32(20) * ts, _F32(hu["bowel_fluid"]) + _F32(6) * ts)
    val = np.where(rr > _F32(0.75), _F32(hu["bowel_wall"]) + _F32(5) * ts, content)
    c.paint(sl, free & tube, val, material=3)


def _paint_bones(c: _Canvas):
    _paint_spine(c)
    _paint_ribs(c)


def _paint_spine(c: _Canvas):
    """Vertebral bodies with discs and endplates, neural arches, pedicles, spinous and transverse
    processes, and the spinal canal."""
    g, p, hu = c.g, c.p, c.p["hu"]
    t = c.tex
    cort, canc = _F32(hu["cortical"]), _F32(hu["cancellous"])
    sl = g.slices((-70, -125, -400), (70, -15, 400))
    if sl is None:
        return
    x, y, z = g.coords(sl)
    period, disc = _F32(33.0), _F32(7.0)
    ph = np.mod(z - _F32(p["vertebra_phase"]), period)
    body = _ellipse2d(x, y, 0, _SPINE_Y, 21, 15)
    in_body = (body < 0) & (ph >= disc)
    endplate = np.minimum(ph - disc, period - ph)
    bone_val = np.where((body > -2.5) | (endplate < 2), cort, canc + _F32(25) * t[sl])
    c.paint(sl, (body < 0) & (ph < disc), _F32(hu["disc"]) + _F32(5) * t[sl], material=4)
    c.paint(sl, in_body, bone_val, material=4)
    canal = _ellipse2d(x, y, 0, _SPINE_Y - 26, 10, 8)
    arch_ph = np.mod(ph - _F32(5), period)
    arch = (_ellipse2d(x, y, 0, _SPINE_Y - 26, 17, 14) < 0) & (canal >= 0) & (arch_ph < period - 8)
    pedicle = np.minimum(_ellipse2d(x, y, -13, _SPINE_Y - 15, 5, 9), _ellipse2d(x, y, 13, _SPINE_Y - 15, 5, 9)) < 0
    pedicle &= (ph >= disc + 2) & (ph < period - 6)
    spinous = (_ellipse2d(x, y, 0, _SPINE_Y - 50, 3.5, 14) < 0) & (np.mod(ph - _F32(9), period) < 17)
    trans = np.minimum(_ellipse2d(x, y, -34, _SPINE_Y - 26, 15, 3.5), _ellipse2d(x, y, 34, _SPINE_Y - 26, 15, 3.5)) < 0
    trans &= (ph > disc + 8) & (ph < disc + 16)
    post = arch | pedicle | spinous | trans
    c.paint(sl, post, _F32(0.5) * (cort + canc) + _F32(30) * t[sl], material=4)
    c.paint(sl, canal < 0, _F32(hu["csf"]) + _F32(4) * t[sl], material=2)


def _paint_ribs(c: _Canvas):
    """Ribs: bands in the chest wall whose height drops from the spine towards the front, above the
    costal margin; the anterior ends are cartilage. The sternum at the top of the field of view."""
    g, p, hu = c.g, c.p, c.p["hu"]
    t = c.tex
    cort, canc = _F32(hu["cortical"]), _F32(hu["cancellous"])
    rho_c = c.wall_muscle * _F32(0.35)
    near = np.abs(c.cav - rho_c) < _F32(7)
    idx = np.nonzero(near)
    if idx[0].size:
        x, y, z = g.qx[idx], g.qy[idx], g.qz[idx]
        r = np.sqrt(x * x + y * y) + _F32(1e-3)
        phi = np.arccos(np.clip(-y / r, -1, 1)) / _F32(math.pi)  # 0 posterior .. 1 anterior
        drop = _F32(120) * phi ** _F32(1.2)
        period = _F32(26)
        u = np.mod(z + drop - _F32(p["rib_phase"]), period)
        dz = np.minimum(u, period - u)
        dr = c.cav[idx] - rho_c[idx]
        e = (dr / _F32(3.2)) ** 2 + (dz / _F32(3.6)) ** 2
        margin = _F32(-55) + _F32(95) * phi ** _F32(1.5)
        present = (e < 1) & (z > margin) & (phi > 0.12) & (phi < 0.97)
        val = np.where(phi > 0.82, _F32(hu["cartilage"]), np.where(e < 0.35, canc, cort))
        sel = tuple(i[present] for i in idx)
        c.hu[sel] = val[present] + _F32(20) * t[sel]
        c.label[sel] = 0
        c.material[sel] = 4
        # Sternum at the top of the field of view.
        st = (phi > 0.96) & (np.abs(dr) < 5) & (z > 75)
        sel = tuple(i[st] for i in idx)
        c.hu[sel] = canc + _F32(20) * t[sel]
        c.label[sel] = 0
