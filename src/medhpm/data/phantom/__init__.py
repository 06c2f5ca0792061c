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

The package reads as a case is built: ``params`` (what the seed draws), ``geometry`` (field of view,
grid, affine), ``fields`` (smooth random fields), ``shapes`` (signed distance primitives), ``anatomy``
(the template and its per-case variation), ``canvas``, ``body`` and ``organs`` (painting), ``case``
(``generate_case``) and ``write`` (``write_phantom_dataset``).
"""

from __future__ import annotations

from medhpm.data.labels import BTCV_LABELS, PROTOCOL_ORGANS
from medhpm.data.phantom.case import PhantomCase, case_seed, generate_case
from medhpm.data.phantom.geometry import (
    DEFAULT_FOV_XY_MM,
    DEFAULT_FOV_Z_MM,
    DEFAULT_INPLANE_SPACING_MM,
    DEFAULT_SLICE_SPACING_MM,
)
from medhpm.data.phantom.write import write_phantom_dataset

__all__ = [
    "BTCV_LABELS",
    "PROTOCOL_ORGANS",
    "DEFAULT_FOV_XY_MM",
    "DEFAULT_FOV_Z_MM",
    "DEFAULT_INPLANE_SPACING_MM",
    "DEFAULT_SLICE_SPACING_MM",
    "PhantomCase",
    "case_seed",
    "generate_case",
    "write_phantom_dataset",
]
