"""Prediction on new scans, written back in each scan's OWN geometry.

The chain stored in the checkpoint (load, orient, resample, window, crop, pad) is applied, UNETR runs by
sliding window, and MONAI's ``Invertd`` undoes the chain, so the label map has exactly the input's shape,
affine and orientation. The same :class:`Predictor` serves the command line and notebooks::

    from medhpm.segment.predict import Predictor
    p = Predictor.from_checkpoint("runs/ft/best.pt")
    path = p.predict_file("scan.nii.gz", "out/")              # writes out/scan.nii.gz, returns its path
    res = p.predict("scan.nii.gz")                            # or keep it in memory: a Prediction
    res = p.predict(nib.load("scan.nii.gz"))                  # a nibabel image
    res = p.predict(array, affine=affine, probabilities=True) # a NumPy array (X, Y, Z) and its affine
    res.label, res.affine, res.probabilities, res.classes     # uint8 (X, Y, Z), 4x4, (C, X, Y, Z) or None
    res.to_nifti()                                            # a nibabel image (the input's header kept)

The file commands (:meth:`Predictor.predict_file`, :meth:`Predictor.predict_path`, ``medhpm predict``)
call :meth:`Predictor.predict` and write what it returns.
"""

from __future__ import annotations

import itertools
import warnings
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medhpm.config import Config, checkpoint_keys, from_dict, get_key
from medhpm.data.ct_reader import read_volume
from medhpm.data.datalist import DataError, detect_format, load_datalist
from medhpm.data.datalist import root_cause
from medhpm.data.dicom_seg import check_seg_references
from medhpm.data.scans import case_name, is_dicom_series, is_nifti
from medhpm.data.transforms import predict_transforms
from medhpm.data.volume_checks import grid_problem_of_affine
from medhpm.evaluate.organ_stats import STATISTICS_CONVENTIONS, organ_statistics, statistics_csv
from medhpm.models.dynunet import build_dynunet
from medhpm.models.unetr import build_unetr
from medhpm.runtime.checkpoint import MODEL_ORDER, CheckpointError, load_checkpoint
from medhpm.runtime.device import autocast, inference_dtype, pick_device
from medhpm.runtime.files import atomic_save_nifti, atomic_write_text, check_writable, refuse_overwriting_inputs
from medhpm.segment.outputs import OUTPUT_WRITERS, output_types, write_outputs


@dataclass
class Prediction:
    """One scan's prediction in the scan's own geometry.

    ``label``: uint8 (X, Y, Z) label map on the input's voxel grid; ``affine``: its 4x4 voxel -> world (mm)
    matrix, nibabel's convention (RAS); ``probabilities``: float32 (C, X, Y, Z) softmax, on request, else
    None; ``classes``: ``{label value: name}`` of the checkpoint; ``header``: the input's NIfTI header
    (None for DICOM or array input), so that :meth:`to_nifti` keeps its exact geometry codes;
    ``statistics``: on request, per organ volume (mL) and HU mean/std inside the mask on the input's own
    grid (:func:`medhpm.evaluate.organ_stats.organ_statistics`), else None.
    """

    label: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = None
    classes: dict | None = None
    header: object | None = None
    statistics: dict | None = None

    def to_nifti(self):
        """The label map as a ``nibabel.Nifti1Image`` (uint8), with the input's header when it had one."""
        import nibabel as nib

        if self.header is None:
            img = nib.Nifti1Image(self.label, self.affine)
        else:  # NIfTI input: keep its exact header geometry (qform/sform codes)
            hdr = self.header.copy()
            hdr.set_data_dtype(np.uint8)
            img = nib.Nifti1Image(self.label, self.affine, hdr)
            img.set_qform(self.affine, code=int(self.header["qform_code"]) or 1)
            img.set_sform(self.affine, code=int(self.header["sform_code"]) or 1)
        img.header["descrip"] = b"medhpm prediction"
        return img


