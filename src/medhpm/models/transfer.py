"""Map encoder weights of every supported layout onto a :class:`ViTEncoder` (or the encoder of a UNETR).

The layouts themselves (detection, renaming, 2D inflation) are :mod:`medhpm.models.layouts`; this module
checks the renamed weights against the target and loads them, and is pure state-dict work (:func:`load_encoder_state` on a dict in memory); reading the files
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

import torch
from torch import nn

from medhpm.models.layouts import (
    RENAMERS,
    EncoderSource,
    interpolate_pos_embed_3d,
    strip_wrappers,
    detect_source_format,
    encoder_source,
    inflate_patch_embed_2d,
    inflate_pos_embed_2d,
)
from medhpm.models.vit import PRESETS, ViTEncoder

__all__ = [
    "LoadReport",
    "EncoderSource",
    "encoder_source",
    "load_encoder_state",
    "detect_source_format",
    "inflate_patch_embed_2d",
    "inflate_pos_embed_2d",
]

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
    src.state = strip_wrappers(src.state)
    non_float = _drop_non_float(src)
    fmt = _source_format(src)
    report = LoadReport(source=src.label, source_format=src.container or fmt, notes=src.notes)
    report.ignored += non_float
    _check_recorded_config(src, enc, fmt, report)
    mapped = RENAMERS[fmt](src, enc, report.converted)
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
            mapped["pos_embed"] = (interpolate_pos_embed_3d(pe, grid, enc.grid_size), key)
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
