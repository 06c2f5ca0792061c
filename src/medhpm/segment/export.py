"""A fine-tuned model leaves the project: a MONAI bundle, an ONNX model or a TorchScript model that run
without medhpm and give the label maps of ``medhpm predict`` (docs/export.md).

:func:`export_model` reads a fine-tuning checkpoint (:func:`medhpm.segment.predict.load_model`), traces the
network at the fixed ROI (input ``(N, 1, *roi)`` float32 after preprocessing, output class logits
``(N, C, *roi)``, ``N`` free), checks the exported network against the PyTorch one on a seeded ROI of
realistic intensities, and writes one folder:

* ``bundle``: the MONAI bundle layout (``configs/metadata.json``, ``configs/inference.json``,
  ``models/model.ts``, ``docs/README.md``, ``LICENSE`` when given). ``inference.json`` rebuilds the
  predictor's chain with MONAI's own transforms (``LoadImaged``, ``Orientationd``, ``Spacingd``,
  ``ScaleIntensityRanged``, ``CropForegroundd``, ``SpatialPadd``), runs ``SlidingWindowInferer`` with the
  checkpoint's ROI, overlap and blending, takes the argmax and inverts the chain with ``Invertd`` (nearest),
  as :class:`~medhpm.segment.predict.Predictor` does; ``python -m monai.bundle run`` runs it.
* ``onnx``: ``model.onnx`` (``torch.onnx``, checked with ``onnx.checker``, run here by ``onnxruntime``) and
  ``export.json``, the preprocessing and sliding-window settings a user's own pipeline needs.
* ``torchscript``: ``model.ts`` (traced; ``torch.jit.load`` alone loads it, ``export.json`` rides inside as
  an extra file) and the same ``export.json`` beside it.

Every export records the medhpm version, the checkpoint's path and sha256 and the full config it came from
(``export.json``; in a bundle, the ``medhpm`` entry of ``metadata.json``). The folder is written under a
temporary name beside the target and renamed at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from medhpm import __version__
from medhpm.config import Config, from_dict, to_dict
from medhpm.runtime.checkpoint import MODEL_ORDER, CheckpointError, load_checkpoint, resolve_checkpoint
from medhpm.runtime.files import atomic_write_text, sha256_file
from medhpm.segment.bundle import (
    BUNDLE_METADATA_SCHEMA,
    MONAI_SCHEMA_URL,
    bundle_inference,
    bundle_metadata,
    bundle_readme,
)
from medhpm.segment.predict import Predictor, load_model

__all__ = [
    "FORMATS",
    "ExportError",
    "export_model",
    "export_settings",
    "load_exported",
    "exported_predictor",
    "OnnxRuntimeNetwork",
    "ort_session_options",
    "BUNDLE_METADATA_SCHEMA",
    "MONAI_SCHEMA_URL",
]

FORMATS = {
    "bundle": "a MONAI bundle (configs/inference.json + models/model.ts) that `python -m monai.bundle run`, "
    "MONAI Label and the model zoo tools load, with the preprocessing, sliding window and inversion "
    "to the scan's geometry of `medhpm predict`",
    "onnx": "model.onnx (one ROI in, class logits out) for onnxruntime and other ONNX runtimes, with "
    "export.json: the preprocessing and sliding-window settings to reproduce `medhpm predict`",
    "torchscript": "model.ts (one ROI in, class logits out) that torch.jit.load alone loads, with the same export.json",
}
EXPORT_JSON = "export.json"
EXPORT_FORMAT_VERSION = 1
# the largest |exported - PyTorch| logit difference accepted, relative to max(1, max |PyTorch logit|)
TOLERANCE = 1e-4
ONNX_OPSET = 18
_FINETUNE_ONLY = (
    "export-model needs a fine-tuning checkpoint (best.pt or final.pt of `medhpm finetune`); "
    "a pre-training checkpoint holds no segmentation head"
)


class ExportError(ValueError):
    """An export that cannot be made; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------- reading
