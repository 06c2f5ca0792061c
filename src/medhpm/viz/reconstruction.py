"""``medhpm visualize pretrain``: the pre-training figure (``medhpm.pretrain.figure``) for a checkpoint."""

from __future__ import annotations

from pathlib import Path

from medhpm.config import from_dict
from medhpm.pretrain.figure import figure_crop, reconstruction_figure
from medhpm.pretrain.masking import curriculum_alpha
from medhpm.pretrain.model import HPMPretrainModel
from medhpm.runtime.checkpoint import load_checkpoint
from medhpm.runtime.files import refuse_overwriting_inputs


def visualize_pretrain_checkpoint(ckpt, image, out_png, seed: int = 0) -> Path:
    """Figure for a pre-training checkpoint on a scan: the chain stored in the checkpoint, centre crop.

    The mask is HPM's (teacher difficulty, the checkpoint's alpha) when the checkpoint has a teacher,
    else random.
    """
    refuse_overwriting_inputs([out_png], [ckpt, image], hint="choose another PNG path with -o")
    state = load_checkpoint(ckpt, stage="pretrain", keys=("config", "model_args", "model", "epoch",
                                                          "model_args.pretrain_model"))
    cfg = from_dict(state["config"])
    model = HPMPretrainModel.from_config(state["model_args"]["pretrain_model"])
    model.load_state_dict(state["model"])
    teacher = None
    if state.get("teacher") is not None:
        teacher = HPMPretrainModel.from_config(state["model_args"]["pretrain_model"])
        teacher.load_state_dict(state["teacher"], strict=False)  # the teacher carries no reconstructor
        teacher.eval()
    p = cfg.pretrain
    alpha = curriculum_alpha(int(state["epoch"]), p.epochs, p.alpha_0, p.alpha_T)
    return reconstruction_figure(
        model, teacher, figure_crop(cfg.data, image), p.mask_ratio, alpha, out_png, seed=seed,
        title=f"{Path(str(image)).name}: {p.method}, epoch {int(state['epoch']) + 1}",
    )
