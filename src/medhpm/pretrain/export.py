"""The encoder file format: :func:`export_encoder` writes a pre-training checkpoint's encoder (the student's
or the EMA teacher's) as safetensors with a JSON sidecar, and :func:`write_encoder_file` is the one writer of
that format (the export and the pre-training trainer's snapshots)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medhpm import __version__
from medhpm.runtime.checkpoint import CheckpointError, load_checkpoint
from medhpm.runtime.files import atomic_write_text, atomic_write_with, refuse_overwriting_inputs, sha256_file
from medhpm.runtime.weights import sidecar_path


def export_encoder(ckpt: str | Path, out: str | Path, use_teacher: bool = False, force: bool = False) -> Path:
    """Write the student's (or teacher's) encoder as safetensors plus a JSON sidecar with its metadata.

    An existing ``out`` or sidecar is refused before the checkpoint is read (a fine-tuning run may have
    been initialised from it, and its sidecar records its sha256), unless ``force``."""
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    refuse_overwriting_inputs([out, sidecar_path(out)], [ckpt], hint="choose another --out")
    there = [p for p in (out, sidecar_path(out)) if p.exists()]
    if there and not force:
        raise FileExistsError(
            f"{' and '.join(map(str, there))} already exist{'s' if len(there) == 1 else ''} (an "
            "encoder exported before); nothing was written. Name another -o, or pass --force "
            "to replace it"
        )
    state = load_checkpoint(
        ckpt,
        stage="pretrain",
        keys=(
            "model",
            "config",
            "model_args",
            "epoch",
            "config.model",
            "config.data",
            "config.pretrain",
            "model_args.encoder",
        ),
        purpose="export-encoder needs a pre-training checkpoint (final.pt of `medhpm pretrain`)",
    )
    key = "teacher" if use_teacher else "model"
    if state.get(key) is None:
        raise CheckpointError(f"{ckpt} holds no {key} weights (the teacher exists only for method hpm)")
    enc = {k[len("encoder.") :]: v.contiguous() for k, v in state[key].items() if k.startswith("encoder.")}
    step = state.get("step")
    return write_encoder_file(
        out,
        enc,
        state["config"],
        state["model_args"]["encoder"],
        state.get("transforms", {}),
        weights="teacher" if use_teacher else "student",
        epochs=int(state["epoch"]) + 1,
        step=None if step is None else int(step),
    )


def write_encoder_file(
    out: Path,
    encoder: dict[str, torch.Tensor],
    config: dict,
    encoder_args: dict,
    transforms: dict,
    *,
    weights: str,
    epochs: float,
    step: int | None,
) -> Path:
    """The one home of the encoder file format (:func:`export_encoder` and the trainer's snapshots):
    ``out`` (safetensors: the encoder's tensors, CPU, contiguous) and its JSON sidecar
    (``medhpm.runtime.weights.sidecar_path``) with what the weights were trained with and their sha256,
    which :func:`medhpm.runtime.weights.load_encoder_weights` checks. ``config`` is the run's config as a
    dict (``config.to_dict``). Each file is written atomically, the weights first: a sidecar always
    describes complete weights."""
    from safetensors.torch import save_file

    atomic_write_with(out, lambda tmp: save_file(encoder, str(tmp), metadata={"format": "pt"}))
    data = config["data"]
    sidecar = {
        "format": "medhpm-encoder",
        "package_version": __version__,
        "preset": config["model"]["preset"],
        "patch_size": config["model"]["patch_size"],
        "roi": data["roi"],
        "spacing": data["spacing"],
        "orientation": data["orientation"],
        "hu_window": [data["a_min"], data["a_max"]],
        "normalisation": {"clip": [data["a_min"], data["a_max"]], "scale_to": [data["b_min"], data["b_max"]]},
        "method": config["pretrain"]["method"],
        "epochs": epochs,
        "step": step,
        "weights": weights,
        "encoder_args": encoder_args,
        "transforms": transforms,
        "sha256": sha256_file(out),
    }
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=2))
    return out