class Predictor:
    """Sliding-window UNETR prediction with the checkpoint's own preprocessing, inverted on output."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        classes: dict[int, str] | None = None,
        device: str = "auto",
        overlap: float | None = None,
        blend: str | None = None,
        sw_batch_size: int | None = None,
        output_on_cpu: bool = True,
        tta: bool = False,
        largest_component: bool = False,
    ):
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
        self.sw_batch_size = cfg.inference.sw_batch_size if sw_batch_size is None else int(sw_batch_size)
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size (windows per forward pass) must be at least 1, got {self.sw_batch_size}")
        self.output_on_cpu = output_on_cpu
        self.tta = bool(tta)  # test-time flips: mean softmax over the 8 flips of the three axes (nnU-Net's mirroring)
        if self.tta and cfg.data.flip_prob == 0:
            warnings.warn(
                "test-time flips on a model trained without flips (data.flip_prob 0): it sees mirrored "
                "anatomy it never saw and confuses left and right organs (the float32 demo model: mean "
                "Dice 86.1 -> 22.3 %, docs/evaluation.md); use tta only for models trained with flips",
                stacklevel=2,
            )
        self.largest_component = bool(largest_component)  # keep each organ's largest connected component
        self.amp_dtype = inference_dtype(self.device, cfg.runtime.precision)
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
        ``probabilities`` is False (same argmax, without a second full-size map in memory). With ``tta``:
        the mean of the softmax over the image and its 7 flips (every subset of the three spatial axes,
        MONAI's ``Flip``), each flipped back; always probabilities."""
        if not self.tta:
            return self._infer_once(image, probabilities)
        from monai.transforms import Flip

        image = torch.as_tensor(image).as_subclass(torch.Tensor)
        total = None
        flips = [axes for n in range(4) for axes in itertools.combinations((0, 1, 2), n)]
        for axes in flips:
            flip = Flip(spatial_axis=list(axes)) if axes else None
            x = flip(image).as_subclass(torch.Tensor) if flip else image
            p = self._infer_once(x, probabilities=True)
            p = flip(p).as_subclass(torch.Tensor) if flip else p  # a flip is its own inverse
            total = p if total is None else total.add_(p)
        assert total is not None  # eight flips: the loop ran
        return total.div_(len(flips))

    @torch.no_grad()
    def _infer_once(self, image: torch.Tensor, probabilities: bool = True) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].float().to(self.device)
        with autocast(self.device, self.amp_dtype):
            logits = sliding_window_inference(
                x,
                tuple(self.cfg.data.roi),
                self.sw_batch_size,
                self.model,
                overlap=self.overlap,
                mode=self.blend,
                sw_device=self.device,
                device=torch.device("cpu") if self.output_on_cpu else self.device,
            )
        logits = logits[0].float()
        return torch.softmax(logits, dim=0, out=logits) if probabilities else logits

    def predict(self, image, affine=None, probabilities: bool = False, statistics: bool = False) -> Prediction:
        """Segment one scan in memory; nothing is written.

        ``image``: a path (NIfTI file or DICOM series folder), a ``nibabel`` image, or a NumPy array
        (X, Y, Z) of HU with ``affine`` (4x4 voxel -> world in mm, nibabel's RAS convention, as
        ``nib.load(f).affine``). Returns a :class:`Prediction` on the input's own grid (same shape and
        affine); ``probabilities=True`` adds the softmax, ``statistics=True`` each organ's volume and HU.
        The array path and the file path give the same label map for the same voxels and affine.
        """
        source, header = _as_source(image, affine)
        hu = None
        if statistics:  # the scan's own intensities on its own grid, before any preprocessing
            hu = read_volume(source).numpy()[0] if isinstance(source, str) else source.numpy()[0].copy()
        res = self.predict_item(source, want_probabilities=probabilities)
        label = res["label"] if not self.largest_component else keep_largest_components(res["label"])
        if header is not None and tuple(int(n) for n in header.get_data_shape()[:3]) != label.shape:
            raise RuntimeError(
                f"internal error: prediction shape {label.shape} differs from the input's "
                f"{tuple(header.get_data_shape()[:3])}"
            )
        out_affine = res["affine"] if header is None else _header_affine(image, header)
        classes = dict(self.classes) or _value_names(label)
        stats = organ_statistics(cast(np.ndarray, hu), label, out_affine, classes) if statistics else None
        return Prediction(
            label=label,
            affine=out_affine,
            probabilities=res.get("probs"),
            classes=dict(self.classes),
            header=header,
            statistics=stats,
        )

    def predict_item(self, source, want_probabilities: bool = False) -> dict:
        """Preprocess, infer and invert one scan (a path, or a channel-first MetaTensor in memory).
        Returns dict(label (X,Y,Z) uint8, affine, probs?)."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        try:
            data = self.transform({"image": source if isinstance(source, MetaTensor) else str(source)})
        except RuntimeError as e:  # MONAI's "applying transform" wrapper: raise the error that names the input
            root = root_cause(e)
            if root is e:
                raise
            raise root from None
        img = data["image"]
        probs = self._infer(img, probabilities=want_probabilities)  # (C, h, w, d) in preprocessed space
        out = {"label_pre": probs.argmax(0, keepdim=True).to(torch.uint8)}
        keys = ["pred"]
        # meta carries the preprocessed affine (MetaTensor.affine is meta["affine"]); passing affine= as well
        # makes MONAI warn that one overwrites the other
        data["pred"] = MetaTensor(out["label_pre"].float(), meta=dict(img.meta))
        data["pred"].applied_operations = list(img.applied_operations)
        nearest = [True]
        if want_probabilities:
            data["probs"] = MetaTensor(probs, meta=dict(img.meta))
            data["probs"].applied_operations = list(img.applied_operations)
            keys.append("probs")
            nearest.append(False)
        inv = Invertd(
            keys=keys, transform=self.transform, orig_keys=["image"] * len(keys), nearest_interp=nearest, to_tensor=True
        )
        data = inv(data)
        label = torch.as_tensor(data["pred"]).as_subclass(torch.Tensor)[0].round().to(torch.uint8).numpy()
        res = {"label": label, "affine": _original_affine(data), "meta": data["image"].meta}
        if want_probabilities:
            probs_np = torch.as_tensor(data["probs"]).as_subclass(torch.Tensor).numpy().astype(np.float32)
            # outside the foreground crop the inverse transform pads zeros: that mass is background
            probs_np[0] += np.clip(1.0 - probs_np.sum(0), 0.0, 1.0)
            res["probs"] = probs_np
        return res

    def predict_file(
        self, source: str | Path, out_dir: str | Path, save_probabilities: bool = False, name: str | None = None
    ) -> Path:
        """Segment one scan (NIfTI file or DICOM series folder) into ``out_dir/NAME.nii.gz``
        (:meth:`predict`, then written atomically) with its colour tables beside it (``NAME.ctbl`` for 3D
        Slicer, ``NAME.itksnap.txt`` for ITK-SNAP: :mod:`medhpm.data.color_tables`); returns the label
        map's path."""
        source = Path(source)
        res = self.predict(source, probabilities=save_probabilities)
        return self._write(res, Path(out_dir), name or case_name(source))

    def _write(
        self, res: Prediction, out_dir: Path, name: str, output_type: str = "nifti", source: Path | None = None
    ) -> Path:
        """The files of one prediction: those of each writer ``output_type`` names (:mod:`.outputs`: the
        label map and its colour tables, the DICOM-SEG referencing the DICOM series ``source``), and the
        probabilities if computed. Returns the main file of the first writer (the label map's, else the SEG's)."""
        import nibabel as nib

        types = output_types(output_type)
        path = write_outputs(types, res, out_dir, name, self.classes or _value_names(res.label), source)
        if res.probabilities is not None:
            pr = np.moveaxis(res.probabilities, 0, -1)  # (X, Y, Z, C)
            atomic_save_nifti(nib.Nifti1Image(pr, res.to_nifti().affine), out_dir / f"{name}_probs.nii.gz")
        return path

    def predict_path(
        self,
        source: str | Path,
        out_dir: str | Path,
        save_probabilities: bool = False,
        split: str = "test",
        statistics: bool = False,
        output_type: str = "nifti",
    ) -> list[dict]:
        """Segment a file, a folder of NIfTI files / DICOM series, or a datalist's split.

        A scan that fails is reported (``ok`` False, ``error``) and the others still run. ``statistics``:
        also write ``statistics.json`` and ``statistics.csv`` (every segmented scan's organ volumes and HU).
        ``output_type``: ``nifti`` (label maps), ``dicom-seg`` (a DICOM-SEG per DICOM series, ``NAME_seg.dcm``)
        or ``both``.
        """
        items = plan_predictions(
            source, out_dir, split, save_probabilities, statistics=statistics, output_type=output_type
        )
        out_dir = Path(out_dir)
        check_writable(out_dir)
        results, per_case = [], {}
        for src, name, _ in items:
            try:
                res = self.predict(src, probabilities=save_probabilities, statistics=statistics)
                path = self._write(res, out_dir, name, output_type, Path(src))
                results.append({"input": str(src), "output": str(path), "ok": True})
                if statistics:
                    per_case[name] = {"input": str(src), "organs": res.statistics}
            except Exception as e:  # one bad scan must not stop the others
                results.append(
                    {"input": str(src), "ok": False, "error": _error_line(e), "traceback": traceback.format_exc()}
                )
        if statistics and per_case:
            write_statistics(out_dir, per_case)
        return results


