"""The pretext on scans pre-training never saw: the reconstruction loss of randomly masked patches of
random crops of held-out scans, for a whole student (a ``final.pt``'s, or a snapshot of
``pretrain.snapshot_student``). Falling training loss with a rising held-out one is a pre-training that
learns its scans by heart; the experiment runner plots both against pre-training steps.

Every model is scored on the same crops and masks (drawn from ``seed``, per case), whatever its method: the
masks are random (MAE's), not the teacher's, so that MAE and HPM students answer the same question.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medhpm.config import Config
from medhpm.data.transforms import predict_transforms, val_transforms
from medhpm.pretrain.masking import random_mask
from medhpm.pretrain.model import HPMPretrainModel

__all__ = ["random_crops", "heldout_reconstruction", "load_student"]


def random_crops(data_cfg, image, label, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` crops of ``data_cfg.roi`` at uniformly random places (drawn from ``seed``) of the scan after
    the deterministic chain (and of its label map, on the same grid): ``(n, 1, *roi)`` float32 each."""
    roi = tuple(int(r) for r in data_cfg.roi)
    if label is None:
        data = predict_transforms(data_cfg)({"image": str(image)})
    else:
        data = val_transforms(data_cfg)({"image": str(image), "label": str(label)})
    img = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()  # (1, H, W, D), >= roi
    lab = None if label is None else torch.as_tensor(data["label"]).as_subclass(torch.Tensor).float()
    rng = np.random.default_rng(seed)
    xs, ls = [], []
    for _ in range(n):
        start = [int(rng.integers(0, s - r + 1)) for s, r in zip(img.shape[1:], roi)]
        sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(start, roi))
        xs.append(img[sl])
        if lab is not None:
            ls.append(lab[sl])
    return torch.stack(xs), (torch.stack(ls) if lab is not None else None)


def load_student(cfg: Config, path: str | Path) -> HPMPretrainModel:
    """The student of ``cfg``'s pre-training (:func:`medhpm.pretrain.trainer.build_pretrain_model`) with the
    weights of a ``student_stepNNNNNNN.safetensors`` snapshot, in eval mode; every key must match."""
    from safetensors.torch import load_file

    from medhpm.pretrain.trainer import build_pretrain_model

    model = build_pretrain_model(cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@torch.no_grad()
def heldout_reconstruction(
    model: HPMPretrainModel, cfg: Config, images: list[str], crops: int = 4, seed: int = 0
) -> dict:
    """The mean reconstruction loss (``L_rec``: MSE of the masked patches against their per-patch
    normalised targets) of ``model`` on ``crops`` random crops of each scan of ``images``, each crop masked
    at random at ``pretrain.mask_ratio``; crops and masks drawn from ``seed`` and the scan's index. Returns
    ``loss_rec`` (the mean over all crops), ``per_scan`` (each scan's mean), ``crops`` and ``scans``."""
    was = model.training
    model.eval()
    per_scan = []
    for i, image in enumerate(images):
        x, _ = random_crops(cfg.data, image, None, crops, seed + 7919 * i)
        g = torch.Generator().manual_seed(seed + 7919 * i)
        mask = random_mask(x.shape[0], model.encoder.num_patches, cfg.pretrain.mask_ratio, generator=g)
        out = model(x, mask)
        per_scan.append(float(out["per_patch_loss"].float().mean()))
    model.train(was)
    return {
        "loss_rec": float(np.mean(per_scan)),
        "per_scan": per_scan,
        "crops": crops,
        "scans": len(images),
        "seed": seed,
        "mask_ratio": cfg.pretrain.mask_ratio,
    }


def run_heldout(
    cfg: Config,
    dataset: str | Path,
    student: str | Path,
    out_json: str | Path,
    split: str = "test",
    crops: int = 4,
    seed: int = 0,
) -> dict:
    """:func:`heldout_reconstruction` of the student snapshot ``student`` on the ``split`` scans of
    ``dataset`` (a datalist), written to ``out_json``; a finished one is read back, not recomputed."""
    import json
    import time

    from medhpm.data.datalist import load_datalist
    from medhpm.runtime.files import atomic_write_text

    out_json = Path(out_json)
    if out_json.exists():
        return json.loads(out_json.read_text())
    t0 = time.time()
    entries = load_datalist(Path(dataset), format=cfg.data.format, split=cfg.data.split).get(split, [])
    if not entries:
        raise ValueError(f"{dataset} has no {split} scans to measure the held-out reconstruction loss on")
    res = heldout_reconstruction(load_student(cfg, student), cfg, [e["image"] for e in entries], crops, seed)
    res.update(
        student=str(student), split=split, cases=[e.get("case") for e in entries], seconds=round(time.time() - t0, 2)
    )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_json, json.dumps(res, indent=2))
    return res
