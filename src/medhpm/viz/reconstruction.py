"""``medhpm visualize pretrain``: the pre-training figure (``medhpm.pretrain.figure``) for a checkpoint, and
a check of its teacher on the user's own scan: does the teacher rank patches by how hard the student finds
them, and does it point at the organs?

The check (:func:`teacher_ranking_check`) draws random crops of the scan through the checkpoint's own
deterministic chain (seeded), masks each at random with the run's mask ratio, and takes the student's
measured per-patch reconstruction loss of the masked patches as the truth. The teacher scores the same
crops as the run queried it (``pretrain.teacher_view``); the student's own predicted losses are the
yardstick, and so is position alone (the mean loss at the same token position in the other crops,
``position_spearman``): a predictor that ranks no better than that has learned little beyond where a patch
sits in the crop. Reported: Spearman's rank correlation and pair accuracy of each against the truth
(``medhpm.pretrain.diagnostics``), and with a label map the organ share of the top-scored half of the
masked patches against that of all patches (the lift).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medhpm.config import from_dict
from medhpm.data.headers import check_headers
from medhpm.pretrain.diagnostics import (
    organ_lift,
    pairwise_order_accuracy,
    patches_with_organ,
    position_baseline,
    rank_correlation,
)
from medhpm.pretrain.figure import figure_crop, reconstruction_figure
from medhpm.pretrain.heldout import random_crops
from medhpm.pretrain.masking import curriculum_alpha, random_mask
from medhpm.pretrain.model import HPMPretrainModel
from medhpm.pretrain.step import teacher_scores, teacher_views_used
from medhpm.runtime.checkpoint import CheckpointError, load_checkpoint
from medhpm.runtime.files import atomic_write_text, refuse_overwriting_inputs


def _load(ckpt):
    state = load_checkpoint(
        ckpt, stage="pretrain", keys=("config", "model_args", "model", "epoch", "model_args.pretrain_model")
    )
    cfg = from_dict(state["config"])
    model = HPMPretrainModel.from_config(state["model_args"]["pretrain_model"])
    model.load_state_dict(state["model"])
    teacher = None
    if state.get("teacher") is not None:
        teacher = HPMPretrainModel.from_config(state["model_args"]["pretrain_model"])
        teacher.load_state_dict(state["teacher"], strict=False)  # the teacher carries no reconstructor
        teacher.eval()
    return state, cfg, model, teacher


def visualize_pretrain_checkpoint(
    ckpt, image, out_png, seed: int = 0, label=None, crops: int = 16, json_out=None
) -> tuple[Path, dict | None]:
    """Figure for a pre-training checkpoint on a scan (the chain stored in the checkpoint, centre crop;
    HPM's mask from the teacher as the run queried it, with the checkpoint's alpha, else random), and, for
    a checkpoint with a teacher, :func:`teacher_ranking_check` on ``crops`` random crops (written to
    ``json_out`` when given). Returns the PNG's path and the check's figures (None without a teacher).

    Everything that can be refused is refused before any voxel is read: an output that would replace an
    input, ``--json`` or ``--label`` for a checkpoint without a teacher, a label map off the scan's grid."""
    outs = [out_png] + ([json_out] if json_out is not None else [])
    refuse_overwriting_inputs(
        outs, [ckpt, image] + ([label] if label is not None else []), hint="choose another output path"
    )
    if json_out is not None and Path(json_out).resolve() == Path(out_png).resolve():
        raise ValueError(f"--json {json_out} is the figure's own path; name another file")
    if crops < 1:
        raise ValueError(f"--crops must be at least 1, got {crops}")
    state, cfg, model, teacher = _load(ckpt)
    p = cfg.pretrain
    if teacher is None and (json_out is not None or label is not None):
        raise CheckpointError(
            f"{ckpt} holds no EMA teacher (method {p.method}): the teacher check (--json, --label) needs a "
            "checkpoint of an hpm pre-training; nothing was written"
        )
    if label is not None:
        check_headers([{"image": str(image), "label": str(label)}], what="given")
    view, views = p.teacher_view, teacher_views_used(p.teacher_view, p.teacher_views, p.mask_ratio)
    alpha = curriculum_alpha(int(state["epoch"]), p.epochs, p.alpha_0, p.alpha_T)
    png = reconstruction_figure(
        model,
        teacher,
        figure_crop(cfg.data, image),
        p.mask_ratio,
        alpha,
        out_png,
        seed=seed,
        view=view,
        views=views,
        title=f"{Path(str(image)).name}: {p.method}, epoch {int(state['epoch']) + 1}",
    )
    if teacher is None:
        return png, None
    x, lab = random_crops(cfg.data, image, label, crops, seed)
    result = {
        "checkpoint": str(ckpt),
        "image": str(image),
        "label": None if label is None else str(label),
        "epoch": int(state["epoch"]) + 1,
        "method": p.method,
        "mask_ratio": p.mask_ratio,
        "seed": seed,
        **teacher_ranking_check(model, teacher, x, lab, p.mask_ratio, view, views, seed),
    }
    if json_out is not None:
        atomic_write_text(Path(json_out), json.dumps(_jsonable(result), indent=2) + "\n")
    return png, result


@torch.no_grad()
def teacher_ranking_check(
    student: HPMPretrainModel,
    teacher: HPMPretrainModel,
    x: torch.Tensor,
    label: torch.Tensor | None,
    mask_ratio: float,
    view: str,
    views: int,
    seed: int = 0,
) -> dict:
    """How well the teacher's scores (queried as ``view``/``views``) and the student's predicted losses
    order the student's measured losses of randomly masked patches of the crops ``x`` (n, 1, *roi); with
    ``label`` (n, 1, *roi) also the organ share of the teacher's top-scored half of the masked patches."""
    g = torch.Generator().manual_seed(seed)
    n_tok = student.encoder.num_patches
    mask = random_mask(x.shape[0], n_tok, mask_ratio, generator=g)  # (n, N)
    view_noise = torch.rand(x.shape[0], n_tok, generator=g) if view == "masked" else None
    was = student.training
    student.eval()
    out = student(x, mask)
    student.train(was)
    truth = out["per_patch_loss"]  # (n, M), ascending token order
    scores = teacher_scores(teacher, x, view, views, view_noise)  # (n, N)
    t_masked = torch.gather(scores, 1, out["ids_masked"])
    res: dict = {
        "teacher_view": view,
        "teacher_views": views,
        "crops": int(x.shape[0]),
        "masked_patches_per_crop": int(truth.shape[1]),
        "teacher_spearman": rank_correlation(t_masked, truth),
        "teacher_pair_accuracy": pairwise_order_accuracy(t_masked, truth),
    }
    if out["lp"] is not None:
        res["student_spearman"] = rank_correlation(out["lp"], truth)
        res["student_pair_accuracy"] = pairwise_order_accuracy(out["lp"], truth)
    if x.shape[0] >= 2:  # the yardstick of position alone (diagnostics.position_baseline)
        res["position_spearman"] = rank_correlation(position_baseline(out["ids_masked"], truth, n_tok), truth)
    if label is not None:
        res.update(organ_lift(scores, patches_with_organ(label, student.patch_size), mask))
    return res


def _jsonable(d: dict) -> dict:
    """NaN as null (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


__all__ = ["visualize_pretrain_checkpoint", "random_crops", "teacher_ranking_check"]
