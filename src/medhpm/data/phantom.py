"""Synthetic contrast-enhanced abdominal CT phantoms with BTCV-numbered organ labels.

This is the data set that the demo, the docs and the tests run on when no real CT is at hand, so
it aims to look and behave like a portal-venous abdominal CT rather than like a toy:

* Anatomy. A patient template in millimetres (x towards the patient's left, y anterior, z superior;
  mirrored in x when written, since a RAS array's first axis runs to the patient's right) holds a body outline with skin, subcutaneous fat and an abdominal-wall muscle layer, the
  spine (vertebral bodies, discs, neural arches, spinous and transverse processes), ribs and costal
  cartilage above the costal margin, the diaphragm with lung bases and the heart in the top slices,
  psoas, quadratus lumborum and paraspinal muscles, colon and duodenum, small-bowel loops, and all
  13 BTCV organs (see ``BTCV_LABELS``). Organs are deformed ellipsoids and tubes described by
  approximate signed distance fields, so organs can be carved out of each other with thin fat planes
  in between, as in real CT.
* Variation per case. Body size and fat thickness, an in-plane rotation, the patient's position in
  the field of view and the cranio-caudal coverage, a smooth random deformation of the whole
  template, per-organ shifts, scalings and bumpy surfaces, stomach filling, bowel gas, per-organ
  mean HU, texture, blur and noise level are all drawn from the case seed.
* Intensities (HU) follow portal-venous CT: air -1000, fat -110 to -90, muscle 45-60, liver 80-100,
  spleen 78-96, kidney cortex 150-195 with a medulla of 105-135, aorta 190-260, IVC 115-145, portal
  and splenic vein 140-175, pancreas 65-90, gallbladder 5-18, stomach wall 70-95 around fluid (5-25)
  and a gas cap, cancellous bone 230-330 inside a 750-1050 cortex, lung about -850. Each case draws
  its own means. Texture is smooth noise; partial volume is a Gaussian blur of sigma 0.5-0.9 voxel;
  scanner noise has sigma 10-20 HU. After blur the organ medians sit a little closer to their
  surroundings, as in real CT.
* Geometry. Arrays are generated in RAS order and stored either as RAS or as LPS (the first two
  array axes flipped and the affine changed to match, so every voxel keeps its world position).
  ``write_phantom_dataset`` alternates RAS (even cases) and LPS (odd cases); ``generate_case`` draws
  the orientation from the seed unless told. After reorientation to RAS all cases look alike.

Default geometry. The field of view is drawn like a clinical abdominal scan: 320-350 mm in-plane and
205-245 mm cranio-caudally (lung bases to the lower poles of the kidneys). The default voxel size is
coarse so that a case is small enough for CPU training: in-plane spacing 2.3-2.8 mm and slice spacing
2.5-5 mm, giving roughly 115-150 x 115-150 x 40-100 voxels. Default sizes are nudged off multiples of
16 so that the pipeline's padding and cropping paths get exercised. Overrides:

* ``spacing`` only: the size follows the drawn field of view (``round(fov / spacing)``).
* ``size`` only: the drawn field of view is kept and the spacing becomes ``fov / size``, so that a
  tiny test volume still shows the whole abdomen.
* both: the field of view is ``size * spacing`` (the anatomy may be cropped or surrounded by air).

For a given seed the anatomy, the intensities and the geometry are fixed regardless of size and
spacing (only white noise depends on the grid), and the output arrays are byte-identical from run to
run. ``write_phantom_dataset`` derives case ``i``'s seed from ``(seed, i)`` with ``case_seed``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "BTCV_LABELS",
    "PROTOCOL_ORGANS",
    "PhantomCase",
    "case_seed",
    "generate_case",
    "write_phantom_dataset",
]

# the package's one BTCV label table (re-exported: the phantoms are labelled with it)
from medhpm.data.labels import BTCV_LABELS, PROTOCOL_ORGANS  # noqa: E402

DEFAULT_FOV_XY_MM = (320.0, 350.0)
DEFAULT_FOV_Z_MM = (205.0, 245.0)
DEFAULT_INPLANE_SPACING_MM = (2.3, 2.8)
DEFAULT_SLICE_SPACING_MM = (2.5, 5.0)

_F32 = np.float32


# --------------------------------------------------------------------------------------------------
# Public data type


@dataclasses.dataclass
class PhantomCase:
    """One synthetic CT volume with its label map, in the array order given by ``orientation``."""

    image: np.ndarray  # int16 Hounsfield units
    label: np.ndarray  # uint8 BTCV labels
    affine: np.ndarray  # 4x4 voxel-to-world (RAS mm, NIfTI convention)
    spacing: tuple[float, float, float]
    orientation: str  # "RAS" or "LPS" (nibabel axis codes of the array axes)
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Argument checking


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    return int(seed)


def _check_triplet(value, name: str, integer: bool):
    if value is None:
        return None
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{name} must be three positive numbers, got {value!r}.") from None
    if len(items) != 3:
        raise ValueError(f"{name} must have exactly three entries (x, y, z), got {value!r}.")
    out = []
    for v in items:
        if isinstance(v, bool):
            raise ValueError(f"{name} must be three positive numbers, got {value!r}.")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be three positive numbers, got {value!r}.") from None
        if not math.isfinite(f) or f <= 0:
            raise ValueError(f"{name} entries must be positive and finite, got {value!r}.")
        if integer:
            if f != int(f):
                raise ValueError(f"{name} entries must be whole numbers of voxels, got {value!r}.")
            out.append(int(f))
        else:
            out.append(f)
    return tuple(out)


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` in a data set generated with ``seed``."""
    seed = _check_seed(seed)
    if index < 0:
        raise ValueError(f"case index must be non-negative, got {index}.")
    # SeedSequence mixes both numbers, so neighbouring data-set seeds do not share cases.
    return int(np.random.SeedSequence([seed, int(index)]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------------------------------
# Smooth random fields


def _bspline_weights(coords: np.ndarray, lo: float, step: float, count: int):
    """First lattice index and the 4 cubic B-spline weights for each coordinate.

    Lattice node k sits at lo + step * (k - 1); coordinates beyond the lattice are clamped.
    """
    t = np.clip((coords.astype(np.float64) - lo) / step + 1.0, 1.0, count - 2.0 - 1e-6)
    i = np.floor(t).astype(np.int64)
    f = t - i
    w = np.stack(
        [
            (1 - f) ** 3 / 6,
            (3 * f**3 - 6 * f**2 + 4) / 6,
            (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
            f**3 / 6,
        ],
        axis=1,
    ).astype(_F32)
    return i - 1, w


def _bspline_matrix(coords: np.ndarray, lo: float, step: float, count: int):
    """Dense (len(coords), used nodes) weight matrix and the first used lattice node."""
    first, w = _bspline_weights(coords, lo, step, count)
    base = int(first.min())
    width = int(first.max()) + 4 - base
    m = np.zeros((coords.size, width), dtype=_F32)
    rows = np.arange(coords.size)
    for k in range(4):
        m[rows, first - base + k] = w[:, k]
    return base, m


# Lattice box (mm, around the body centre) in which smooth fields are defined; outside it they are
# held constant. Fixed in physical units so that a seed gives the same anatomy at any resolution.
_FIELD_BOX = ((-240.0, 240.0), (-240.0, 240.0), (-220.0, 220.0))
# Standard deviation of a tensor-product cubic B-spline with unit-variance coefficients
# (about sqrt(0.48) per axis); dividing by it gives roughly unit-variance fields everywhere.
_BSPLINE_STD = 0.48**1.5


def _smooth_field(rng: np.random.Generator, axes: Sequence[np.ndarray], step: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field with correlation length ~ ``step`` mm."""
    counts = [int(math.ceil((hi - lo) / step)) + 3 for lo, hi in _FIELD_BOX]
    # The whole lattice is drawn (so the field does not depend on the grid); only the part under
    # the grid is used.
    coef = rng.standard_normal(counts, dtype=_F32)
    (bx0, bx), (by0, by), (bz0, bz) = (
        _bspline_matrix(axes[a], _FIELD_BOX[a][0], step, counts[a]) for a in range(3)
    )
    coef = coef[bx0:bx0 + bx.shape[1], by0:by0 + by.shape[1], bz0:bz0 + bz.shape[1]]
    t = np.tensordot(coef, bz, axes=(2, 1))  # (cx, cy, nz)
    t = np.tensordot(by, t, axes=(1, 1))  # (ny, cx, nz)
    t = np.tensordot(bx, t, axes=(1, 1))  # (nx, ny, nz)
    out = np.ascontiguousarray(t)
    out *= _F32(1.0 / _BSPLINE_STD)
    return out


# --------------------------------------------------------------------------------------------------
# Approximate signed distance fields (negative inside), evaluated on coordinate arrays


def _frame(primary, secondary) -> np.ndarray:
    """Orthonormal rows (e1 along primary, e2 towards secondary, e3 = e1 x e2)."""
    e1 = np.asarray(primary, float)
    e1 = e1 / np.linalg.norm(e1)
    e2 = np.asarray(secondary, float)
    e2 = e2 - e1 * (e2 @ e1)
    e2 = e2 / np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)])


class _Ellipsoid:
    def __init__(self, center, semi, frame=None):
        self.c = np.asarray(center, float)
        self.s = np.asarray(semi, float)
        self.frame = None if frame is None else np.asarray(frame, float)

    def leaves(self):
        return [self]

    def transformed(self, anchor, scale, shift):
        c = anchor + scale * (self.c - anchor) + shift
        return _Ellipsoid(c, self.s * scale, self.frame)

    def bbox(self):
        if self.frame is None:
            r = self.s
        else:
            # Extent of a rotated ellipsoid along each world axis.
            r = np.sqrt(((self.frame * self.s[:, None]) ** 2).sum(axis=0))
        return self.c - r, self.c + r

    def sdf(self, x, y, z):
        u, v, w = x - _F32(self.c[0]), y - _F32(self.c[1]), z - _F32(self.c[2])
        if self.frame is not None:
            f = self.frame.astype(_F32)
            u, v, w = (
                f[0, 0] * u + f[0, 1] * v + f[0, 2] * w,
                f[1, 0] * u + f[1, 1] * v + f[1, 2] * w,
                f[2, 0] * u + f[2, 1] * v + f[2, 2] * w,
            )
        a, b, c = (_F32(s) for s in self.s)
        k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
        k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2 + (w / (c * c)) ** 2)
        # First-order distance (k0 - 1) / |grad k0|, written to stay finite at the centre.
        eps = _F32(1e-6)
        return (k0 - 1) * (k0 + eps) / (k1 + eps / _F32(self.s.max()))


def _catmull_rom(points: np.ndarray, values: np.ndarray, sub: int):
    """Densify a control polyline (and a per-point value) into a smooth curve."""
    p = np.concatenate([points[:1], points, points[-1:]])
    v = np.concatenate([values[:1], values, values[-1:]])
    out_p, out_v = [], []
    for i in range(1, len(p) - 2):
        for s in range(sub):
            t = s / sub
            t2, t3 = t * t, t * t * t
            a = -0.5 * t3 + t2 - 0.5 * t
            b = 1.5 * t3 - 2.5 * t2 + 1
            c = -1.5 * t3 + 2 * t2 + 0.5 * t
            d = 0.5 * t3 - 0.5 * t2
            out_p.append(a * p[i - 1] + b * p[i] + c * p[i + 1] + d * p[i + 2])
            out_v.append(v[i] + t * (v[i + 1] - v[i]))
    out_p.append(points[-1])
    out_v.append(values[-1])
    return np.array(out_p), np.array(out_v)


class _Capsule:
    """Segment of a tube whose radius changes linearly from one end to the other."""

    def __init__(self, p0, p1, r0, r1):
        self.p0, self.p1 = np.asarray(p0, float), np.asarray(p1, float)
        self.r0, self.r1 = float(r0), float(r1)

    def leaves(self):
        return [self]

    def bbox(self):
        r = max(self.r0, self.r1)
        return np.minimum(self.p0, self.p1) - r, np.maximum(self.p0, self.p1) + r

    def sdf(self, x, y, z):
        p0, d = self.p0, self.p1 - self.p0
        dd = float(d @ d)
        ux, uy, uz = x - _F32(p0[0]), y - _F32(p0[1]), z - _F32(p0[2])
        if dd == 0:
            return np.sqrt(ux * ux + uy * uy + uz * uz) - _F32(self.r0)
        dx, dy, dz = (_F32(v) for v in d)
        t = (ux * dx + uy * dy + uz * dz) * _F32(1.0 / dd)
        np.clip(t, 0, 1, out=t)
        ux -= t * dx
        uy -= t * dy
        uz -= t * dz
        r = _F32(self.r0) + t * _F32(self.r1 - self.r0)
        return np.sqrt(ux * ux + uy * uy + uz * uz) - r


class _Tube:
    """Tube of varying radius around a smooth centre line (a chain of capsules)."""

    def __init__(self, points, radii, sub: int = 3, smooth: bool = True):
        self.ctrl = np.asarray(points, float)
        self.ctrl_r = np.asarray(radii, float)
        self.sub = sub
        self.smooth = smooth
        if smooth and len(self.ctrl) > 2:
            self.p, self.r = _catmull_rom(self.ctrl, self.ctrl_r, sub)
        else:
            self.p, self.r = self.ctrl, self.ctrl_r

    def transformed(self, anchor, scale, shift):
        return _Tube(
            anchor + scale * (self.ctrl - anchor) + shift,
            self.ctrl_r * float(np.mean(scale)),
            self.sub,
            self.smooth,
        )

    def leaves(self):
        return [
            _Capsule(self.p[i], self.p[i + 1], self.r[i], self.r[i + 1]) for i in range(len(self.p) - 1)
        ]

    def bbox(self):
        return (self.p - self.r[:, None]).min(axis=0), (self.p + self.r[:, None]).max(axis=0)


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    # Polynomial smooth minimum: blends lobes into one organ without a crease.
    h = np.clip(0.5 + 0.5 * (b - a) / _F32(k), 0, 1)
    return b * (1 - h) + a * h - _F32(k) * h * (1 - h)


# Distances are only needed near surfaces (masks, wall layers, fat gaps, bumps); each primitive is
# evaluated inside its box padded by this much, and everything farther away reads as _CAP.
_CAP = 14.0


def _sub_slices(inner, outer):
    """``inner`` (absolute index slices) relative to ``outer``, clipped; None when disjoint."""
    rel = []
    for a, b in zip(inner, outer):
        lo, hi = max(a.start, b.start), min(a.stop, b.stop)
        if hi <= lo:
            return None, None
        rel.append((slice(lo, hi), slice(lo - b.start, hi - b.start)))
    return tuple(r[0] for r in rel), tuple(r[1] for r in rel)


class _Shape:
    """An organ: a union of primitives, optionally blended, with its own shift and scale."""

    def __init__(self, prims: Iterable, blend: float = 0.0):
        self.prims = list(prims)
        self.blend = blend

    def transformed(self, anchor, scale, shift):
        return _Shape([p.transformed(anchor, scale, shift) for p in self.prims], self.blend)

    def bbox(self, pad: float = 0.0):
        los, his = zip(*(p.bbox() for p in self.prims))
        return np.min(los, axis=0) - pad, np.max(his, axis=0) + pad

    def sdf(self, grid, sl) -> np.ndarray:
        """Distance on the index box ``sl`` of ``grid`` (capped at _CAP away from the shape)."""
        shape = tuple(s.stop - s.start for s in sl)
        out = np.full(shape, _CAP, dtype=_F32)
        for prim in self.prims:
            for leaf in prim.leaves():
                lo, hi = leaf.bbox()
                box = grid.slices(lo - _CAP, hi + _CAP)
                if box is None:
                    continue
                absl, rel = _sub_slices(box, sl)
                if absl is None:
                    continue
                s = leaf.sdf(*grid.coords(absl))
                if self.blend > 0:
                    out[rel] = _smooth_union(out[rel], s, self.blend)
                else:
                    np.minimum(out[rel], s, out=out[rel])
        np.minimum(out, _F32(_CAP), out=out)
        return out


def _ellipse2d(x, y, cx, cy, a, b):
    u, v = x - _F32(cx), y - _F32(cy)
    k0 = np.sqrt((u / _F32(a)) ** 2 + (v / _F32(b)) ** 2)
    k1 = np.sqrt((u / _F32(a * a)) ** 2 + (v / _F32(b * b)) ** 2)
    eps = _F32(1e-6)
    return (k0 - 1) * (k0 + eps) / (k1 + eps / _F32(max(a, b)))


# --------------------------------------------------------------------------------------------------
# The sampling grid


class _Grid:
    """Voxel grid (RAS array order) with the template coordinates of every voxel."""

    def __init__(self, shape, spacing, rel_origin, rotation, scale, fields_rng, deform_mm):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, float)
        self.rel0 = np.asarray(rel_origin, float)  # voxel 0 relative to the body centre, world mm
        self.rotation = float(rotation)
        self.scale = np.asarray(scale, float)
        self.axes = [
            (self.rel0[a] + self.spacing[a] * np.arange(self.shape[a])).astype(_F32) for a in range(3)
        ]
        rx = self.axes[0][:, None, None]
        ry = self.axes[1][None, :, None]
        rz = self.axes[2][None, None, :]
        ca, sa = _F32(math.cos(self.rotation)), _F32(math.sin(self.rotation))
        deform = [_smooth_field(fields_rng, self.axes, 60.0) * _F32(deform_mm) for _ in range(3)]
        self.max_deform = max(float(np.abs(d).max()) for d in deform) if deform[0].size else 0.0
        # Template coordinates: undo rotation and body scale, then warp smoothly.
        self.qx = (ca * rx + sa * ry) * _F32(1 / self.scale[0]) + deform[0]
        self.qy = (-sa * rx + ca * ry) * _F32(1 / self.scale[1]) + deform[1]
        self.qz = np.broadcast_to(rz * _F32(1 / self.scale[2]), self.shape) + deform[2]

    def slices(self, lo, hi):
        """Index box that contains the template box [lo, hi] after the warp, or None."""
        lo = np.asarray(lo, float)
        hi = np.asarray(hi, float)
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        ca, sa = math.cos(self.rotation), math.sin(self.rotation)
        t = corners * self.scale
        world = np.stack([ca * t[:, 0] - sa * t[:, 1], sa * t[:, 0] + ca * t[:, 1], t[:, 2]], 1)
        margin = self.max_deform * self.scale.max() + 1.0
        sl = []
        for a in range(3):
            i0 = int(math.floor((world[:, a].min() - margin - self.rel0[a]) / self.spacing[a])) - 1
            i1 = int(math.ceil((world[:, a].max() + margin - self.rel0[a]) / self.spacing[a])) + 2
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        return self.qx[sl], self.qy[sl], self.qz[sl]


# --------------------------------------------------------------------------------------------------
# Template anatomy (mm; x patient left, y anterior, z superior; z = 0 near L1 / the renal hila)

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


def _organ_templates():
    """Shapes of the organs and vessels before per-case variation."""
    E, T = _Ellipsoid, _Tube
    t = {}
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
    t["spleen"] = _Shape(
        [E((78, -24, 30), (26, 62, 54), _frame(spleen_dir, (0.72, 0.70, -0.35)))]
    )
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
    t["aorta"] = _Shape(
        [
            T(
                [(22, -22, 180), (20, -20, 120), (16, -14, 60), (14, -12, 0), (12, -12, -60),
                 (10, -10, -160)],
                [13, 13, 12.5, 12, 11, 10],
            )
        ]
    )
    t["ivc"] = _Shape(
        [
            T(
                [(-24, -12, -160), (-24, -10, -60), (-24, -6, 0), (-26, -6, 30), (-22, -6, 60),
                 (-14, 0, 95), (-8, 8, 130)],
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
    t["colon"] = _Shape(
        [
            T(
                [(-92, -20, -170), (-95, -14, -100), (-95, -6, -60), (-80, 20, -45), (-40, 58, -56),
                 (0, 66, -58), (42, 56, -44), (80, 22, -8), (92, -16, -12), (96, -22, -60),
                 (94, -18, -170)],
                [22, 22, 21, 20, 19, 19, 19, 18, 17, 17, 16],
            )
        ]
    )
    t["duodenum"] = _Shape(
        [
            T(
                [(-12, 36, -12), (-32, 26, -10), (-48, 10, -24), (-50, 4, -52), (-30, 8, -66),
                 (0, 12, -68), (24, 12, -56), (32, 16, -40)],
                [11, 12, 12, 12, 11, 10, 10, 10],
            )
        ]
    )
    for side, sx in (("r", -1), ("l", 1)):
        t[f"psoas_{side}"] = _Shape(
            [T([(sx * 24, -40, 12), (sx * 30, -38, -40), (sx * 38, -32, -110), (sx * 46, -24, -170)],
               [3, 13, 20, 22])]
        )
    t["ql_r"] = _Shape([T([(-54, -64, 0), (-58, -64, -60), (-62, -60, -170)], [4, 12, 14])])
    t["ql_l"] = _Shape([T([(54, -64, 0), (58, -64, -60), (62, -60, -170)], [4, 12, 14])])
    t["heart"] = _Shape([E((18, 28, 116), (72, 55, 60))])
    return t


_TEMPLATES = None


def _templates():
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _organ_templates()
    return _TEMPLATES


# --------------------------------------------------------------------------------------------------
# Case parameters (everything that does not depend on the grid)


def _draw_params(rng: np.random.Generator) -> dict:
    u = rng.uniform
    p: dict = {}
    p["fov_xy"] = u(*DEFAULT_FOV_XY_MM)
    p["fov_z"] = u(*DEFAULT_FOV_Z_MM)
    p["spacing_xy"] = u(*DEFAULT_INPLANE_SPACING_MM)
    p["spacing_z"] = u(*DEFAULT_SLICE_SPACING_MM)
    p["orientation"] = "LPS" if rng.random() < 0.5 else "RAS"
    p["scanner_center"] = np.array([u(-15, 15), u(-40, 40), u(-900, -300)])
    p["body_offset"] = np.array([u(-10, 10), u(-10, 10)])
    p["z_center"] = u(-2, 12)  # template z at the centre of the field of view
    p["scale"] = np.array([u(0.86, 0.97), u(0.86, 1.0), u(0.92, 1.06)])
    p["rotation"] = math.radians(u(-4, 4))
    p["deform_mm"] = u(2.5, 4.5)
    p["fat_mm"] = u(6.0, 20.0)
    p["muscle_mm"] = u(8.0, 13.0)
    p["dome_r"] = u(76, 88)
    p["dome_l"] = u(66, 78)
    p["vertebra_phase"] = u(0, 33)
    p["rib_phase"] = u(0, 26)
    groups = ["liver", "spleen", "kidney_r", "kidney_l", "stomach", "pancreas", "gallbladder",
              "colon", "vessels", "adrenals"]
    p["jitter"] = {
        g: (u(0.9, 1.1, 3) * u(0.95, 1.05), u(-6, 6, 3)) for g in groups
    }
    p["bump_mm"] = u(1.5, 3.5)
    hu = {
        "fat": u(-110, -90),
        "muscle": u(45, 60),
        "skin": u(20, 50),
        "liver": u(80, 100),
        "spleen": u(78, 96),
        "cortex": u(150, 195),
        "medulla": u(105, 135),
        "gallbladder": u(5, 18),
        "esophagus": u(40, 60),
        "stomach_wall": u(70, 95),
        "stomach_fluid": u(5, 25),
        "aorta": u(190, 260),
        "ivc": u(115, 145),
        "portal": u(140, 175),
        "pancreas": u(65, 90),
        "adrenal": u(40, 65),
        "bowel_wall": u(50, 80),
        "bowel_fluid": u(5, 30),
        "cancellous": u(230, 330),
        "cortical": u(750, 1050),
        "cartilage": u(120, 200),
        "disc": u(70, 100),
        "csf": u(5, 25),
        "lung": u(-880, -830),
        "blood": u(130, 170),
        "myocardium": u(90, 115),
        "sinus_fat": u(-80, -40),
        "urine": u(0, 15),
    }
    p["hu"] = hu
    p["hepatic_vessel_delta"] = u(30, 60)
    p["stomach_gas_level"] = u(25, 80)  # template y above which the stomach holds gas
    p["colon_gas"] = u(-0.3, 0.8)
    p["bowel_gas"] = u(1.1, 1.8)
    p["blur_vox"] = u(0.5, 0.9)
    p["noise_hu"] = u(10, 20)
    return p


# --------------------------------------------------------------------------------------------------
# Painting


class _Canvas:
    def __init__(self, grid: _Grid, params: dict, tex: np.ndarray, bump: np.ndarray):
        self.g = grid
        self.p = params
        self.hu = np.full(grid.shape, -1000.0, dtype=_F32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        # 0 air, 1 cavity fat, 2 wall tissue, 3 organ/bowel, 4 bone
        self.material = np.zeros(grid.shape, dtype=np.uint8)
        self.tex = tex
        self.bump = bump

    def paint(self, sl, mask, hu, label=None, material=3):
        if sl is None or not mask.any():
            return
        h = self.hu[sl]
        h[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        self.label[sl][mask] = 0 if label is None else label
        self.material[sl][mask] = material


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


def _organ_sdf(canvas: _Canvas, shape: _Shape, sl, bump: float = 0.0, carve=(), cavity_clip=True):
    s = shape.sdf(canvas.g, sl)
    if bump:
        s = s + canvas.bump[sl] * _F32(bump)
    for other, gap in carve:
        s = np.maximum(s, -(other.sdf(canvas.g, sl) - _F32(gap)))
    if cavity_clip:
        s = np.maximum(s, canvas.cav[sl] + _F32(2.0))
    return s


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
        c.paint(hsl, hin & (hs < 0), np.where(hs < -9, _F32(hu["blood"]), _F32(hu["myocardium"]))
                + _F32(5) * c.tex[hsl], material=2)


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


def _paint_organs(c: _Canvas):
    g, p, hu, sh = c.g, c.p, c.p["hu"], c.shapes
    t = c.tex
    bump = p["bump_mm"]

    def dome_clip(s, sl, gap=1.0):
        x, y, z = g.coords(sl)
        above = z - _dome_height(x, y, p["dome_r"], p["dome_l"])
        return np.maximum(s, above + _F32(gap))

    def region(shape, pad=6.0):
        return g.slices(*shape.bbox(pad))

    # Liver, with brighter hepatic and portal vein branches inside it (still labelled liver).
    sl = region(sh["liver"])
    if sl is not None:
        s = _organ_sdf(c, sh["liver"], sl, bump=bump,
                       carve=[(sh["stomach"], 3), (sh["kidney_r"], 3), (sh["gallbladder"], 0),
                              (sh["colon"], 2), (sh["duodenum"], 2), (sh["adrenal_r"], 3)])
        s = dome_clip(s, sl)
        x, y, z = g.coords(sl)
        spine = _ellipse2d(x, y, 0, _SPINE_Y, 21, 15)
        s = np.maximum(s, -(spine - _F32(8)))
        ves = sh["liver_vessels"].sdf(g, sl)
        val = _F32(hu["liver"]) + _F32(5) * t[sl]
        val += np.where(ves < 0, _F32(p["hepatic_vessel_delta"]), _F32(0))
        c.paint(sl, s < 0, val, label=6)
    sl = region(sh["spleen"])
    if sl is not None:
        s = _organ_sdf(c, sh["spleen"], sl, bump=bump,
                       carve=[(sh["spleen_hilum"], 0), (sh["stomach"], 3), (sh["kidney_l"], 3),
                              (sh["colon"], 2)])
        s = dome_clip(s, sl)
        c.paint(sl, s < 0, _F32(hu["spleen"]) + _F32(5) * t[sl], label=1)
    sl = region(sh["stomach"])
    if sl is not None:
        s = _organ_sdf(c, sh["stomach"], sl, bump=bump * 0.7)
        s = dome_clip(s, sl, gap=2.0)
        _, y, _ = g.coords(sl)
        ts = t[sl]
        content = np.where(y > _F32(p["stomach_gas_level"]), _F32(-960) + _F32(15) * ts,
                           _F32(hu["stomach_fluid"]) + _F32(5) * ts)
        val = np.where(s > -4.5, _F32(hu["stomach_wall"]) + _F32(5) * ts, content)
        c.paint(sl, s < 0, val, label=7)
    sl = region(sh["pancreas"])
    if sl is not None:
        s = _organ_sdf(c, sh["pancreas"], sl, bump=bump * 0.6,
                       carve=[(sh["duodenum"], 1), (sh["stomach"], 2), (sh["kidney_l"], 3)])
        # Lobulated, slightly fatty parenchyma.
        c.paint(sl, s < 0, _F32(hu["pancreas"]) + _F32(9) * t[sl], label=11)
    for key, lab, side in (("kidney_r", 2, "r"), ("kidney_l", 3, "l")):
        sl = region(sh[key])
        if sl is None:
            continue
        s = _organ_sdf(c, sh[key], sl, bump=bump * 0.5, carve=[(sh[f"sinus_{side}"], 0)])
        ts = t[sl]
        val = np.where(s > -8, _F32(hu["cortex"]), _F32(hu["medulla"])) + _F32(6) * ts
        c.paint(sl, s < 0, val, label=lab)
        sinus = np.maximum(sh[f"sinus_{side}"].sdf(g, sl), sh[key].sdf(g, sl) - _F32(3))
        c.paint(sl, sinus < 0, _F32(hu["sinus_fat"]) + _F32(8) * ts, material=1)
        pel = sh[f"pelvis_{side}"].sdf(g, sl)
        c.paint(sl, (pel < 0) & (sinus < 0), _F32(hu["urine"]) + _F32(4) * ts, material=3)
    for key, lab in (("adrenal_r", 12), ("adrenal_l", 13)):
        sl = region(sh[key])
        if sl is not None:
            s = _organ_sdf(c, sh[key], sl, bump=0.8)
            c.paint(sl, s < 0, _F32(hu["adrenal"]) + _F32(4) * t[sl], label=lab)
    sl = region(sh["gallbladder"])
    if sl is not None:
        s = _organ_sdf(c, sh["gallbladder"], sl, bump=1.0)
        c.paint(sl, s < 0, _F32(hu["gallbladder"]) + _F32(3) * t[sl], label=4)
    sl = region(sh["esophagus"])
    if sl is not None:
        s = _organ_sdf(c, sh["esophagus"], sl, bump=0.8, carve=[(sh["stomach"], 0)])
        val = _F32(hu["esophagus"]) + _F32(4) * t[sl]
        c.paint(sl, s < 0, val, label=5)
    # Vessels last among soft tissue: they run through and between organs.
    vessels = (
        ("veins", None, hu["portal"] - 10),
        ("arteries", None, hu["aorta"]),
        ("portal", 10, hu["portal"]),
        ("ivc", 9, hu["ivc"]),
        ("aorta", 8, hu["aorta"]),
    )
    for key, lab, val in vessels:
        sl = region(sh[key])
        if sl is None:
            continue
        s = _organ_sdf(c, sh[key], sl, bump=0.6, cavity_clip=key not in ("aorta", "ivc"))
        if key in ("ivc", "aorta"):
            s = np.maximum(s, c.cav[sl] + _F32(1))
        c.paint(sl, s < 0, _F32(val) + _F32(4) * t[sl], label=lab)


def _paint_bones(c: _Canvas):
    g, p, hu = c.g, c.p, c.p["hu"]
    t = c.tex
    cort, canc = _F32(hu["cortical"]), _F32(hu["cancellous"])
    sl = g.slices((-70, -125, -400), (70, -15, 400))
    if sl is not None:
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
        pedicle = np.minimum(_ellipse2d(x, y, -13, _SPINE_Y - 15, 5, 9),
                             _ellipse2d(x, y, 13, _SPINE_Y - 15, 5, 9)) < 0
        pedicle &= (ph >= disc + 2) & (ph < period - 6)
        spinous = (_ellipse2d(x, y, 0, _SPINE_Y - 50, 3.5, 14) < 0) & (np.mod(ph - _F32(9), period) < 17)
        trans = np.minimum(_ellipse2d(x, y, -34, _SPINE_Y - 26, 15, 3.5),
                           _ellipse2d(x, y, 34, _SPINE_Y - 26, 15, 3.5)) < 0
        trans &= (ph > disc + 8) & (ph < disc + 16)
        post = arch | pedicle | spinous | trans
        c.paint(sl, post, _F32(0.5) * (cort + canc) + _F32(30) * t[sl], material=4)
        c.paint(sl, canal < 0, _F32(hu["csf"]) + _F32(4) * t[sl], material=2)
    # Ribs: bands in the chest wall whose height drops from the spine towards the front, above the
    # costal margin; the anterior ends are cartilage.
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


# --------------------------------------------------------------------------------------------------
# Case generation


def _nudge_off_16(n: int) -> int:
    return n + 1 if n % 16 == 0 else n


def _resolve_geometry(p: dict, size, spacing):
    fov = np.array([p["fov_xy"], p["fov_xy"], p["fov_z"]])
    if size is None and spacing is None:
        spacing = np.array([p["spacing_xy"], p["spacing_xy"], p["spacing_z"]])
        size = [_nudge_off_16(max(8, int(round(f / s)))) for f, s in zip(fov, spacing)]
    elif size is None:
        spacing = np.asarray(spacing, float)
        size = [_nudge_off_16(max(8, int(round(f / s)))) for f, s in zip(fov, spacing)]
    elif spacing is None:
        size = list(size)
        spacing = fov / np.asarray(size, float)
    else:
        size, spacing = list(size), np.asarray(spacing, float)
    return tuple(int(n) for n in size), tuple(float(s) for s in spacing)


def _affine(shape, spacing, origin, orientation):
    aff = np.eye(4)
    aff[:3, :3] = np.diag(spacing)
    aff[:3, 3] = origin
    if orientation == "LPS":
        # Flipping the first two array axes keeps every voxel at the same world position.
        for a in (0, 1):
            aff[:3, 3] += aff[:3, a] * (shape[a] - 1)
            aff[:3, a] *= -1
    return aff


def generate_case(
    seed: int,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
) -> PhantomCase:
    """Generate one synthetic abdominal CT case.

    ``size`` (voxels) and ``spacing`` (mm), both (x, y, z), override the drawn geometry as described
    in the module docstring. ``orientation`` is "RAS" or "LPS"; ``None`` draws it from the seed.
    """
    seed = _check_seed(seed)
    size = _check_triplet(size, "size", integer=True)
    spacing = _check_triplet(spacing, "spacing", integer=False)
    if orientation is not None:
        orientation = str(orientation).upper()
        if orientation not in ("RAS", "LPS"):
            raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}.")

    # Separate streams keep the anatomy independent of the grid size: only the last stream's use
    # depends on the number of voxels.
    ss_params, ss_fields, ss_noise = np.random.SeedSequence(seed).spawn(3)
    p = _draw_params(np.random.default_rng(ss_params))
    fields_rng = np.random.default_rng(ss_fields)
    noise_rng = np.random.default_rng(ss_noise)
    orientation = orientation or p["orientation"]
    shape, spc = _resolve_geometry(p, size, spacing)

    spc_a = np.asarray(spc)
    extent = spc_a * (np.asarray(shape) - 1)
    origin = p["scanner_center"] - extent / 2  # world position of voxel (0, 0, 0) in RAS order
    body_center = p["scanner_center"].copy()
    body_center[:2] += p["body_offset"]
    body_center[2] -= p["z_center"] * p["scale"][2]
    grid = _Grid(shape, spc_a, origin - body_center, p["rotation"], p["scale"], fields_rng,
                 p["deform_mm"])

    tex = _smooth_field(fields_rng, grid.axes, 5.0)
    bump = _smooth_field(fields_rng, grid.axes, 18.0)
    canvas = _Canvas(grid, p, tex, bump)
    canvas.shapes = _shapes_for_case(p)
    _paint_body(canvas)
    _paint_thorax(canvas)
    _paint_muscles(canvas)
    _paint_bowel(canvas, fields_rng)
    _paint_organs(canvas)
    _paint_bones(canvas)

    hu = ndimage.gaussian_filter(canvas.hu, sigma=p["blur_vox"], mode="nearest")
    noise = noise_rng.standard_normal(shape, dtype=_F32)
    noise *= _F32(p["noise_hu"])
    hu += noise
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    label = canvas.label
    # The template's x axis points to the patient's LEFT, a RAS array's first axis to the patient's
    # RIGHT (nibabel/MONAI RAS+): mirror once so the liver lands on the patient's right.
    image = np.ascontiguousarray(image[::-1])
    label = np.ascontiguousarray(label[::-1])

    if orientation == "LPS":
        image = np.ascontiguousarray(image[::-1, ::-1, :])
        label = np.ascontiguousarray(label[::-1, ::-1, :])
    affine = _affine(shape, spc, origin, orientation)
    return PhantomCase(image=image, label=label, affine=affine, spacing=spc, orientation=orientation,
                       seed=seed)


# --------------------------------------------------------------------------------------------------
# Writing


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, dtype) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # mtime=0 makes the compressed file byte-identical across runs.
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _atomic_write(path: pathlib.Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _split_counts(cases: int, split) -> tuple[int, int, int]:
    try:
        fr = [float(v) for v in split]
    except (TypeError, ValueError):
        raise ValueError(f"split must be three non-negative fractions, got {split!r}.") from None
    if len(fr) != 3 or any(not math.isfinite(v) or v < 0 for v in fr) or sum(fr) <= 0:
        raise ValueError(
            f"split must be three non-negative fractions with a positive sum, got {split!r}."
        )
    if fr[0] <= 0:
        raise ValueError(f"split must give the training set a positive fraction, got {split!r}.")
    if cases < 3:
        return cases, 0, 0
    total = sum(fr)
    val = int(round(cases * fr[1] / total))
    test = int(round(cases * fr[2] / total))
    # Every requested split gets a case; training keeps at least one.
    if fr[1] > 0:
        val = max(val, 1)
    if fr[2] > 0:
        test = max(test, 1)
    while cases - val - test < 1:
        if val >= test and val > (1 if fr[1] > 0 else 0):
            val -= 1
        elif test > (1 if fr[2] > 0 else 0):
            test -= 1
        else:
            break
    return cases - val - test, val, test


def write_phantom_dataset(
    out_dir,
    cases: int = 6,
    seed: int = 0,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    progress: bool = False,
) -> pathlib.Path:
    """Write ``cases`` phantom volumes, their label maps and an MSD-style ``dataset.json``.

    Layout: ``out_dir/imagesTr/phantom_000.nii.gz`` (int16 HU), ``out_dir/labelsTr/phantom_000.nii.gz``
    (uint8 BTCV labels) and ``out_dir/dataset.json`` with training, validation and test lists whose
    paths are relative to the JSON's folder. Case ``i`` uses ``case_seed(seed, i)`` and alternates
    RAS (even ``i``) and LPS (odd ``i``) headers. Every file is written atomically and
    ``dataset.json`` is written last, so its presence means the data set is complete.
    Returns the path of ``dataset.json``.
    """
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)):
        raise ValueError(f"cases must be a whole number of at least 1, got {cases!r}.")
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}.")
    seed = _check_seed(seed)
    size = _check_triplet(size, "size", integer=True)
    spacing = _check_triplet(spacing, "spacing", integer=False)
    n_train, n_val, n_test = _split_counts(int(cases), split)

    out = pathlib.Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    indices: Iterable[int] = range(int(cases))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="phantom", unit="case")
    entries = []
    for i in indices:
        case = generate_case(case_seed(seed, i), size=size, spacing=spacing,
                             orientation="RAS" if i % 2 == 0 else "LPS")
        name = f"phantom_{i:03d}.nii.gz"
        _atomic_write(out / "imagesTr" / name, _nifti_bytes(case.image, case.affine, np.int16))
        _atomic_write(out / "labelsTr" / name, _nifti_bytes(case.label, case.affine, np.uint8))
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})

    meta = {
        "name": "medhpm-phantom",
        "description": (
            "Synthetic contrast-enhanced (portal-venous) abdominal CT phantoms with BTCV-numbered organ "
            "labels, generated by medhpm.data.phantom. Not patient data."
        ),
        "reference": "medhpm synthetic phantom (medhpm.data.phantom)",
        "licence": "Apache-2.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "numTraining": n_train,
        "numValidation": n_val,
        "numTest": n_test,
        "seed": seed,
        "training": entries[:n_train],
        "validation": entries[n_train:n_train + n_val],
        "test": entries[n_train + n_val:],
    }
    path = out / "dataset.json"
    _atomic_write(path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return path