def load_model(
    path: str | Path,
    expect: Config | None = None,
    purpose: str = "prediction needs a fine-tuning checkpoint (best.pt or final.pt of `medhpm finetune`)",
    state: dict | None = None,
) -> tuple[torch.nn.Module, Config, dict[int, str]]:
    """(network with the checkpoint's weights, in eval mode, its config, class names by label value) of a
    fine-tuning checkpoint: the one place prediction and export rebuild a trained network. ``purpose`` is
    said when the file is not a fine-tuning checkpoint; ``state``: the checkpoint, if already read."""
    if state is None:
        state = load_checkpoint(
            path, stage="finetune", keys=("config", "model_args", "model"), purpose=purpose, folder_order=MODEL_ORDER
        )
    try:
        cfg = from_dict(state["config"])
    except ValueError as e:
        raise CheckpointError(f"fine-tuning checkpoint {path} holds a config this medhpm cannot read: {e}") from None
    if expect is not None:
        check_compatible(cfg, expect, path)
    args = state["model_args"]
    try:
        u = args["unetr"]
        if args.get("architecture", "unetr") == "dynunet":
            model = build_dynunet(cfg.model.in_chans, u["out_channels"], tuple(cfg.data.roi))
        else:
            model = build_unetr(
                args["encoder"],
                out_channels=u["out_channels"],
                feature_size=u["feature_size"],
                drop_path=0.0,
                skip_blocks=tuple(u["skip_blocks"]),
                norm_name=u["norm_name"],
            )
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"the weights in fine-tuning checkpoint {path} do not fit the model its metadata "
            f"describes ({type(e).__name__}: {first})"
        ) from None
    classes = {int(k): v for k, v in args.get("classes", {}).items()}
    return model.eval(), cfg, classes


