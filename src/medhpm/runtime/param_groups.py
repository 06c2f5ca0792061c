"""Optimizer parameter groups: layer-wise lr decay for fine-tuning, plain weight-decay split for pre-training.

Layer-wise lr decay (docs/method.md, "Transfer to UNETR"; as BEiT / MAE fine-tuning): with ``L`` encoder blocks,
the patch embedding and the position embedding get layer id 0, block ``k`` (0-based) gets id ``k + 1``, and
everything else (the encoder's final norm, the UNETR decoder) gets id ``L + 1`` (13 for ViT-B).
A parameter's lr is ``lr * layer_decay ** (L + 1 - id)``: the decoder trains at the full lr, the patch
embedding at ``0.75 ** 13 ~ 0.024`` of it.

No weight decay on biases, 1-D parameters (norm weights), position embeddings and tokens (class / mask).
Parameters with ``requires_grad=False`` (e.g. a frozen sin-cos position embedding) are left out.
Each group carries ``lr_scale`` so a scheduler sets ``group["lr"] = lr_t * group["lr_scale"]`` per step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from medhpm.models.vit import ViTEncoder

__all__ = ["param_groups_layer_decay", "param_groups_weight_decay", "layer_id_for", "NO_WEIGHT_DECAY"]

# substrings of a parameter's own name (after the last dot) that exclude it from weight decay
NO_WEIGHT_DECAY: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token")


def _no_decay(name: str, param: nn.Parameter, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name.endswith(".bias") or any(p in leaf for p in patterns)


def _find_encoder(model: nn.Module) -> tuple[str, ViTEncoder]:
    """The (prefix, module) of the first ViTEncoder in ``model`` (``""`` when model is one)."""
    for name, module in model.named_modules():
        if isinstance(module, ViTEncoder):
            return (name + "." if name else ""), module
    raise ValueError(
        f"Layer-wise lr decay needs a model containing a medhpm ViTEncoder (e.g. UNETR); "
        f"{type(model).__name__} has none."
    )


def layer_id_for(name: str, prefix: str, depth: int) -> int:
    """Layer id of parameter ``name`` (docs/method.md, "Transfer to UNETR") for an encoder at ``prefix`` with ``depth`` blocks."""
    if name.startswith(prefix):
        rel = name[len(prefix) :]
        if rel.startswith("patch_embed.") or rel in ("pos_embed", "cls_token", "mask_token"):
            return 0
        match = re.match(r"blocks\.(\d+)\.", rel)
        if match:
            return int(match.group(1)) + 1
    return depth + 1  # final norm, decoder, heads


def param_groups_layer_decay(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 0.75,
    no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY,
) -> list[dict]:
    """Parameter groups with layer-wise lr decay for fine-tuning.

    Args:
        model: a UNETR (or any module containing one :class:`ViTEncoder`, or the encoder itself).
        lr: base learning rate (of the decoder, id ``depth + 1``).
        weight_decay: AdamW weight decay of the decayed parameters.
        layer_decay: per-layer lr factor in (0, 1]; 1 disables the decay.
        no_weight_decay: substrings of parameter leaf names without weight decay (biases and 1-D
            parameters are always excluded).
    Returns:
        One dict per ``(layer_id, decay / no_decay)``, sorted by layer id, each with ``params``, ``lr``
        (``lr * lr_scale``), ``lr_scale`` (``layer_decay ** (depth + 1 - layer_id)``), ``weight_decay``,
        ``layer_id``, ``name`` (e.g. ``"layer_3_decay"``) and ``param_names``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"lr must be positive and weight_decay non-negative, got lr={lr}, weight_decay={weight_decay}."
        )
    prefix, encoder = _find_encoder(model)
    depth = encoder.depth
    groups: dict[tuple[int, str], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_id_for(name, prefix, depth)
        kind = "no_decay" if _no_decay(name, param, no_weight_decay) else "decay"
        if (layer_id, kind) not in groups:
            scale = layer_decay ** (depth + 1 - layer_id)
            groups[(layer_id, kind)] = {
                "params": [],
                "param_names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if kind == "decay" else 0.0,
                "layer_id": layer_id,
                "name": f"layer_{layer_id}_{kind}",
            }
        groups[(layer_id, kind)]["params"].append(param)
        groups[(layer_id, kind)]["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def param_groups_weight_decay(
    model: nn.Module, lr: float, weight_decay: float, no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY
) -> list[dict]:
    """Two parameter groups for pre-training: ``"decay"`` and ``"no_decay"`` (biases, norms, position
    embeddings, mask / class tokens), both with ``lr_scale`` 1. Frozen parameters are left out; an empty
    group is dropped."""
    if lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"lr must be positive and weight_decay non-negative, got lr={lr}, weight_decay={weight_decay}."
        )
    groups: dict[str, dict[str, Any]] = {
        kind: {
            "params": [],
            "param_names": [],
            "lr": lr,
            "lr_scale": 1.0,
            "name": kind,
            "weight_decay": weight_decay if kind == "decay" else 0.0,
        }
        for kind in ("decay", "no_decay")
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            kind = "no_decay" if _no_decay(name, param, no_weight_decay) else "decay"
            groups[kind]["params"].append(param)
            groups[kind]["param_names"].append(name)
    return [g for g in groups.values() if g["params"]]
