"""Approximate signed distance fields (negative inside), evaluated on coordinate arrays.

Organs are unions of deformed ellipsoids and tubes (chains of capsules around a smooth centre line);
``_Shape`` evaluates a union only inside each primitive's padded box, so distances far from every
surface read as ``_CAP``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

_F32 = np.float32


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
            anchor + scale * (self.ctrl - anchor) + shift, self.ctrl_r * float(np.mean(scale)), self.sub, self.smooth
        )

    def leaves(self):
        return [_Capsule(self.p[i], self.p[i + 1], self.r[i], self.r[i + 1]) for i in range(len(self.p) - 1)]

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
