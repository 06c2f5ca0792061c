"""Prediction on new scans, written back in each scan's OWN geometry.

The chain stored in the checkpoint (load, orient, resample, window, crop, pad) is applied, UNETR runs by
sliding window, and MONAI's ``Invertd`` undoes the chain, so the label map has exactly the input's shape,
affine and orientation. The same :class:`Predictor` serves the command line and notebooks::

    from medhpm.segment.predict import Predictor
    p = Predictor.from_checkpoint("runs/ft/best.pt")
    labels = p.predict_file("scan.nii.gz", "out/")          # writes out/scan.nii.gz
    arr, affine = p.predict_array_file("scan.nii.gz")       # or keep it in memory
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import numpy as np
import torch

from medhpm.config import Config, checkpoint_keys, from_dict, get_key
from medhpm.data.datalist import detect_format, load_datalist
from medhpm.data.dataset import root_cause
from medhpm.data.scans import case_name, is_nifti
from medhpm.data.transforms import predict_transforms
from medhpm.models.dynunet import build_dynunet
from medhpm.models.unetr import build_unetr
from medhpm.runtime.checkpoint import CheckpointError, load_checkpoint
from medhpm.runtime.device import autocast, autocast_dtype, pick_device
from medhpm.runtime.files import atomic_save_nifti, check_writable, refuse_overwriting_inputs


class Predictor:
    """Sliding-window UNETR prediction with the checkpoint's own preprocessing, inverted on output."""

    def __init__(self, model: torch.nn.Module, cfg: Config, classes: dict[int, str] | None = None,
                 device: str = "auto", overlap: float | None = None, blend: str | None = None,
                 sw_batch_size: int | None = None, output_on_cpu: bool = True):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.classes = classes or {}
        self.overlap = cfg.inference.overlap if overlap is None else float(overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        self.blend = blend or cfg.inference.blend
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be gaussian or constant, got {self.blend!r}")
        self.sw_batch_size = sw_batch_size or cfg.inference.sw_batch_size
        self.output_on_cpu = output_on_cpu
        self.amp_dtype = autocast_dtype(self.device, cfg.runtime.precision)
        self.transform = predict_transforms(cfg.data)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", expect: Config | None = None, **kw) -> "Predictor":
        """Rebuild the model and its preprocessing from a fine-tuning checkpoint.

        ``expect``: a config to compare with the checkpoint's metadata (preset, patch size, ROI,
        spacing, HU window, classes); a mismatch raises an error that explains it.
        """
        model, cfg, classes = load_model(path, expect=expect)
        return cls(model, cfg, classes=classes, device=device, **kw)

    # ------------------------------------------------------------------ core
    @torch.no_grad()
    def _infer(self, image: torch.Tensor, probabilities: bool = True) -> torch.Tensor:
        """``image`` (1, H, W, D) preprocessed -> softmax probabilities (C, H, W, D), or the logits when
        ``probabilities`` is False (same argmax, without a second full-size map in memory)."""
        from monai.inferers import sliding_window_inference

        x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].float().to(self.device)
        with autocast(self.device, self.amp_dtype):
            logits = sliding_window_inference(
                x, tuple(self.cfg.data.roi), self.sw_batch_size, self.model, overlap=self.overlap,
                mode=self.blend, sw_device=self.device,
                device=torch.device("cpu") if self.output_on_cpu else self.device)
        logits = logits[0].float()
        return torch.softmax(logits, dim=0, out=logits) if probabilities else logits

    def predict_item(self, source: str | Path, want_probabilities: bool = False) -> dict:
        """Preprocess, infer and invert one scan. Returns dict(label (X,Y,Z) uint8, affine, probs?)."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        data = self.transform({"image": str(source)})
        img = data["image"]
        probs = self._infer(img, probabilities=want_probabilities)  # (C, h, w, d) in preprocessed space
        out = {"label_pre": probs.argmax(0, keepdim=True).to(torch.uint8)}
        keys = ["pred"]
        data["pred"] = MetaTensor(out["label_pre"].float(), affine=img.affine, meta=dict(img.meta))
        data["pred"].applied_operations = list(img.applied_operations)
        nearest = [True]
        if want_probabilities:
            data["probs"] = MetaTensor(probs, affine=img.affine, meta=dict(img.meta))
            data["probs"].applied_operations = list(img.applied_operations)
            keys.append("probs")
            nearest.append(False)
        inv = Invertd(keys=keys, transform=self.transform, orig_keys=["image"] * len(keys),
                      nearest_interp=nearest, to_tensor=True)
        data = inv(data)
        label = torch.as_tensor(data["pred"]).as_subclass(torch.Tensor)[0].round().to(torch.uint8).numpy()
        res = {"label": label, "affine": _original_affine(data), "meta": data["image"].meta}
        if want_probabilities:
            probs = torch.as_tensor(data["probs"]).as_subclass(torch.Tensor).numpy().astype(np.float32)
            # outside the foreground crop the inverse transform pads zeros: that mass is background
            probs[0] += np.clip(1.0 - probs.sum(0), 0.0, 1.0)
            res["probs"] = probs
        return res

    def predict_file(self, source: str | Path, out_dir: str | Path, save_probabilities: bool = False,
                     name: str | None = None) -> Path:
        """Segment one scan (NIfTI file or DICOM series folder) into ``out_dir/NAME.nii.gz``."""
        import nibabel as nib

        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"input scan {source} does not exist")
        res = self.predict_item(source, want_probabilities=save_probabilities)
        name = name or case_name(source)
        out_dir = Path(out_dir)
        label, affine = res["label"], res["affine"]
        ref = _reference_header(source)
        if ref is not None:  # NIfTI input: keep its exact header geometry (qform/sform codes, shape)
            if tuple(ref.shape[:3]) != label.shape:
                raise RuntimeError(f"internal error: prediction shape {label.shape} differs from {source} "
                                   f"{tuple(ref.shape[:3])}")
            hdr = ref.header.copy()
            hdr.set_data_dtype(np.uint8)
            img = nib.Nifti1Image(label, ref.affine, hdr)
            img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
            img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
        else:
            img = nib.Nifti1Image(label, affine)
        img.header["descrip"] = b"medhpm prediction"
        path = atomic_save_nifti(img, out_dir / f"{name}.nii.gz")
        if save_probabilities:
            pr = np.moveaxis(res["probs"], 0, -1)  # (X, Y, Z, C)
            atomic_save_nifti(nib.Nifti1Image(pr, img.affine), out_dir / f"{name}_probs.nii.gz")
        return path

    def predict_path(self, source: str | Path, out_dir: str | Path, save_probabilities: bool = False,
                     split: str = "test") -> list[dict]:
        """Segment a file, a folder of NIfTI files / DICOM series, or a datalist's split.

        A scan that fails is reported (``ok`` False, ``error``) and the others still run.
        """
        items = plan_predictions(source, out_dir, split, save_probabilities)
        check_writable(out_dir)
        results = []
        for src, name, _ in items:
            try:
                path = self.predict_file(src, out_dir, save_probabilities, name=name)
                results.append({"input": str(src), "output": str(path), "ok": True})
            except Exception as e:  # one bad scan must not stop the others
                results.append({"input": str(src), "ok": False, "error": _error_line(e),
                                "traceback": traceback.format_exc()})
        return results


def load_model(path: str | Path, expect: Config | None = None,
               purpose: str = "prediction needs a fine-tuning checkpoint (best.pt or final.pt of `medhpm finetune`)",
               state: dict | None = None) -> tuple[torch.nn.Module, Config, dict[int, str]]:
    """(network with the checkpoint's weights, in eval mode, its config, class names by label value) of a
    fine-tuning checkpoint: the one place prediction and export rebuild a trained network. ``purpose`` is
    said when the file is not a fine-tuning checkpoint; ``state``: the checkpoint, if already read."""
    if state is None:
        state = load_checkpoint(path, stage="finetune", keys=("config", "model_args", "model"), purpose=purpose)
    try:
        cfg = from_dict(state["config"])
    except ValueError as e:
        raise CheckpointError(f"fine-tuning checkpoint {path} holds a config this medhpm cannot read: "
                              f"{e}") from None
    if expect is not None:
        check_compatible(cfg, expect, path)
    args = state["model_args"]
    try:
        u = args["unetr"]
        if args.get("architecture", "unetr") == "dynunet":
            model = build_dynunet(cfg.model.in_chans, u["out_channels"], tuple(cfg.data.roi))
        else:
            model = build_unetr(args["encoder"], out_channels=u["out_channels"], feature_size=u["feature_size"],
                                drop_path=0.0, skip_blocks=tuple(u["skip_blocks"]), norm_name=u["norm_name"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"the weights in fine-tuning checkpoint {path} do not fit the model its metadata "
                              f"describes ({type(e).__name__}: {first})") from None
    classes = {int(k): v for k, v in args.get("classes", {}).items()}
    return model.eval(), cfg, classes


def plan_predictions(source: str | Path, out_dir: str | Path, split: str = "test", save_probabilities: bool = False,
                     model: str | Path | None = None) -> list[tuple[Path, str, Path]]:
    """(scan, case name, label map to write) of every scan behind ``source``, checked before any scan or
    checkpoint is read: two scans whose outputs would share one file (``case.nii`` and ``case.nii.gz``)
    and an output written onto an input (``-i DIR/scan.nii.gz -o DIR``) raise ValueError naming both."""
    out_dir = Path(out_dir)
    items = _list_inputs(Path(source), split)
    planned, by_output, outputs = [], {}, [out_dir]
    for src, name in items:
        outs = [out_dir / f"{name}.nii.gz"] + ([out_dir / f"{name}_probs.nii.gz"] if save_probabilities else [])
        for o in outs:
            key = os.path.normpath(os.path.abspath(o))
            if key in by_output and by_output[key] != src:
                raise ValueError(f"{by_output[key]} and {src} would both be written to {o}; nothing was "
                                 "predicted. Rename one of them (or predict them into separate folders)")
            by_output[key] = src
        outputs += outs
        planned.append((src, name, outs[0]))
    refuse_overwriting_inputs(outputs, [Path(source), model, *(s for s, _ in items)],
                              hint="choose another output folder with -o")
    return planned


def _list_inputs(source: Path, split: str) -> list[tuple[Path, str]]:
    """(scan, case name) of every scan behind ``source``, found and named as ``medhpm data check`` reads
    them (:func:`medhpm.data.datalist.load_datalist`): a plain folder gives all its scans (recursively,
    named by their path below it), a datalist JSON or a data set folder (MSD, nnU-Net, BTCV) the entries
    of ``split``. A single file is predicted whatever its name."""
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if source.is_file() and source.suffix.lower() != ".json":
        return [(source, case_name(source))]
    fmt = detect_format(source)
    dl = load_datalist(source, format=fmt)
    entries = dl["training"] if fmt == "folder" else dl.get(split) or []
    if not entries:
        raise ValueError(f"datalist {source} has no {split!r} entries to predict")
    return [(Path(e["image"]), e["case"]) for e in entries]


def _reference_header(source: Path):
    if source.is_file() and is_nifti(source.name):
        import nibabel as nib

        return nib.load(str(source))
    return None


def _original_affine(data) -> np.ndarray:
    meta = data["image"].meta
    aff = meta.get("original_affine", meta.get("affine"))
    return np.asarray(torch.as_tensor(aff).cpu().numpy(), dtype=np.float64)


def _error_line(e: BaseException) -> str:
    """First line of the message of the error under MONAI's "applying transform" wrappers (it names the file)."""
    root = root_cause(e)
    text = str(root).strip()
    return text.splitlines()[0] if text else type(root).__name__


def check_compatible(ckpt_cfg: Config, cfg: Config, path) -> None:
    """Explain every difference between a fine-tuning checkpoint's metadata and the config it is used with,
    over the keys the checkpoint depends on (model shape, preprocessing, classes: ``checkpoint_keys``)."""
    diffs = [f"{k}: checkpoint {get_key(ckpt_cfg, k)!r}, config {get_key(cfg, k)!r}"
             for k in checkpoint_keys("finetune") if get_key(ckpt_cfg, k) != get_key(cfg, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match the config: " + "; ".join(diffs))

