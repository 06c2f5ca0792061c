"""Case parameters: everything drawn from a case's seed that does not depend on the grid (field of view,
body build, organ variation, Hounsfield units, blur and noise)."""

from __future__ import annotations

import math

import numpy as np

from medhpm.data.phantom.geometry import (
    DEFAULT_FOV_XY_MM,
    DEFAULT_FOV_Z_MM,
    DEFAULT_INPLANE_SPACING_MM,
    DEFAULT_SLICE_SPACING_MM,
)


def _draw_params(rng: np.random.Generator) -> dict:
    """Every parameter of a case, in one fixed order of draws from ``rng`` (the order is part of what a
    seed means: changing it changes every phantom)."""
    p: dict = {}
    _draw_geometry(rng, p)
    _draw_body(rng, p)
    _draw_organ_variation(rng, p)
    _draw_intensities(rng, p)
    _draw_scanner(rng, p)
    return p


def _draw_geometry(rng: np.random.Generator, p: dict) -> None:
    """Field of view, voxel size, orientation and the patient's place and pose in the scanner."""
    u = rng.uniform
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


def _draw_body(rng: np.random.Generator, p: dict) -> None:
    """Build: fat and muscle thickness, diaphragm domes, where the vertebrae and ribs fall."""
    u = rng.uniform
    p["fat_mm"] = u(6.0, 20.0)
    p["muscle_mm"] = u(8.0, 13.0)
    p["dome_r"] = u(76, 88)
    p["dome_l"] = u(66, 78)
    p["vertebra_phase"] = u(0, 33)
    p["rib_phase"] = u(0, 26)


def _draw_organ_variation(rng: np.random.Generator, p: dict) -> None:
    """Per-organ-group scaling and shift, and how bumpy organ surfaces are."""
    u = rng.uniform
    groups = [
        "liver",
        "spleen",
        "kidney_r",
        "kidney_l",
        "stomach",
        "pancreas",
        "gallbladder",
        "colon",
        "vessels",
        "adrenals",
    ]
    p["jitter"] = {g: (u(0.9, 1.1, 3) * u(0.95, 1.05), u(-6, 6, 3)) for g in groups}
    p["bump_mm"] = u(1.5, 3.5)


def _draw_intensities(rng: np.random.Generator, p: dict) -> None:
    """Mean HU of every tissue (portal-venous phase), vessel contrast inside the liver, gas in the
    stomach and bowel."""
    u = rng.uniform
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


def _draw_scanner(rng: np.random.Generator, p: dict) -> None:
    """Partial volume (blur, voxels) and scanner noise (HU)."""
    u = rng.uniform
    p["blur_vox"] = u(0.5, 0.9)
    p["noise_hu"] = u(10, 20)
