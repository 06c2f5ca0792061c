"""Geometry of a case: the field of view and voxel size, the sampling grid in template coordinates, and
the affine of the stored array (RAS or LPS)."""

from __future__ import annotations

import math

import numpy as np

from medhpm.data.phantom.fields import _smooth_field

_F32 = np.float32

DEFAULT_FOV_XY_MM = (320.0, 350.0)
DEFAULT_FOV_Z_MM = (205.0, 245.0)
DEFAULT_INPLANE_SPACING_MM = (2.3, 2.8)
DEFAULT_SLICE_SPACING_MM = (2.5, 5.0)


class _Grid:
    """Voxel grid (RAS array order) with the template coordinates of every voxel."""

    def __init__(self, shape, spacing, rel_origin, rotation, scale, fields_rng, deform_mm):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, float)
        self.rel0 = np.asarray(rel_origin, float)  # voxel 0 relative to the body centre, world mm
        self.rotation = float(rotation)
        self.scale = np.asarray(scale, float)
        self.axes = [(self.rel0[a] + self.spacing[a] * np.arange(self.shape[a])).astype(_F32) for a in range(3)]
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
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
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