def _read_checkpoint(ckpt: Path) -> dict:
    """The fine-tuning checkpoint at ``ckpt``; an encoder file or a pre-training checkpoint is refused with
    a sentence naming the file."""
    if ckpt.suffix == ".safetensors" or (ckpt.suffix == ".json" and ckpt.with_suffix(".safetensors").exists()):
        raise ExportError(
            f"{ckpt} is an encoder file (`medhpm export-encoder`: the pre-trained ViT without a "
            "segmentation head); export-model needs a fine-tuning checkpoint: fine-tune first "
            "(`medhpm finetune --init <this file>`), then export its best.pt"
        )
    try:
        return load_checkpoint(
            ckpt,
            stage="finetune",
            keys=("config", "model_args", "model"),
            purpose=_FINETUNE_ONLY,
            folder_order=MODEL_ORDER,
        )
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def _pretraining(state: dict, cfg: Config) -> dict:
    """What the encoder was pre-trained with: the initial weights file of the fine-tuning run and its
    method (read from that file when it is still there, else the fine-tuning config's pretrain.method)."""
    args = state.get("model_args") or {}
    init = str(args.get("init") or "none")
    if args.get("architecture") == "dynunet":
        return {"method": "none", "init": "none", "note": "DynUNet, trained from scratch"}
    if init in ("", "none"):
        return {"method": "none", "init": "none", "note": "UNETR trained from scratch (--init none)"}
    method, source = None, "the initial weights file"
    path = Path(init)
    with contextlib.suppress(Exception):  # a file that moved or is foreign: fall back to the config
        if path.suffix == ".safetensors":
            from medhpm.runtime.weights import read_encoder_sidecar

            method = read_encoder_sidecar(path).get("method")
        elif path.is_file():
            method = (load_checkpoint(path).get("config") or {}).get("pretrain", {}).get("method")
    if not method:
        method, source = cfg.pretrain.method, "the fine-tuning config (pretrain.method)"
    return {"method": str(method), "init": init, "method_from": source}


# ---------------------------------------------------------------------------------------------- settings
def export_settings(cfg: Config, classes: dict[int, str], architecture: str, num_classes: int) -> dict:
    """The preprocessing, network and sliding-window settings that reproduce ``medhpm predict`` (the
    ``export.json`` of every format; plain JSON, no medhpm needed to read it)."""
    d, inf = cfg.data, cfg.inference
    roi = [int(r) for r in d.roi]
    names = {0: "background", **{int(k): v for k, v in classes.items()}}
    return {
        "preprocessing": {
            "steps": [
                "load the scan (NIfTI, or a DICOM series folder) channel first, float32, world affine in RAS",
                f"reorient to {d.orientation}",
                f"resample to {list(map(float, d.spacing))} mm (bilinear)",
                f"clip HU to [{d.a_min}, {d.a_max}] and scale linearly to [{d.b_min}, {d.b_max}]",
                *([f"crop to the bounding box of voxels > {d.b_min} (after scaling)"] if d.crop_foreground else []),
                f"pad each axis below {roi} symmetrically with {d.b_min}",
            ],
            "orientation": d.orientation,
            "spacing_mm": [float(s) for s in d.spacing],
            "spacing_interpolation": "bilinear",
            "hu_window": [float(d.a_min), float(d.a_max)],
            "scaled_range": [float(d.b_min), float(d.b_max)],
            "clip": True,
            "crop_foreground": bool(d.crop_foreground),
            "foreground_threshold": float(d.b_min),
            "pad_to": roi,
            "pad_value": float(d.b_min),
        },
        "network": {
            "architecture": architecture,
            "input": {"name": "image", "shape": ["N", int(cfg.model.in_chans), *roi], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["N", int(num_classes), *roi], "dtype": "float32"},
        },
        "sliding_window": {
            "roi": roi,
            "overlap": float(inf.overlap),
            "blend": inf.blend,
            "sw_batch_size": int(inf.sw_batch_size),
            "padding": "constant 0 (the volume is already padded to the ROI)",
            "implementation": "monai.inferers.SlidingWindowInferer / sliding_window_inference",
        },
        "postprocessing": {
            "steps": [
                "argmax over the class channels in the preprocessed grid",
                "undo pad, crop, resampling and reorientation with nearest-neighbour interpolation "
                "(monai.transforms.Invertd), giving the scan's own shape and affine",
            ],
            "label_dtype": "uint8",
        },
        "labels": {str(k): v for k, v in sorted(names.items())},
    }


