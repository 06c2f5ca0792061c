"""Pre-training numerics: masks (random / hard patches), losses, the EMA teacher."""

from medhpm.pretrain.ema import EMATeacher, ema_update, momentum_at, unwrap_model
from medhpm.pretrain.losses import absolute_loss, normalize_patches, ranking_loss, reconstruction_loss
from medhpm.pretrain.masking import curriculum_alpha, hard_patch_mask, num_masked, num_visible, random_mask

__all__ = [
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
    "unwrap_model",
]
