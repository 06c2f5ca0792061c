"""Segmentation overlay figure (the paper's Fig. 4): CT, ground truth and prediction on a few slices.

Arrays are (X, Y, Z) in RAS voxel order, i.e. what ``nibabel.as_closest_canonical`` gives: axis 0 runs
towards the patient's right, axis 1 towards anterior, axis 2 towards superior. Panels are drawn in the
radiological convention (patient right on the image's left, anterior or superior at the top), with the
pixel aspect ratio taken from the voxel spacing. Organ colours are fixed per label value so that every
figure of a project uses the same colour for the same organ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..data.labels import BTCV13, LABEL_PALETTE, label_rgb
from ..evaluate.classes import display_name, parse_classes
from ..evaluate.metrics import as_label_map
from ..runtime.files import refuse_overwriting_inputs, save_png

# Label value -> colour: the package's one table (medhpm.data.labels), shared with the colour tables written
# beside every predicted label map.
LABEL_COLORS: dict[int, tuple[float, float, float]] = {i + 1: to_rgb(c) for i, c in enumerate(LABEL_PALETTE)}


def label_color(value: int) -> tuple[float, float, float]:
    """RGB in [0, 1] of a label value; values past the table reuse it cyclically (e.g. SMWB's 41 organs)."""
    return tuple(c / 255.0 for c in label_rgb(value))  # type: ignore[return-value]


def _organ_name(value: int, classes: Mapping[int, str] | None) -> str:
    names = classes if classes is not None else BTCV13
    return display_name(names[value]) if value in names else f"label {value}"


def _spread_pick(scores: np.ndarray, n: int, min_gap: int) -> list[int]:
    """Indices of the n best scores, at least ``min_gap`` apart so that rows show different anatomy."""
    picked: list[int] = []
    for idx in np.argsort(-scores, kind="stable"):
        if scores[idx] <= 0 or len(picked) == n:
            break
        if all(abs(int(idx) - p) >= min_gap for p in picked):
            picked.append(int(idx))
    return picked


def choose_slices(seg: np.ndarray, n: int = 3, axis: int = 2) -> list[int]:
    """Slices along ``axis`` that show the most organs (ties: most labelled voxels), spread over the volume.

    Returns up to ``n`` indices in descending order (superior/anterior first); evenly spaced central slices
    when ``seg`` is empty.
    """
    depth = seg.shape[axis]
    other = tuple(a for a in range(seg.ndim) if a != axis)
    n_organs = np.zeros(depth)
    for v in np.unique(seg):
        if v > 0:
            n_organs += np.any(seg == v, axis=other)
    area = np.count_nonzero(seg, axis=other)
    # organ count dominates; the area fraction (< 1) only breaks ties
    scores = n_organs + area / (area.max() + 1.0)
    picked = _spread_pick(scores, n, max(1, depth // (2 * n)))
    if not picked:
        picked = [int(round(f * (depth - 1))) for f in np.linspace(0.3, 0.7, n)] if depth > 1 else [0]
    return sorted(set(picked), reverse=True)


def _window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with low < high; got {window!r}.")
    return np.clip((image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _blend(gray: np.ndarray, seg: np.ndarray | None, values: Sequence[int], alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if seg is not None:
        for v in values:
            m = seg == v
            if m.any():
                rgb[m] = (1.0 - alpha) * rgb[m] + alpha * np.asarray(label_color(v))
    return rgb


def _axial(vol: np.ndarray, k: int) -> np.ndarray:
    # (X, Y) -> rows = Y from anterior (top) to posterior, cols = X from patient right (left) to left
    return vol[:, :, k].T[::-1, ::-1]


def _coronal(vol: np.ndarray, j: int) -> np.ndarray:
    # (X, Z) -> rows = Z from superior (top) to inferior, cols = X from patient right (left) to left
    return vol[:, j, :].T[::-1, ::-1]


def segmentation_figure(
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray | None,
    spacing: Sequence[float],
    out_png: str | Path,
    classes: str | Mapping | None = None,
    slices: Sequence[int] | None = None,
    window: tuple[float, float] = (-175, 250),
    title: str | None = None,
    *,
    coronal: bool | None = None,
    n_slices: int = 3,
    alpha: float = 0.5,
    panel_inches: float = 2.6,
    dpi: int = 100,
) -> Path:
    """Write a PNG grid: columns CT | ground truth | prediction, rows axial slices (+ one coronal view).

    Args:
        image: CT in HU, (X, Y, Z) in RAS voxel order (see the module docstring).
        label, pred: integer label maps of the same shape, or None to leave that column out.
        spacing: voxel size in mm along X, Y, Z; sets each panel's aspect ratio.
        out_png: output path, written atomically.
        classes: which labels to draw and their legend names: ``{label_value: name}`` or anything
            ``parse_classes`` takes (``"btcv13"``, ``"liver=6,spleen=1"``); default: every label present,
            named as in BTCV.
        slices: axial indices (along Z) to show; default ``choose_slices`` on the label (else the prediction).
        window: HU window mapped to black..white.
        title: figure title.
        coronal: add a coronal row through the slab with the most organs; None (default) adds it when the
            volume's height is at least a quarter of its width (a thin slab makes an unreadable strip).
        alpha: overlay opacity (1 paints organs in their pure legend colour).
    Returns:
        ``Path(out_png)``.
    """
    if classes is not None:
        classes = parse_classes(classes)
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3D (X, Y, Z) array; got shape {image.shape}.")
    segs = {"ground truth": label, "prediction": pred}
    for what, seg in segs.items():
        if seg is not None and np.shape(seg) != image.shape:
            raise ValueError(f"{what} shape {np.shape(seg)} differs from image shape {image.shape}.")
    segs = {k: as_label_map(v, k) for k, v in segs.items() if v is not None}
    sx, sy, sz = (float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    if min(sx, sy, sz) <= 0:
        raise ValueError(f"spacing must be positive; got {spacing!r}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")

    # segs holds no None any more (dropped above); its type still says Optional
    present = sorted({int(v) for s in segs.values() for v in np.unique(s) if v > 0})  # type: ignore[arg-type]
    values = [v for v in present if classes is None or v in classes]
    guide = segs.get("ground truth", segs.get("prediction"))
    guide = None if guide is None else np.where(np.isin(guide, values), guide, 0)
    if slices is None:
        slices = choose_slices(guide if guide is not None else np.zeros(image.shape, np.uint8), n_slices)
    slices = [int(k) for k in slices]
    for k in slices:
        if not 0 <= k < image.shape[2]:
            raise ValueError(f"axial slice {k} is outside the volume (0..{image.shape[2] - 1}).")
    views = [("axial", k) for k in slices]
    if coronal is None:
        coronal = image.shape[2] * sz >= 0.25 * image.shape[0] * sx
    if coronal:
        j = choose_slices(guide, 1, axis=1)[0] if guide is not None else image.shape[1] // 2
        views.append(("coronal", j))

    gray = _window(image, window)
    columns = [("CT", None), *segs.items()]
    # Panel heights follow the physical extent so that mm are square on screen.
    width_mm = image.shape[0] * sx
    heights = [(image.shape[1] * sy if v == "axial" else image.shape[2] * sz) / width_mm for v, _ in views]
    fig_w = panel_inches * len(columns)
    legend_cols = max(1, min(len(values), int(fig_w / 1.1)))  # about 1.1 inch per legend entry
    legend_rows = int(np.ceil(len(values) / legend_cols)) if values else 0
    fig_h = panel_inches * sum(heights) + 0.35 * legend_rows + (0.45 if title else 0.25)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    top = 1.0 - (0.45 if title else 0.25) / fig_h
    bottom = (0.35 * legend_rows + 0.05) / fig_h
    grid = fig.add_gridspec(
        len(views),
        len(columns),
        height_ratios=heights,
        left=0.06,
        right=0.99,
        top=top,
        bottom=bottom,
        wspace=0.02,
        hspace=0.04,
    )

    for r, (view, idx) in enumerate(views):
        cut = _axial if view == "axial" else _coronal
        aspect = (sy if view == "axial" else sz) / sx  # row spacing / column spacing
        g = cut(gray, idx)
        for c, (col_name, seg) in enumerate(columns):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(
                _blend(g, None if seg is None else cut(seg, idx), values, alpha), aspect=aspect, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{view} {'z' if view == 'axial' else 'y'}={idx}", fontsize=8)
            if c == 0 and r == 0:  # orientation marks: radiological convention
                ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=8, va="center")
                ax.text(0.98, 0.5, "L", transform=ax.transAxes, color="w", fontsize=8, va="center", ha="right")
    if values:
        handles = [Patch(facecolor=label_color(v), edgecolor="none", label=_organ_name(v, classes)) for v in values]
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=legend_cols,
            fontsize=8,
            frameon=False,
            handlelength=1.2,
            columnspacing=1.0,
        )
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.08 / fig_h, va="top")

    return save_png(fig, out_png, dpi=dpi)


def _load_canonical(path: str | Path, what: str):
    """(array, affine) of a NIfTI file or (the scan) a DICOM series folder, reoriented to RAS."""
    import nibabel as nib

    from ..data.ct_reader import load_image
    from ..data.scans import is_dicom_series

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    if path.is_dir():
        if not is_dicom_series(path):
            raise ValueError(
                f"{what} {path} is a folder without DICOM files; give a NIfTI file or a DICOM series folder."
            )
        data, affine, _ = load_image(path, orientation="RAS")  # medhpm's CT reader, as predict reads it
        return data, affine
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"{what} file {path} is not a readable NIfTI image ({e}); give a NIfTI file "
            "(.nii / .nii.gz) or a DICOM series folder."
        ) from None
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:  # (X, Y, Z, C): the first channel/time point is what we can show
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{what} file {path} has shape {data.shape}; expected a 3D volume.")
    return data, np.asarray(img.affine, dtype=float)


def segmentation_figure_from_files(
    image_path: str | Path, label_path: str | Path | None, pred_path: str | Path | None, out_png: str | Path, **kwargs
) -> Path:
    """Load image (NIfTI or DICOM series folder) / ground truth / prediction (NIfTI), reorient all to RAS and
    call ``segmentation_figure``.

    Reorienting with ``nibabel.as_closest_canonical`` first makes the figure radiological whatever the files'
    storage orientation (LPS from DICOM converters, RAS from MONAI, ...). Raises ValueError naming the files
    when shapes or affines (tolerance 1e-3 mm) of the label maps differ from the image's. ``kwargs`` go to
    ``segmentation_figure`` (classes, slices, window, title, coronal, alpha, ...).
    """
    refuse_overwriting_inputs([out_png], [image_path, label_path, pred_path], hint="choose another PNG path with -o")
    image, aff = _load_canonical(image_path, "image")
    maps: dict[str, np.ndarray | None] = {}
    for what, p in (("ground truth", label_path), ("prediction", pred_path)):
        if p is None:
            maps[what] = None
            continue
        data, a = _load_canonical(p, what)
        if data.shape != image.shape:
            raise ValueError(
                f"{what} {p} has shape {data.shape} but image {image_path} has shape {image.shape} "
                "(after reorienting both to RAS); they must share one voxel grid."
            )
        if np.abs(a - aff).max() > 1e-3:
            raise ValueError(
                f"{what} {p} and image {image_path} have different affines (largest difference "
                f"{np.abs(a - aff).max():.4g} mm after reorienting to RAS); they must share one voxel grid."
            )
        maps[what] = as_label_map(data, f"{what} file {p}")
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    return segmentation_figure(
        image.astype(np.float32), maps["ground truth"], maps["prediction"], spacing, out_png, **kwargs
    )
