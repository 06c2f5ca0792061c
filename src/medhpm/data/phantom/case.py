"""One synthetic case: argument checks, the seeds, and ``generate_case`` (draw, grid, paint, image)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from medhpm.data.phantom.anatomy import _shapes_for_case
from medhpm.data.phantom.body import _paint_body, _paint_bones, _paint_bowel, _paint_muscles, _paint_thorax
from medhpm.data.phantom.canvas import _Canvas
from medhpm.data.phantom.fields import _smooth_field
from medhpm.data.phantom.geometry import _affine, _Grid, _resolve_geometry
from medhpm.data.phantom.organs import _paint_organs
from medhpm.data.phantom.params import _draw_params
from medhpm.data.phantom.variability import _draw_wide, _paint_lesions, check_variability

_F32 = np.float32


@dataclasses.dataclass
class PhantomCase:
    """One synthetic CT volume with its label map, in the array order given by ``orientation``."""

    image: np.ndarray  # int16 Hounsfield units
    label: np.ndarray  # uint8 BTCV labels
    affine: np.ndarray  # 4x4 voxel-to-world (RAS mm, NIfTI convention)
    spacing: tuple[float, float, float]
    orientation: str  # "RAS" or "LPS" (nibabel axis codes of the array axes)
    seed: int = 0
    variation: dict = dataclasses.field(default_factory=dict)  # wide variability: what was drawn (phase, ...)


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
    out: list[int | float] = []
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


def generate_case(
    seed: int,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
    variability: str = "standard",
) -> PhantomCase:
    """Generate one synthetic abdominal CT case.

    ``size`` (voxels) and ``spacing`` (mm), both (x, y, z), override the drawn geometry as described
    in the module docstring. ``orientation`` is "RAS" or "LPS"; ``None`` draws it from the seed.
    ``variability`` is ``standard`` or ``wide`` (the variability of real scans; see ``variability``).
    """
    seed = _check_seed(seed)
    size = _check_triplet(size, "size", integer=True)
    spacing = _check_triplet(spacing, "spacing", integer=False)
    orientation = _check_orientation(orientation)
    variability = check_variability(variability)

    # Separate streams keep the anatomy independent of the grid size: only the noise stream's use
    # depends on the number of voxels. The fourth stream widens the draws (``wide`` only), so that
    # ``standard`` cases are the same as before it existed.
    ss_params, ss_fields, ss_noise, ss_wide = np.random.SeedSequence(seed).spawn(4)
    p = _draw_params(np.random.default_rng(ss_params))
    if variability == "wide":
        _draw_wide(np.random.default_rng(ss_wide), p)
    fields_rng = np.random.default_rng(ss_fields)
    noise_rng = np.random.default_rng(ss_noise)
    orientation = orientation or p["orientation"]
    shape, spc = _resolve_geometry(p, size, spacing)
    origin, grid = _sampling_grid(p, shape, spc, fields_rng)
    canvas = _paint(grid, p, fields_rng)
    image = _scan(canvas.hu, p, shape, noise_rng)
    image, label = _store(image, canvas.label, orientation)
    affine = _affine(shape, spc, origin, orientation)
    return PhantomCase(
        image=image,
        label=label,
        affine=affine,
        spacing=spc,
        orientation=orientation,
        seed=seed,
        variation=_variation(p) if variability == "wide" else {},
    )


def _variation(p: dict) -> dict:
    """What a wide case drew that a user may want to stratify by (written into dataset.json)."""
    return {
        "phase": p["phase"],
        "hu_offset": round(float(p["hu_offset"]), 1),
        "noise_hu": round(float(p["noise_hu"]), 1),
        "fat_mm": round(float(p["fat_mm"]), 1),
        "partial_fov": p["partial_fov"],
        "fov_z_mm": round(float(p["fov_z"]), 1),
        "lesions": [f"{les['kind']} {les['organ']} r={les['radius_mm']:.0f}mm" for les in p["lesions"]],
    }


def _check_orientation(orientation):
    if orientation is not None:
        orientation = str(orientation).upper()
        if orientation not in ("RAS", "LPS"):
            raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}.")
    return orientation


def _sampling_grid(p: dict, shape, spc, fields_rng) -> tuple[np.ndarray, _Grid]:
    """World position of voxel (0, 0, 0) (RAS order) and the grid of the case, placed around the body."""
    spc_a = np.asarray(spc)
    extent = spc_a * (np.asarray(shape) - 1)
    origin = p["scanner_center"] - extent / 2  # world position of voxel (0, 0, 0) in RAS order
    body_center = p["scanner_center"].copy()
    body_center[:2] += p["body_offset"]
    body_center[2] -= p["z_center"] * p["scale"][2]
    grid = _Grid(shape, spc_a, origin - body_center, p["rotation"], p["scale"], fields_rng, p["deform_mm"])
    return origin, grid


def _paint(grid: _Grid, p: dict, fields_rng) -> _Canvas:
    """Texture and surface bumps, then the tissues from the outside in: body, thorax, muscles, bowel,
    organs, bones."""
    tex = _smooth_field(fields_rng, grid.axes, 5.0)
    bump = _smooth_field(fields_rng, grid.axes, 18.0)
    canvas = _Canvas(grid, p, tex, bump)
    canvas.shapes = _shapes_for_case(p)
    _paint_body(canvas)
    _paint_thorax(canvas)
    _paint_muscles(canvas)
    _paint_bowel(canvas, fields_rng)
    _paint_organs(canvas)
    _paint_lesions(canvas)
    _paint_bones(canvas)
    return canvas


def _scan(hu: np.ndarray, p: dict, shape, noise_rng) -> np.ndarray:
    """What the scanner adds: partial volume (a Gaussian blur), noise, and int16 HU within the CT range."""
    hu = ndimage.gaussian_filter(hu, sigma=p["blur_vox"], mode="nearest")
    noise = noise_rng.standard_normal(shape, dtype=_F32)
    noise *= _F32(p["noise_hu"])
    hu += noise
    if "hu_offset" in p:  # wide variability: the scanner's calibration offset
        hu += _F32(p["hu_offset"])
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _store(image: np.ndarray, label: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays in the stored axis order."""
    # The template's x axis points to the patient's LEFT, a RAS array's first axis to the patient's
    # RIGHT (nibabel/MONAI RAS+): mirror once so the liver lands on the patient's right.
    image = np.ascontiguousarray(image[::-1])
    label = np.ascontiguousarray(label[::-1])
    if orientation == "LPS":
        image = np.ascontiguousarray(image[::-1, ::-1, :])
        label = np.ascontiguousarray(label[::-1, ::-1, :])
    return image, label
