"""Encoder state dicts as other projects lay them out, renamed into ours: which layout a state dict has
(:func:`detect_source_format`), the dict and what it records (:class:`EncoderSource`), one renamer per layout
(ours, MONAI, SelfMedMAE, timm 2D) and the inflation of 2D weights to 3D. The loader that checks and loads
the renamed weights is :mod:`medhpm.models.transfer`; the layouts are described there."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F

from medhpm.models.vit import Block, ViTEncoder

# container prefixes added by DistributedDataParallel and torch.compile; they never carry meaning
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------------
# format detection
# ----------------------------------------------------------------------------------------------------
def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def detect_source_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a flat state dict.

    Returns one of ``"monai"`` (``vit.patch_embedding.*`` or ``patch_embedding.*``), ``"selfmedmae"``
    (``encoder_pos_embed`` or ``encoder.cls_token``), ``"medhpm"`` (3D ``patch_embed.proj`` at the root or
    under ``encoder.``), ``"timm-2d"`` (2D ``patch_embed.proj``) or ``"unknown"``. ``module.`` and
    ``_orig_mod.`` prefixes are ignored.
    """
    state = strip_wrappers(state_dict)
    keys = set(state)
    if any(k.startswith(("vit.patch_embedding.", "patch_embedding.")) for k in keys):
        return "monai"
    if "encoder_pos_embed" in keys or "encoder.cls_token" in keys:
        return "selfmedmae"
    for key, layouts in (
        ("encoder.patch_embed.proj.weight", {5: "medhpm"}),
        ("patch_embed.proj.weight", {5: "medhpm", 4: "timm-2d"}),
    ):
        if key in keys and torch.is_tensor(state[key]):
            return layouts.get(state[key].dim(), "unknown")
    return "unknown"