def plan_predictions(
    source: str | Path,
    out_dir: str | Path,
    split: str = "test",
    save_probabilities: bool = False,
    model: str | Path | None = None,
    statistics: bool = False,
    output_type: str = "nifti",
) -> list[tuple[Path, str, Path]]:
    """(scan, case name, label map to write) of every scan behind ``source``, checked before any scan or
    checkpoint is read: two scans whose outputs would share one file (``case.nii`` and ``case.nii.gz``)
    and an output written onto an input (``-i DIR/scan.nii.gz -o DIR``) raise ValueError naming both."""
    writers = [OUTPUT_WRITERS[t] for t in output_types(output_type)]
    out_dir = Path(out_dir)
    items, data_set = _inputs(Path(source), split)
    if any(w.needs_dicom for w in writers):
        not_dicom = [str(src) for src, _ in items if not (src.is_dir() and is_dicom_series(src))]
        if not_dicom:
            raise ValueError(
                f"--output-type {output_type} writes a DICOM-SEG that references the DICOM series it was predicted "
                f"from, but {not_dicom[0]}"
                + (f" (and {len(not_dicom) - 1} more)" if len(not_dicom) > 1 else "")
                + " is not a DICOM series; nothing was predicted. Use --output-type nifti for NIfTI input."
            )
        for src, _ in items:  # headers only: a series a SEG cannot reference fails now, not after inference
            try:
                check_seg_references(src)
            except DataError as e:
                raise ValueError(f"{e}; nothing was predicted. Use --output-type nifti for this series") from None
    planned: list[tuple[Path, str, Path]] = []
    by_output: dict[str, Path] = {}
    outputs = [out_dir]
    for src, name in items:
        outs = [p for w in writers for p in w.paths(out_dir, name)]
        outs += [out_dir / f"{name}_probs.nii.gz"] if save_probabilities else []
        for o in outs:
            key = os.path.normpath(os.path.abspath(o))
            if key in by_output and by_output[key] != src:
                raise ValueError(
                    f"{by_output[key]} and {src} would both be written to {o}; nothing was "
                    "predicted. Rename one of them (or predict them into separate folders)"
                )
            by_output[key] = src
        outputs += outs
        planned.append((src, name, outs[0]))
    outputs += [out_dir / STATISTICS_FILES[0], out_dir / STATISTICS_FILES[1]] if statistics else []
    # the data set's files of every split are inputs too, not only the scans predicted
    refuse_overwriting_inputs(
        outputs, [Path(source), model, *(s for s, _ in items), *data_set], hint="choose another output folder with -o"
    )
    return planned