def _provenance(ckpt: Path, state: dict, cfg: Config, fmt: str) -> dict:
    return {
        "format": "medhpm-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "export_format": fmt,
        "medhpm_version": __version__,
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": sha256_file(ckpt),
        "checkpoint_medhpm_version": state.get("version"),
        "checkpoint_epoch": state.get("epoch"),
        "pretraining": _pretraining(state, cfg),
        "torch_version": torch.__version__,
        "config": to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------------- tracing
def _probe_input(cfg: Config, batch: int = 2) -> torch.Tensor:
    """A seeded ROI batch of intensities in the scaled range: what the network sees after preprocessing."""
    g = torch.Generator().manual_seed(0)
    d = cfg.data
    shape = (batch, int(cfg.model.in_chans), *(int(r) for r in d.roi))
    return d.b_min + (d.b_max - d.b_min) * torch.rand(shape, generator=g)


def _check_close(name: str, ckpt: Path, got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        raise ExportError(
            f"the {name} export of {ckpt} gives logits of shape {got.shape}, the PyTorch model "
            f"{ref.shape}; nothing was written. Try another --format"
        )
    diff = float(np.max(np.abs(got - ref)))
    bound = TOLERANCE * max(1.0, float(np.max(np.abs(ref))))
    if not diff <= bound:
        raise ExportError(
            f"the {name} export of {ckpt} differs from the PyTorch model by {diff:.3g} in the "
            f"logits (more than {bound:.3g}); nothing was written. Try another --format"
        )
    return diff


def _torchscript(model: torch.nn.Module, ckpt: Path, cfg: Config, path: Path, extra: dict) -> dict:
    x = _probe_input(cfg)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the shape checks are constant at a fixed ROI
        try:
            traced = torch.jit.trace(model, x[:1], check_trace=False)
        except Exception as e:
            raise ExportError(
                f"TorchScript cannot trace the network of {ckpt} at ROI {list(cfg.data.roi)} "
                f"({type(e).__name__}: {_first_line(e)}); nothing was written. Try --format onnx"
            ) from None
        traced = traced.eval()
        ref = model(x).numpy()
        torch.jit.save(traced, str(path), _extra_files={EXPORT_JSON: json.dumps(extra)})
        loaded = torch.jit.load(str(path), map_location="cpu")
        diff = _check_close("TorchScript", ckpt, loaded(x).numpy(), ref)
    return {"max_abs_logit_difference": diff, "checked_on": list(x.shape)}


class _TwoPassInstanceNorm(torch.nn.Module):
    """``nn.InstanceNorm*d`` (no running statistics) written out as mean, centred variance and scale with the
    statistics in float64, so that the ONNX graph holds Cast / ReduceMean / Sub / Mul instead of
    ``InstanceNormalization``: onnxruntime's CPU kernel of that operator is off by up to 5.6e-4 on a 48^3
    decoder map of |x| <= 11 (every optimisation level and thread count; docs/export.md). The same function
    as the module it replaces; the export's check compares against the unchanged PyTorch model."""

    def __init__(self, norm: torch.nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.eps = float(norm.eps)
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.ndim))
        xd = x.double()  # onnxruntime's float32 ReduceMean over a 48^3 map is no closer than its kernel
        d = xd - xd.mean(dims, keepdim=True)
        y = (d * torch.rsqrt((d * d).mean(dims, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _for_onnx(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose instance norms (those without running statistics) are
    :class:`_TwoPassInstanceNorm`."""
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
                setattr(module, child_name, _TwoPassInstanceNorm(child))
    return model


def _onnx(model: torch.nn.Module, ckpt: Path, cfg: Config, path: Path, extra: dict) -> dict:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the onnx and onnxruntime packages ({e}); install medhpm with its "
            "dependencies (pip install -e .) or use --format torchscript"
        ) from None
    x = _probe_input(cfg)
    roi = list(cfg.data.roi)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_onnx_logs():
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                _for_onnx(model),
                (x[:1],),
                dynamo=True,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                external_data=False,
                verbose=False,
                report=False,
            )
            program.save(str(path), external_data=False)  # type: ignore[union-attr]  # dynamo=True: an ONNXProgram
        except Exception as e:
            raise ExportError(
                f"torch.onnx cannot export the network of {ckpt} at ROI {roi} "
                f"({type(e).__name__}: {_first_line(e)}); nothing was written. Use --format "
                "torchscript or bundle, or fine-tune with another data.roi"
            ) from None
        ref = model(x).numpy()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    for key, value in (
        ("medhpm_version", __version__),
        ("checkpoint_sha256", extra["checkpoint_sha256"]),
        (EXPORT_JSON, json.dumps(extra)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), ort_session_options(), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    diff = _check_close("ONNX", ckpt, got, ref)
    return {
        "max_abs_logit_difference": diff,
        "checked_on": list(x.shape),
        "opset": ONNX_OPSET,
        "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
    }


@contextlib.contextmanager
def _quiet_onnx_logs():
    """torch.onnx's exporter prints its progress and logs missing optional packages (torchvision)."""
    import io
    import logging

    names = ("torch.onnx", "torch.export", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


# ---------------------------------------------------------------------------------------------- the export
def export_model(
    ckpt: str | Path, out: str | Path, fmt: str = "bundle", force: bool = False, license_file: str | Path | None = None
) -> Path:
    """Export the fine-tuning checkpoint ``ckpt`` as ``fmt`` (bundle | onnx | torchscript) into the folder
    ``out``; returns ``out``.

    Refused with an :class:`ExportError` naming the file, before anything is written: an encoder file, a
    pre-training checkpoint (or any file that is not a fine-tuning checkpoint), an ``out`` that exists and
    is not empty (unless ``force``), an ``out`` that holds the checkpoint, a missing ``license_file``, a
    network that the format cannot trace or export, or an export whose logits differ from PyTorch's.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt, out = Path(ckpt), Path(out)
    _check_output(out, ckpt, force)
    if license_file is not None and not Path(license_file).is_file():
        raise ExportError(f"license file {license_file} does not exist; give the text file to ship as LICENSE")
    state = _read_checkpoint(ckpt)
    ckpt = resolve_checkpoint(ckpt, MODEL_ORDER)  # a run folder: the file read above
    model, cfg, classes = load_model(ckpt, state=state, purpose=_FINETUNE_ONLY)
    model = model.cpu().float().eval()
    args = state["model_args"]
    architecture = str(args.get("architecture", "unetr"))
    num_classes = int(args["unetr"]["out_channels"])
    settings = export_settings(cfg, classes, architecture, num_classes)
    provenance = _provenance(ckpt, state, cfg, fmt)
    extra = {**provenance, "settings": settings}

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_export_temps(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}.export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "bundle":
            (tmp / "configs").mkdir()
            (tmp / "models").mkdir()
            (tmp / "docs").mkdir()
            check = _torchscript(model, ckpt, cfg, tmp / "models" / "model.ts", extra)
            provenance["check"] = check
            meta = bundle_metadata(settings, provenance, cfg)
            atomic_write_text(tmp / "configs" / "metadata.json", json.dumps(meta, indent=2))
            atomic_write_text(tmp / "configs" / "inference.json", json.dumps(bundle_inference(settings), indent=2))
            atomic_write_text(tmp / "docs" / "README.md", bundle_readme(settings, provenance))
            atomic_write_text(tmp / "docs" / "metadata_schema.json", json.dumps(BUNDLE_METADATA_SCHEMA, indent=2))
            if license_file is not None:
                shutil.copyfile(license_file, tmp / "LICENSE")
        else:
            name = "model.onnx" if fmt == "onnx" else "model.ts"
            write = _onnx if fmt == "onnx" else _torchscript
            check = write(model, ckpt, cfg, tmp / name, extra)
            atomic_write_text(tmp / EXPORT_JSON, json.dumps({**extra, "model_file": name, "check": check}, indent=2))
            if license_file is not None:
                shutil.copyfile(license_file, tmp / "LICENSE")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def remove_stale_export_temps(out: Path) -> list[Path]:
    """Remove the temporary folders (``.NAME.PID.export.tmp``) that a killed export into ``out`` left beside
    it, those of processes no longer running; returns them. (A SIGKILL skips the cleanup of a failing export;
    the target folder itself is never half-written.)"""
    removed = []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.export\.tmp")
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.export.tmp"):
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir() or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _check_output(out: Path, ckpt: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file, not a folder; name a new folder with -o")
    real_out = os.path.realpath(out)
    real_ckpt = os.path.realpath(ckpt)
    if real_ckpt == real_out or real_ckpt.startswith(real_out.rstrip(os.sep) + os.sep):
        raise ExportError(
            f"output folder {out} holds the checkpoint {ckpt}, which the export would replace; "
            "name another folder with -o"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        n = sum(1 for _ in out.iterdir())
        raise ExportError(
            f"output folder {out} exists and is not empty ({n} entr{'y' if n == 1 else 'ies'}); "
            "name a new folder with -o, or pass --force to replace it"
        )


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``; an old ``out`` (``--force``) is moved aside first and
    removed only once the new folder is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}.replaced.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- loading
ORT_OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"


def ort_session_options():
    """The onnxruntime ``SessionOptions`` of every session medhpm creates (the export's check and
    :class:`OnnxRuntimeNetwork`); docs/export.md says why and what to set in your own pipeline."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPTIMIZATION_LEVEL)
    return so


class OnnxRuntimeNetwork(torch.nn.Module):
    """An ONNX export run by onnxruntime (CPU) behind a torch module's call: ``(N, 1, *roi)`` float tensor
    in, logits tensor out, so that MONAI's sliding window (and :class:`Predictor`) can drive it."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, ort_session_options(), providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.session.run(["logits"], {"image": arr})[0]).to(x.device)


def load_exported(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """(network, export.json) of an ONNX or TorchScript export folder (or a bundle: its model.ts and the
    ``medhpm`` entry of its metadata)."""
    folder = Path(folder)
    if (folder / "configs" / "metadata.json").is_file():
        meta = json.loads((folder / "configs" / "metadata.json").read_text())["medhpm"]
        return torch.jit.load(str(folder / "models" / "model.ts"), map_location="cpu").eval(), meta
    path = folder / EXPORT_JSON
    if not path.is_file():
        raise ExportError(f"{folder} is not a medhpm export folder (no {EXPORT_JSON} and no configs/metadata.json)")
    meta = json.loads(path.read_text())
    model_file = folder / meta["model_file"]
    if model_file.suffix == ".onnx":
        return OnnxRuntimeNetwork(model_file), meta
    return torch.jit.load(str(model_file), map_location="cpu").eval(), meta


def exported_predictor(folder: str | Path, **kw) -> Predictor:
    """A :class:`Predictor` (medhpm's preprocessing, sliding window and inversion) around an exported network:
    the same label maps as ``medhpm predict`` from the runtime of the export."""
    net, meta = load_exported(folder)
    return Predictor(
        net,
        from_dict(meta["config"]),
        classes={int(k): v for k, v in meta["settings"]["labels"].items() if int(k) > 0},
        device="cpu",
        **kw,
    )