# ----------------------------------------------------------------------------------------------------
# inflation of 2D weights
# ----------------------------------------------------------------------------------------------------
def inflate_patch_embed_2d(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """2D patch projection ``(D, C_2d, P, P)`` -> 3D ``(D, in_chans, P, P, P)``.

    The colour channels are summed (a CT voxel plays the role of a grey pixel, R = G = B) and the sum is
    shared equally by the ``in_chans`` input channels; the kernel is spread uniformly over depth (divided by
    P). A volume that is constant along depth (and across channels) therefore gives exactly the response
    the 2D kernel gives to the corresponding grey image: ``sum_{c,h,w} W2d[:, c, h, w] * x[h, w]``.
    """
    if weight.dim() != 4:
        raise ValueError(f"a 2D patch projection has shape (D, C, P, P), got {tuple(weight.shape)}.")
    p = weight.shape[-1]
    grey = weight.sum(dim=1, keepdim=True) / in_chans  # (D, 1, P, P)
    grey = grey.expand(-1, in_chans, -1, -1)  # (D, in_chans, P, P)
    return (grey.unsqueeze(-1).expand(-1, -1, -1, -1, p) / p).contiguous()  # (D, in_chans, P, P, P)


def inflate_pos_embed_2d(pos_embed: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, int]:
    """2D position embedding ``(1, T, D)`` (with ``T - s*s`` prefix tokens, e.g. cls) -> ``(1, N, D)``.

    The prefix tokens are dropped; the ``s x s`` grid is resized bicubically to ``(Gh, Gw)`` and repeated
    over the ``Gd`` depth positions, in the package's token order ``(ih*Gw + iw)*Gd + id``. The 2D
    embedding carries no depth information: every slice starts with the same values and the fine-tuning
    (learnable) position embedding has to learn depth.

    Returns:
        ``(pos_embed_3d, n_prefix_dropped)``.
    """
    t, d = pos_embed.shape[-2:]
    for n_prefix in range(0, 9):  # cls, distillation and register tokens precede the grid in timm
        s = math.isqrt(t - n_prefix)
        if s * s == t - n_prefix:
            break
    else:
        raise ValueError(f"a 2D position embedding of {t} tokens does not hold a square grid.")
    gh, gw, gd = (int(g) for g in grid)
    pe = pos_embed.reshape(t, d)[n_prefix:].float()  # (s*s, D)
    pe = pe.reshape(1, s, s, d).permute(0, 3, 1, 2)  # (1, D, s, s)
    if (s, s) != (gh, gw):
        pe = F.interpolate(pe, size=(gh, gw), mode="bicubic", align_corners=False)  # (1, D, Gh, Gw)
    pe = pe.unsqueeze(-1).expand(-1, -1, -1, -1, gd)  # (1, D, Gh, Gw, Gd)
    return pe.permute(0, 2, 3, 4, 1).reshape(1, gh * gw * gd, d).to(pos_embed.dtype), n_prefix


def interpolate_pos_embed_3d(pe: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """``(1, Ns, D)`` on ``src_grid`` -> ``(1, Nd, D)`` on ``dst_grid``, trilinear, package token order."""
    d = pe.shape[-1]
    grid = pe.reshape(1, *src_grid, d).permute(0, 4, 1, 2, 3).float()  # (1, D, Gh, Gw, Gd)
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, -1, d).to(pe.dtype)


# ----------------------------------------------------------------------------------------------------
# the source: a state dict, where it came from, what it records about its encoder
# ----------------------------------------------------------------------------------------------------
@dataclass
class EncoderSource:
    """A state dict on its way into an encoder (``medhpm.runtime.weights`` builds one from a file)."""

    label: str  # the file (or "<state dict>"), named in every error
    container: str | None  # "medhpm-pretrain", "medhpm-finetune", "medhpm-safetensors" or None (plain state dict)
    state: dict[str, torch.Tensor]
    encoder_args: dict | None = None  # the encoder config the file records, if any
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def encoder_source(obj: Mapping, label: str = "<state dict>", use_teacher: bool = False) -> EncoderSource:
    """Find the encoder's state dict in a loaded checkpoint or state dict: our pre-training checkpoint
    (``model``, or ``teacher`` when ``use_teacher``), a trainer's ``state_dict`` / ``model`` entry, or the
    dict itself."""
    if "model" in obj and "model_args" in obj:  # our pre-training (or fine-tuning) checkpoint
        which = "teacher" if use_teacher else "model"
        state = obj.get(which)
        if state is None and obj.get("stage") == "finetune":
            raise ValueError(
                f"{label} is a fine-tuning checkpoint: it holds the fine-tuned UNETR, no EMA teacher. Load it "
                "without --teacher (use_teacher), or give the pre-training run."
            )
        if state is None:
            raise ValueError(
                f"{label} has no EMA teacher weights ('teacher' is empty): the pre-training ran without a "
                "teacher (e.g. the MAE baseline). Load the student instead (use_teacher=False)."
            )
        args = obj["model_args"].get("encoder") if isinstance(obj["model_args"], Mapping) else None
        kind = "medhpm-finetune" if obj.get("stage") == "finetune" else "medhpm-pretrain"
        src = EncoderSource(label, kind, dict(state), encoder_args=args)
        if use_teacher:
            src.notes.append("weights of the EMA teacher (use_teacher=True), not of the student")
        return src
    if use_teacher:
        raise ValueError(
            f"use_teacher needs a medhpm pre-training checkpoint with 'model', 'teacher' and 'model_args' "
            f"entries; {label} is not one."
        )
    for container_key in ("state_dict", "model"):  # MONAI / SelfMedMAE trainers; MAE pre-training
        if isinstance(obj.get(container_key), Mapping):
            return EncoderSource(label, None, dict(obj[container_key]))
    return EncoderSource(label, None, dict(obj))


# ----------------------------------------------------------------------------------------------------
# renaming per format: each returns {our_key: (tensor, source_key)} and fills ignored / converted
# ----------------------------------------------------------------------------------------------------
_MONAI_BLOCK = [
    (re.compile(r"^blocks\.(\d+)\.attn\.out_proj\.(weight|bias)$"), r"blocks.\1.attn.proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.linear1\.(weight|bias)$"), r"blocks.\1.mlp.fc1.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.linear2\.(weight|bias)$"), r"blocks.\1.mlp.fc2.\2"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv)\.(weight|bias)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
]


def _rename_medhpm(src: EncoderSource, enc: ViTEncoder, conv: list[str]) -> dict:
    prefix = "encoder." if any(k.startswith("encoder.") for k in src.state) else ""
    out = {}
    for key, value in src.state.items():
        if key.startswith(prefix):
            out[key[len(prefix) :]] = (value, key)
        else:
            src.ignored.append(key)  # decoders, mask token, loss predictor, UNETR decoder
    return out