def _list_inputs(source: Path, split: str) -> list[tuple[Path, str]]:
    """(scan, case name) of every scan behind ``source``, found and named as ``medhpm data check`` reads
    them (:func:`medhpm.data.datalist.load_datalist`): a plain folder gives all its scans (recursively,
    named by their path below it), a datalist JSON or a data set folder (MSD, nnU-Net, BTCV) the entries
    of ``split``. A single file is predicted whatever its name."""
    return _inputs(source, split)[0]


def _inputs(source: Path, split: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """:func:`_list_inputs`, and the files of the data set behind ``source`` (a datalist JSON or a data set
    folder): the images and labels of every split, which no prediction may replace (predicting the test
    split into ``labelsTr`` would turn the ground truth into predictions). A single scan or a plain folder
    of scans has none. The datalist is read once for both."""
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if source.is_file() and source.suffix.lower() != ".json":
        return [(source, case_name(source))], []
    fmt = detect_format(source)
    dl = load_datalist(source, format=fmt)
    entries = dl["training"] if fmt == "folder" else dl.get(split) or []
    if not entries:
        raise ValueError(f"datalist {source} has no {split!r} entries to predict")
    data_set: list[Path] = []
    if fmt != "folder":
        for split_entries in dl.values():
            for e in split_entries if isinstance(split_entries, list) else []:
                data_set += [Path(e[k]) for k in ("image", "label") if isinstance(e, dict) and e.get(k)]
    return [(Path(e["image"]), e["case"]) for e in entries], data_set


def _as_source(image, affine) -> tuple:
    """(what the chain's loader takes: a path string or a channel-first MetaTensor, the NIfTI header to keep
    or None) for :meth:`Predictor.predict`; a bad input raises ValueError / FileNotFoundError saying why."""
    import nibabel as nib
    from monai.data import MetaTensor

    if isinstance(image, (str, os.PathLike)):
        if affine is not None:
            raise ValueError(f"affine is read from {image}; pass affine only with a NumPy array")
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"input scan {path} does not exist")
        header = nib.load(str(path)).header if path.is_file() and is_nifti(path.name) else None
        return str(path), header
    if isinstance(image, nib.spatialimages.SpatialImage):
        if affine is not None:
            raise ValueError("affine is read from the nibabel image; pass affine only with a NumPy array")
        header = image.header if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)) else None
        data, affine, name = np.asanyarray(image.dataobj), image.affine, image.get_filename() or "the nibabel image"
    else:
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(f"predict takes a path, a nibabel image or a NumPy array, got {type(image).__name__}")
        if affine is None:
            raise ValueError(
                "a NumPy array needs its affine (4x4 voxel -> world in mm, nibabel's RAS convention, "
                "as nib.load(f).affine): predict(array, affine=...)"
            )
        data, header, name = image, None, "the array"
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"the affine of {name} must be a finite 4x4 matrix, got shape {affine.shape}")
    problem = grid_problem_of_affine(affine)
    if problem:
        raise ValueError(f"{name}: {problem}")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise ValueError(f"{name} has shape {tuple(data.shape)}; predict needs one 3D CT volume (X, Y, Z)")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"{name} has dtype {data.dtype}; predict needs real CT intensities (HU)")
    shape = tuple(int(n) for n in data.shape)
    vol = MetaTensor(
        torch.as_tensor(np.asarray(data, dtype=np.float32))[None],
        affine=torch.as_tensor(affine),
        meta={
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(shape),
            "space": "RAS",
            "original_channel_dim": float("nan"),
            "filename_or_obj": name,
        },
    )
    if header is not None:
        header = header.copy()
    return vol, header


