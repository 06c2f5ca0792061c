"""Networks: the 3D ViT encoder (shared by pre-training and UNETR) and UNETR. The HPM pre-training model
lives in ``medhpm.pretrain.model``, beside its losses."""

from medhpm.models.vit import PRESETS, ViTEncoder, build_encoder, patchify, sincos_pos_embed_3d, unpatchify

__all__ = ["patchify", "unpatchify", "sincos_pos_embed_3d", "ViTEncoder", "build_encoder", "PRESETS"]
