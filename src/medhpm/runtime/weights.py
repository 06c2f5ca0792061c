"""Reading encoder weights from files, for fine-tuning's ``--init`` (``medhpm.models.transfer`` maps them).

``.safetensors``
    our exported encoder, checked against the ``sha256`` its ``encoder.json`` sidecar records; the
    sidecar also gives the encoder configuration the weights were trained with.
any other file
    read by :func:`medhpm.runtime.checkpoint.load_checkpoint` (``torch.load`` with ``weights_only=True``):
    our pre-training or fine-tuning checkpoint, or a foreign state dict (MONAI, SelfMedMAE, 2D timm / MAE).
a run folder
    its ``best.pt`` (a fine-tuning run's model), else ``last.pt``, else ``final.pt``
    (``medhpm.runtime.checkpoint.INIT_ORDER``).

Every error names the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from medhpm.models.transfer import EncoderSource, LoadReport, encoder_source, load_encoder_state
from medhpm.runtime.checkpoint import INIT_ORDER, CheckpointError, load_checkpoint, resolve_checkpoint
from medhpm.runtime.files import sha256_file

__all__ = ["load_encoder_weights", "read_encoder_source", "read_encoder_sidecar", "sidecar_path"]


def load_encoder_weights(
    unetr_or_encoder: nn.Module,
    source: str | Path | Mapping,
    use_teacher: bool = False,
    allow_partial: bool = False,
    img_size: int | Sequence[int] | None = None,
) -> LoadReport:
    """Load encoder weights from any supported source into ``unetr_or_encoder`` (in place).

    Args:
        unetr_or_encoder: a :class:`~medhpm.models.vit.ViTEncoder`, or a model holding one in ``.encoder``
            (UNETR, HPM model).
        source: a file (``.pt``/``.pth`` checkpoint or state dict, ``.safetensors`` export with its
            ``.json`` sidecar) or an in-memory state dict / checkpoint dict.
        use_teacher: take the EMA teacher of a medhpm pre-training checkpoint instead of the student.
        allow_partial: load what matches and report the rest instead of raising on missing or unexpected
            encoder keys.
        img_size: the ROI ``(H, W, D)`` the SOURCE was trained with; only consulted when the file does
            not record it (MONAI, SelfMedMAE) and its position embedding has another token count than
            this encoder's and is not a cube.
    Returns:
        A :class:`~medhpm.models.transfer.LoadReport`.
    Raises:
        CheckpointError: a missing, truncated, foreign or unsafe file.
        ValueError: unknown layout, shape mismatch (file, key, both shapes, sizes of both encoders),
            encoder configuration mismatch, sha256 mismatch, missing/unexpected keys when strict, or
            ``use_teacher`` without a teacher.
    """
    src = (
        encoder_source(source, use_teacher=use_teacher)
        if isinstance(source, Mapping)
        else read_encoder_source(source, use_teacher)
    )
    return load_encoder_state(unetr_or_encoder, src, allow_partial=allow_partial, img_size=img_size)


def read_encoder_source(path: str | Path, use_teacher: bool = False) -> EncoderSource:
    """The encoder weights a file holds, with what it records about them."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if use_teacher:
            raise ValueError(
                f"use_teacher asks for the EMA teacher, but {path} is an exported encoder that holds one set "
                "of weights; export the teacher instead or load the pre-training checkpoint."
            )
        return _read_safetensors(path)
    path = resolve_checkpoint(path, INIT_ORDER)  # a run folder: the file, named in the report and errors
    return encoder_source(load_checkpoint(path), label=str(path), use_teacher=use_teacher)


def sidecar_path(weights_path: str | Path) -> Path:
    """``.../encoder.safetensors`` -> ``.../encoder.json``."""
    return Path(weights_path).with_suffix(".json")


def read_encoder_sidecar(path: str | Path) -> dict:
    """Read the JSON sidecar of an exported encoder.

    Args:
        path: the sidecar itself (``encoder.json``) or the weights file next to it (``encoder.safetensors``).
    Returns:
        The parsed dict (preset, patch size, ROI, spacing, HU window, normalisation, method, epochs, package
        version, ``sha256`` of the weights file, ``encoder_args``).
    Raises:
        FileNotFoundError: no sidecar at that place.
        ValueError: the sidecar is not a JSON object.
    """
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"No encoder sidecar {side} (expected next to {path.name}).")
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Encoder sidecar {side} is not valid JSON: {err}.") from err
    if not isinstance(data, dict):
        raise ValueError(f"Encoder sidecar {side} must hold a JSON object, found {type(data).__name__}.")
    return data


def _read_safetensors(path: Path) -> EncoderSource:
    from safetensors.torch import load_file  # imported here: only this source needs it

    if not path.is_file():
        raise CheckpointError(f"encoder weights file {path} does not exist")
    notes, args = [], None
    side = sidecar_path(path)
    if side.is_file():
        meta = read_encoder_sidecar(side)
        expected = meta.get("sha256")
        if expected:
            actual = sha256_file(path)
            if actual.lower() != str(expected).lower():
                raise ValueError(
                    f"{path} does not match its sidecar {side.name}: sha256 is {actual}, the sidecar records "
                    f"{expected}. The weights file was changed or belongs to another export."
                )
        else:
            notes.append(f"sidecar {side.name} records no sha256; {path.name} was not verified")
        args = meta.get("encoder_args")
    else:
        notes.append(f"no sidecar {side.name} next to {path.name}: sha256 not verified, encoder config unknown")
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"Encoder weights file {path} is not a readable safetensors file: {first}") from None
    return EncoderSource(str(path), "medhpm-safetensors", state, encoder_args=args, notes=notes)
