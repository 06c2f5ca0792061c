"""Map encoder weights of every supported layout onto a :class:`ViTEncoder` (or the encoder of a UNETR).

This module is pure state-dict work (:func:`load_encoder_state` on a dict in memory); reading the files
(``torch.load`` with ``weights_only=True`` through ``medhpm.runtime.checkpoint``, safetensors and the
sidecar's sha256) is ``medhpm.runtime.weights.load_encoder_weights``, which then calls it.

Sources (``source_format`` in the report):

``medhpm-pretrain``
    our pre-training checkpoint (``.pt``/``.pth``, ``torch.load``-able dict with ``"model"``,
    ``"teacher"``, ``"model_args"``): ``model["encoder.<key>"] -> <key>`` (``teacher`` when
    ``use_teacher``); decoder, mask token and loss-predictor keys are *ignored*, not missing.
``medhpm-finetune``
    our fine-tuning checkpoint (``"stage": "finetune"``): the UNETR's ``encoder.*`` keys; its decoder keys
    are *ignored*.
``medhpm-safetensors``
    our exported ``encoder.safetensors`` (keys exactly as in ``ViTEncoder``) with its ``encoder.json``
    sidecar next to it; the sidecar's ``sha256`` must match the weights file.
``medhpm``
    any other state dict in our naming: a bare encoder, a UNETR (``encoder.*``), an HPM model.
``monai``
    MONAI ``UNETR`` (``vit.*``) or ``ViT`` state dict, plain or under ``"state_dict"``.
``selfmedmae``
    SelfMedMAE ``MAE3D`` pre-training (``encoder.*`` + top-level ``encoder_pos_embed``) or ``UNETR3D``
    fine-tuning (``encoder.pos_embed`` with a leading class-token slot) checkpoints, under ``"state_dict"``,
    possibly with ``module.`` prefixes.
``timm-2d``
    a 2D ViT (timm or MAE layout; MAE pre-training checkpoints under ``"model"``) inflated to 3D.

Position embeddings of another token grid are interpolated (trilinear, as ``ViTEncoder.resize_pos_embed``)
and listed in ``LoadReport.converted``; every other shape mismatch is an error naming the file and the key.
Loading is strict: missing or unexpected encoder keys raise unless ``allow_partial=True``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from medhpm.models.vit import PRESETS, Block, ViTEncoder

__all__ = [
    "LoadReport",
    "EncoderSource",
    "encoder_source",
    "load_encoder_state",
    "detect_source_format",
    "inflate_patch_embed_2d",
    "inflate_pos_embed_2d",
]

# container prefixes added by DistributedDataParallel and torch.compile; they never carry meaning
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# encoder-config entries that change the computation; img_size is absent on purpose (interpolated)
_STRUCTURAL_ARGS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_encoder_state` (and so ``medhpm.runtime.weights.load_encoder_weights``) did.

    Attributes:
        source: the file (or ``"<state dict>"``) the weights came from.
        source_format: one of the formats listed in the module docstring.
        loaded: encoder keys (our names) that received a tensor.
        missing: encoder keys the source did not provide (kept at their current values).
        unexpected: source keys that look like encoder weights but have no place in this encoder.
        ignored: source keys that are known not to belong to the encoder (decoders, heads, mask tokens).
        converted: one line per tensor that was renamed with a change of layout, inflated, interpolated,
            filled or dropped.
        notes: remarks that do not concern one key (unverified sidecar, numerical differences).
    """

    source: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        """Human-readable summary: counts of loaded / missing / unexpected / ignored keys, then details."""
        lines = [
            f"Encoder weights from {self.source} ({self.source_format}): loaded {len(self.loaded)}, "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"ignored {len(self.ignored)} (not part of the encoder), converted {len(self.converted)}."
        ]
        if self.missing:
            lines.append("  missing: " + _short_list(self.missing))
        if self.unexpected:
            lines.append("  unexpected: " + _short_list(self.unexpected))
        lines += [f"  converted: {c}" for c in self.converted]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short_list(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------
# format detection
# ----------------------------------------------------------------------------------------------------
def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    state = _strip_wrappers(state_dict)
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


def _interpolate_pos_embed_3d(pe: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
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


_RENAMERS = {
    "medhpm": _rename_medhpm,
    "monai": _rename_monai,
    "selfmedmae": _rename_selfmedmae,
    "timm-2d": _rename_timm2d,
}


# ----------------------------------------------------------------------------------------------------
# describing encoders for error messages
# ----------------------------------------------------------------------------------------------------
def _preset_name(embed_dim: int | None, depth: int | None) -> str:
    for name, spec in PRESETS.items():
        if spec["embed_dim"] == embed_dim and (depth is None or spec["depth"] == depth):
            return name
    return "custom"


def _describe(embed_dim: int | None, depth: int | None, patch: int | None) -> str:
    """``"ViT-base/16 (width 768, 12 blocks)"``."""
    size = ", ".join(
        part for part in (f"width {embed_dim}" if embed_dim else "", f"{depth} blocks" if depth else "") if part
    )
    return f"ViT-{_preset_name(embed_dim, depth)}/{patch if patch else '?'}" + (f" ({size})" if size else "")


def _describe_source(mapped: dict, args: dict | None) -> str:
    if args:
        return _describe(args.get("embed_dim"), args.get("depth"), args.get("patch_size"))
    w = mapped.get("patch_embed.proj.weight", (None,))[0]
    blocks = [int(m.group(1)) for k in mapped if (m := re.match(r"^blocks\.(\d+)\.", k))]
    depth = max(blocks) + 1 if blocks else None
    if w is None or w.dim() < 3:
        return "an encoder of unknown size" if depth is None else _describe(None, depth, None)
    return _describe(w.shape[0], depth, w.shape[-1])


def _describe_target(enc: ViTEncoder) -> str:
    return _describe(enc.embed_dim, enc.depth, enc.patch_size)


# ----------------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------------
def _target_encoder(model: nn.Module) -> ViTEncoder:
    if isinstance(model, ViTEncoder):
        return model
    enc = getattr(model, "encoder", None)
    if isinstance(enc, ViTEncoder):
        return enc
    raise ValueError(
        f"loading encoder weights needs a ViTEncoder or a model with a ViTEncoder in .encoder (UNETR, "
        f"HPMPretrainModel), got {type(model).__name__}."
    )


def _source_grid(n_tokens: int, src: EncoderSource, enc: ViTEncoder, img_size, patch: int) -> tuple[int, int, int]:
    """Token grid of a source position embedding with ``n_tokens`` tokens."""
    roi = (src.encoder_args or {}).get("img_size") or img_size
    if roi is not None:
        roi = (roi,) * 3 if isinstance(roi, int) else tuple(int(r) for r in roi)
        grid = tuple(r // patch for r in roi)
        if math.prod(grid) == n_tokens:
            return grid
    if n_tokens == enc.num_patches:
        return enc.grid_size  # same count, assume the same grid
    side = round(n_tokens ** (1 / 3))
    if side**3 == n_tokens:
        return (side, side, side)
    raise ValueError(
        f"Cannot tell the token grid of pos_embed in {src.label}: {n_tokens} tokens is not a cube and the file "
        f"does not record its ROI. Pass img_size=<the ROI the checkpoint was trained with>."
    )


def load_encoder_state(
    unetr_or_encoder: nn.Module,
    source: EncoderSource | Mapping,
    use_teacher: bool = False,
    allow_partial: bool = False,
    img_size: int | Sequence[int] | None = None,
) -> LoadReport:
    """Load an in-memory state dict or checkpoint dict into the encoder of ``unetr_or_encoder`` (in place).

    Files are read by :func:`medhpm.runtime.weights.load_encoder_weights`, which then calls this.

    Args:
        unetr_or_encoder: a :class:`ViTEncoder`, or a model holding one in ``.encoder`` (UNETR, HPM model).
        source: an :class:`EncoderSource`, or a state dict / checkpoint dict (see :func:`encoder_source`).
        use_teacher: take the EMA teacher of a medhpm pre-training checkpoint dict instead of the student
            (only for a dict ``source``).
        allow_partial: load what matches and report the rest instead of raising on missing or unexpected
            encoder keys.
        img_size: the ROI ``(H, W, D)`` the SOURCE was trained with; only consulted when it does not
            record it (MONAI, SelfMedMAE) and its position embedding has another token count than this
            encoder's and is not a cube.
    Returns:
        A :class:`LoadReport`.
    Raises:
        ValueError: unknown layout, shape mismatch (source, key, both shapes, sizes of both encoders),
            encoder configuration mismatch, missing/unexpected keys when strict, or ``use_teacher``
            without a teacher.
    """
    enc = _target_encoder(unetr_or_encoder)
    src = source if isinstance(source, EncoderSource) else encoder_source(source, use_teacher=use_teacher)
    src.state = _strip_wrappers(src.state)
    non_float = _drop_non_float(src)
    fmt = _source_format(src)
    report = LoadReport(source=src.label, source_format=src.container or fmt, notes=src.notes)
    report.ignored += non_float
    _check_recorded_config(src, enc, fmt, report)
    mapped = _RENAMERS[fmt](src, enc, report.converted)
    report.ignored += src.ignored
    target = enc.state_dict()
    _fit_pos_embed(mapped, target, src, enc, img_size, report)
    _check_shapes(mapped, target, src, enc)
    _sort_keys(mapped, target, report)
    if (report.missing or report.unexpected) and not allow_partial:
        _refuse_partial(mapped, src, enc, report)
    with torch.no_grad():
        result = enc.load_state_dict({k: mapped[k][0] for k in report.loaded}, strict=False)
    assert not result.unexpected_keys  # every loaded key was checked against the target above
    return report


def _drop_non_float(src: EncoderSource) -> list[str]:
    """Remove (and return the names of) counters, integer buffers, metadata: never weights of the encoder."""
    non_float = [k for k, v in src.state.items() if not (torch.is_tensor(v) and v.is_floating_point())]
    for key in non_float:
        del src.state[key]
    return non_float


def _source_format(src: EncoderSource) -> str:
    """The layout of the source's keys; an unknown one, or a medhpm file holding foreign keys, is an error."""
    fmt = detect_source_format(src.state)
    if fmt == "unknown":
        raise ValueError(
            f"{src.label} is not a recognised encoder checkpoint: expected medhpm (patch_embed.proj / "
            f"encoder.patch_embed.proj), MONAI (vit.patch_embedding.*), SelfMedMAE (encoder_pos_embed, "
            f"encoder.cls_token) or 2D timm/MAE keys. First keys: {_short_list(sorted(src.state), 5)}."
        )
    if src.container is not None and fmt != "medhpm":
        raise ValueError(f"{src.label} is a {src.container} file but its keys look like {fmt}.")
    return fmt


def _check_recorded_config(src: EncoderSource, enc: ViTEncoder, fmt: str, report: LoadReport) -> None:
    """A configuration recorded in the file must match the model; num_heads cannot be read from shapes."""
    if src.encoder_args:
        mine = enc.config()
        diff = [
            f"{name}: file {src.encoder_args[name]!r}, model {mine[name]!r}"
            for name in _STRUCTURAL_ARGS
            if name in src.encoder_args and src.encoder_args[name] != mine[name]
        ]
        if diff:
            raise ValueError(
                f"{src.label} was trained with another encoder configuration ({'; '.join(diff)}): this checkpoint "
                f"is a {_describe_source({}, src.encoder_args)} encoder; the config asks for "
                f"{_describe_target(enc)}."
            )
    elif fmt != "medhpm":
        report.notes.append("the number of attention heads cannot be read from weights; it must match the source")


def _fit_pos_embed(
    mapped: dict, target: dict, src: EncoderSource, enc: ViTEncoder, img_size, report: LoadReport
) -> None:
    """A position embedding of another token grid is interpolated: the one shape change that is expected."""
    if "pos_embed" not in mapped:
        return
    pe, key = mapped["pos_embed"]
    want = target["pos_embed"].shape
    # a recorded ROI is checked even when the token counts agree: (2, 2, 4) and (4, 2, 2) grids differ
    recorded = bool((src.encoder_args or {}).get("img_size"))
    if pe.dim() == 3 and pe.shape[-1] == want[-1] and (pe.shape != want or recorded):
        src_patch = (src.encoder_args or {}).get("patch_size", enc.patch_size)
        grid = _source_grid(pe.shape[1], src, enc, img_size, src_patch)
        if tuple(grid) != tuple(enc.grid_size):
            mapped["pos_embed"] = (_interpolate_pos_embed_3d(pe, grid, enc.grid_size), key)
            report.converted.append(
                f"{key}: token grid {tuple(grid)} interpolated to {tuple(enc.grid_size)} (trilinear), "
                f"{tuple(pe.shape)} -> {tuple(want)}"
            )


def _check_shapes(mapped: dict, target: dict, src: EncoderSource, enc: ViTEncoder) -> None:
    """Raise on the first mismatch in the encoder's own order (patch embedding first): the most telling one."""
    bad = [k for k in target if k in mapped and mapped[k][0].shape != target[k].shape]
    bad.sort(key=lambda k: k == "pos_embed")  # the patch kernel names width and patch size at once
    if bad:
        value, key = mapped[bad[0]]
        more = f" ({len(bad) - 1} more keys differ)" if len(bad) > 1 else ""
        raise ValueError(
            f"Shape mismatch loading {src.label}: {key or bad[0]} has shape {tuple(value.shape)} but the model's "
            f"{bad[0]} has {tuple(target[bad[0]].shape)}{more}. This checkpoint is a "
            f"{_describe_source(mapped, src.encoder_args)} encoder; the config asks for {_describe_target(enc)}."
        )


def _sort_keys(mapped: dict, target: dict, report: LoadReport) -> None:
    """Fill the report's loaded, missing and unexpected keys."""
    report.loaded = [k for k in target if k in mapped]
    report.missing = [k for k in target if k not in mapped]
    report.unexpected = [key or ours for ours, (_, key) in mapped.items() if ours not in target]


def _refuse_partial(mapped: dict, src: EncoderSource, enc: ViTEncoder, report: LoadReport) -> None:
    parts = []
    if report.missing:
        parts.append(f"the model's encoder keys {_short_list(report.missing)} are missing from it")
    if report.unexpected:
        parts.append(f"its keys {_short_list(report.unexpected)} have no place in this encoder")
    raise ValueError(
        f"Refusing a partial load from {src.label}: {' and '.join(parts)}. This checkpoint is a "
        f"{_describe_source(mapped, src.encoder_args)} encoder; the config asks for {_describe_target(enc)}. "
        "Pass allow_partial=True to load the matching keys anyway."
    )
