"""Pre-training figure: what the encoder saw, what it reconstructed, and where HPM chose to mask.

One home for the figure that the trainer writes during pre-training and ``medhpm visualize pretrain``
writes for a checkpoint (:func:`reconstruction_figure`, on a crop from :func:`figure_crop`).

Rows: the three orthogonal slices through the centre of the crop (axial, coronal, sagittal).
Columns: original, masked input, reconstruction (targets de-normalised with each patch's own statistics),
reconstruction with the visible patches pasted back, the teacher's predicted difficulty per patch, and the
mask (dark = visible, grey = randomly masked, red = mined hard patch). Arrays are (H, W, D) in RAS voxel
order as the pre-training chain produces them; slices are shown in radiological convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import CenterSpatialCrop, SpatialPad

from medhpm.config import DataConfig
from medhpm.data.transforms import predict_transforms
from medhpm.pretrain.masking import hard_patch_mask, num_hard, num_masked, random_mask
from medhpm.pretrain.model import HPMPretrainModel
from medhpm.pretrain.step import teacher_scores
from medhpm.runtime.files import save_png


def tokens_to_volume(values: np.ndarray, grid, patch_size: int) -> np.ndarray:
    """Per-token values ``(N,)`` in token order -> a voxel volume ``(H, W, D)`` (each patch constant)."""
    g = tuple(int(v) for v in grid)
    vol = np.asarray(values, dtype=np.float32).reshape(g)  # token index (ih*Gw + iw)*Gd + id
    for axis in range(3):
        vol = np.repeat(vol, patch_size, axis=axis)
    return vol


def _views(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal centre slices of an (H, W, D) RAS volume, oriented for display."""
    h, w, d = vol.shape
    axial = vol[:, :, d // 2]  # (x, y): show y anterior up, patient right on image left
    coronal = vol[:, w // 2, :]  # (x, z): superior up
    sagittal = vol[h // 2, :, :]  # (y, z): anterior left
    # RAS: +x is the patient's right, shown on the image's left (radiological convention)
    return [np.flipud(axial.T)[:, ::-1], np.flipud(coronal.T)[:, ::-1], np.flipud(sagittal.T)[:, ::-1]]


def pretrain_figure(
    original,
    masked,
    recon,
    pasted,
    difficulty,
    mask,
    grid,
    patch_size,
    out_png,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    n_hard_mask=None,
) -> Path:
    """Write the reconstruction figure as PNG (atomically) and return its path.

    ``original``/``masked``/``recon``/``pasted``: (H, W, D) intensities in [vmin, vmax];
    ``difficulty``: (N,) predicted per-patch loss or None (methods without a teacher);
    ``mask``: (N,) bool, True = masked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = np.asarray(mask, dtype=bool)
    mask_vol_vals = mask.astype(np.float32)
    if difficulty is not None:
        # mark the patches the teacher ranked hardest among the masked ones: the mined patches
        diff = np.asarray(difficulty, dtype=np.float32)
        k = int(n_hard_mask) if n_hard_mask is not None else 0
        if k > 0:
            top = np.argsort(-diff)[:k]
            mask_vol_vals[top] = 2.0
    columns: list[tuple[str, Any, Any, tuple[float, float]]] = [  # (title, volume, colour map, value range)
        ("original", original, "gray", (vmin, vmax)),
        ("masked input", masked, "gray", (vmin, vmax)),
        ("reconstruction", recon, "gray", (vmin, vmax)),
        ("reconstruction + visible", pasted, "gray", (vmin, vmax)),
    ]
    if difficulty is not None:
        dv = tokens_to_volume(diff, grid, patch_size)
        columns.append(("predicted difficulty", dv, "magma", (float(diff.min()), float(diff.max()))))
    mv = tokens_to_volume(mask_vol_vals, grid, patch_size)
    columns.append(
        (
            "mask (grey random, red hard)" if difficulty is not None else "mask (grey = masked)",
            mv,
            matplotlib.colors.ListedColormap(["#1a1a1a", "#9a9a9a", "#d62728"]),
            (0, 2),
        )
    )
    rows = ["axial", "coronal", "sagittal"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.3 * len(columns), 2.4 * len(rows) + 0.4))
    for c, (name, vol, cmap, (lo, hi)) in enumerate(columns):
        views = _views(np.asarray(vol, dtype=np.float32))
        for r, view in enumerate(views):
            ax = axes[r, c]
            ax.imshow(view, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(rows[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png)


def figure_crop(data_cfg: DataConfig, image) -> torch.Tensor:
    """The figure's input: ``image`` (a path) through the deterministic chain, centre crop of the ROI,
    padded where the scan is smaller: ``(1, 1, *roi)`` float32."""
    roi = tuple(int(r) for r in data_cfg.roi)
    img = predict_transforms(data_cfg)({"image": str(image)})["image"]
    x = torch.as_tensor(SpatialPad(roi)(CenterSpatialCrop(roi)(img))).as_subclass(torch.Tensor)
    return x[None].float()


@torch.no_grad()
def reconstruction_figure(
    model: HPMPretrainModel,
    teacher: HPMPretrainModel | None,
    x: torch.Tensor,
    mask_ratio: float,
    alpha: float,
    out_png,
    title: str,
    seed: int = 0,
    view: str = "full",
    views: int = 1,
) -> Path:
    """Mask ``x`` (1, C, H, W, D) as pre-training does (HPM's mask from ``teacher``'s predicted difficulty,
    queried as the run queries it (``view``/``views``, :func:`medhpm.pretrain.step.teacher_scores`), with
    share ``alpha`` of hard patches, or a random mask without a teacher; drawn from ``seed``), reconstruct
    it with ``model`` in eval mode (its train/eval mode is restored) and draw the figure."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = model.encoder.num_patches
    scores = None
    if teacher is not None:
        view_noise = torch.rand(1, n, generator=g).to(x.device) if view == "masked" else None
        scores = teacher_scores(teacher, x, view, views, view_noise).cpu()
        mask = hard_patch_mask(scores, mask_ratio, alpha, generator=g)
    else:
        alpha = 0.0
        mask = random_mask(1, n, mask_ratio, generator=g)
    was = model.training
    model.eval()
    rec = model.reconstruct_full(x, mask.to(x.device))
    model.train(was)
    return pretrain_figure(
        original=x[0, 0].cpu().numpy(),
        masked=rec["masked_input"][0, 0].cpu().numpy(),
        recon=rec["recon"][0, 0].cpu().numpy(),
        pasted=rec["pasted"][0, 0].cpu().numpy(),
        difficulty=None if scores is None else scores[0].numpy(),
        mask=mask[0].numpy(),
        grid=model.encoder.grid_size,
        patch_size=model.patch_size,
        out_png=out_png,
        title=f"{title}, alpha {alpha:.2f}" + ("" if scores is None else f", teacher view {view}"),
        n_hard_mask=num_hard(alpha, num_masked(n, mask_ratio)),
    )