def keep_largest_components(label: np.ndarray) -> np.ndarray:
    """Each organ's largest connected component only (MONAI's ``KeepLargestConnectedComponent``, one organ
    at a time, 26-connectivity); the removed voxels become background."""
    from monai.transforms import KeepLargestConnectedComponent

    values = [int(v) for v in np.unique(label) if v > 0]
    if not values:
        return label
    keep = KeepLargestConnectedComponent(applied_labels=values, is_onehot=False, independent=True, connectivity=3)
    out = keep(torch.as_tensor(label)[None])
    return np.asarray(torch.as_tensor(out).as_subclass(torch.Tensor)[0].numpy(), dtype=label.dtype)


STATISTICS_FILES = ("statistics.json", "statistics.csv")


def write_statistics(out_dir: Path, per_case: dict) -> tuple[Path, Path]:
    """``statistics.json`` (``{"conventions", "cases": {case: {"input", "organs": {value: {...}}}}}``) and
    ``statistics.csv`` (one row per case and organ) in ``out_dir``, atomically."""
    doc = {"conventions": STATISTICS_CONVENTIONS, "cases": per_case}
    js = atomic_write_text(out_dir / STATISTICS_FILES[0], json.dumps(doc, indent=2, allow_nan=False) + "\n")
    csv_text = statistics_csv({c: v["organs"] for c, v in per_case.items()})
    return js, atomic_write_text(out_dir / STATISTICS_FILES[1], csv_text)


def _value_names(label: np.ndarray) -> dict[int, str]:
    """``{value: "class_<value>"}`` of the values in a label map (a checkpoint without class names)."""
    return {int(v): f"class_{int(v)}" for v in np.unique(label) if v > 0}


def _header_affine(image, header) -> np.ndarray:
    """The affine the input's own header gives (what nibabel reports, so the output matches it exactly)."""
    import nibabel as nib

    if isinstance(image, nib.spatialimages.SpatialImage):
        return np.asarray(image.affine, dtype=np.float64)
    return np.asarray(cast(Any, nib.load(str(image))).affine, dtype=np.float64)  # load() is typed FileBasedImage


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
    diffs = [
        f"{k}: checkpoint {get_key(ckpt_cfg, k)!r}, config {get_key(cfg, k)!r}"
        for k in checkpoint_keys("finetune")
        if get_key(ckpt_cfg, k) != get_key(cfg, k)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match the config: " + "; ".join(diffs))
