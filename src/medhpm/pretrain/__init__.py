"""Pre-training: the HPM model (student), masks (random / hard patches), losses, the EMA teacher, the trainer."""

from medhpm.pretrain.ema import EMATeacher, ema_update, momentum_at
from medhpm.pretrain.losses import absolute_loss, normalize_patches, ranking_loss, reconstruction_loss
from medhpm.pretrain.model import HPMPretrainModel, mask_to_ids
from medhpm.pretrain.masking import curriculum_alpha, hard_patch_mask, num_masked, num_visible, random_mask

__all__ = [
    "HPMPretrainModel",
    "mask_to_ids",
    "ranking_loss",
    "absolute_loss",
    "reconstruction_loss",
    "normalize_patches",
    "hard_patch_mask",
    "random_mask",
    "num_masked",
    "num_visible",
    "curriculum_alpha",
    "EMATeacher",
    "ema_update",
    "momentum_at",
]