def _rename_monai(src: EncoderSource, enc: ViTEncoder, conv: list[str]) -> dict:
    prefix = "vit." if any(k.startswith("vit.") for k in src.state) else ""
    out: dict[str, tuple[Any, Optional[str]]] = {}
    for key, value in src.state.items():
        if not key.startswith(prefix):
            src.ignored.append(key)  # UNETR decoder: encoder1..4, decoder2..5, out
            continue
        k = key[len(prefix) :]
        if k in ("patch_embedding.patch_embeddings.weight", "patch_embedding.patch_embeddings.bias"):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = (value, key)
        elif k == "patch_embedding.patch_embeddings.1.weight":
            # proj_type="perceptron": Linear over patches flattened as (p1 p2 p3 c) -> a Conv3d kernel
            p, c = enc.patch_size, enc.in_chans
            if value.dim() == 2 and value.shape[1] == p**3 * c:
                value = value.reshape(value.shape[0], p, p, p, c).permute(0, 4, 1, 2, 3).contiguous()
                conv.append(
                    f"{key}: MONAI perceptron Linear {(value.shape[0], p**3 * c)} -> Conv3d kernel {tuple(value.shape)}"
                )
            out["patch_embed.proj.weight"] = (value, key)
        elif k == "patch_embedding.patch_embeddings.1.bias":
            out["patch_embed.proj.bias"] = (value, key)
        elif k == "patch_embedding.position_embeddings":
            out["pos_embed"] = (value, key)
        elif k == "cls_token":
            conv.append(f"{key}: class token dropped (the encoder has none)")
        elif re.match(r"^blocks\.\d+\.(norm_cross_attn|cross_attn)\.", k) or k.startswith("classification_head."):
            src.ignored.append(key)  # unused by a self-attention ViT; present in every MONAI TransformerBlock
        else:
            for pattern, repl in _MONAI_BLOCK:
                if pattern.match(k):
                    out[pattern.sub(repl, k)] = (value, key)
                    break
            else:
                out[k] = (value, key)  # unknown: becomes unexpected unless it happens to be one of ours
    # MONAI's default is qkv_bias=False; a zero bias gives the identical computation
    for i in range(enc.depth):
        ours = f"blocks.{i}.attn.qkv.bias"
        # a ModuleList's items are typed as Modules; the encoder's are Blocks
        if (
            f"blocks.{i}.attn.qkv.weight" in out
            and ours not in out
            and cast(Block, enc.blocks[i]).attn.qkv.bias is not None
        ):
            out[ours] = (torch.zeros_like(cast(Block, enc.blocks[i]).attn.qkv.bias), None)
            conv.append(f"{ours}: absent in the source (MONAI qkv_bias=False), set to zero (same computation)")
    src.notes.append(
        "MONAI's LayerNorm uses eps=1e-5 and medhpm's 1e-6: the tokens differ slightly (about 1e-4 at most) "
        "from those of the MONAI model with the same weights"
    )
    return out


def _rename_selfmedmae(src: EncoderSource, enc: ViTEncoder, conv: list[str]) -> dict:
    out = {}
    for key, value in src.state.items():
        if key == "encoder_pos_embed":  # MAE3D keeps the encoder's (sin-cos) embedding outside the encoder
            out["pos_embed"] = (value, key)
        elif key == "encoder.pos_embed":  # UNETR3D: (1, 1 + N, D), slot 0 belongs to the class token
            n = value.shape[1] - 1 if value.dim() == 3 else -1
            if n > 0 and (n == enc.num_patches or round(n ** (1 / 3)) ** 3 == n):
                value = value[:, 1:]
                conv.append(f"{key}: class-token slot dropped, {n + 1} -> {n} tokens")
            out["pos_embed"] = (value, key)
        elif key == "encoder.cls_token":
            conv.append(f"{key}: class token dropped (SelfMedMAE's encoder attends to it; medhpm's has none)")
        elif key.startswith("encoder.head."):
            src.ignored.append(key)
        elif key.startswith("encoder."):
            out[key[len("encoder.") :]] = (value, key)  # timm names: patch_embed.proj, blocks.*, norm
        else:
            src.ignored.append(key)  # decoder, decoder_pos_embed, encoder_to_decoder, mask_token
    return out


def _rename_timm2d(src: EncoderSource, enc: ViTEncoder, conv: list[str]) -> dict:
    out = {}
    for key, value in src.state.items():
        if key == "patch_embed.proj.weight" and value.dim() == 4:
            if value.shape[-1] == enc.patch_size:  # else left 2D: the shape check names both shapes
                inflated = inflate_patch_embed_2d(value, enc.in_chans)
                conv.append(
                    f"{key}: 2D {tuple(value.shape)} inflated to 3D {tuple(inflated.shape)} (RGB summed, "
                    f"spread over {enc.in_chans} channel(s), depth-averaged over {enc.patch_size} slices)"
                )
                value = inflated
            out["patch_embed.proj.weight"] = (value, key)
        elif key == "pos_embed" and value.dim() == 3:
            pe, n_prefix = inflate_pos_embed_2d(value, enc.grid_size)
            conv.append(
                f"{key}: 2D {tuple(value.shape)} -> 3D {tuple(pe.shape)} ({n_prefix} prefix token(s) dropped, "
                f"grid resized bicubically to {enc.grid_size[:2]}, repeated over {enc.grid_size[2]} depth slices)"
            )
            out["pos_embed"] = (pe, key)
        elif key in ("cls_token", "dist_token", "reg_token"):
            conv.append(f"{key}: dropped (the 3D encoder has no prefix tokens)")
        elif key.startswith(("decoder", "head.", "head_dist.", "fc_norm.", "pre_logits.")) or key == "mask_token":
            src.ignored.append(key)  # MAE decoder, classification heads
        else:
            out[key] = (value, key)  # blocks.* and norm.* share our names
    src.notes.append("2D ViT weights inflated to 3D: a starting point, not an equivalent 3D model")
    return out


RENAMERS = {
    "medhpm": _rename_medhpm,
    "monai": _rename_monai,
    "selfmedmae": _rename_selfmedmae,
    "timm-2d": _rename_timm2d,
}
