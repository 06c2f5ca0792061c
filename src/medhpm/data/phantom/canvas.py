"""The canvas that a case is painted on: HU, label and material arrays on the sampling grid."""

from __future__ import annotations

import numpy as np

from medhpm.data.phantom.geometry import _Grid
from medhpm.data.phantom.shapes import _Shape

_F32 = np.float32


class _Canvas:
    # set by the painters after construction: the case's shapes (_paint), the cavity's signed distance and the
    # wall muscle's thickness (_paint_body)
    shapes: dict
    cav: np.ndarray
    wall_muscle: np.ndarray

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


def _organ_sdf(canvas: _Canvas, shape: _Shape, sl, bump: float = 0.0, carve=(), cavity_clip=True):
    s = shape.sdf(canvas.g, sl)
    if bump:
        s = s + canvas.bump[sl] * _F32(bump)
    for other, gap in carve:
        s = np.maximum(s, -(other.sdf(canvas.g, sl) - _F32(gap)))
    if cavity_clip:
        s = np.maximum(s, canvas.cav[sl] + _F32(2.0))
    return s
