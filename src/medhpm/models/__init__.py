"""Models: the 3D ViT encoder (shared by pre-training and UNETR) and the HPM pre-training wrapper."""

from medhpm.models.hpm import HPMPretrainModel, mask_to_ids
from medhpm.models.vit import (
    PRESETS,
    ViTEncoder,
    build_encoder,
    patchify,
    sincos_pos_embed_3d,
    unpatchify,
)

__all__ = [
    "patchify",
    "unpatchify",
    "sincos_pos_embed_3d",
    "ViTEncoder",
    "build_encoder",
    "PRESETS",
    "HPMPretrainModel",
    "mask_to_ids",
]
