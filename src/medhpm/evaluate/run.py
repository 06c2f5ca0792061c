"""Evaluate predicted label maps against ground truth: metrics.json, metrics.csv and table.md.

``evaluate_predictions`` is the library function behind the ``evaluate`` command. Predictions must already
be in each ground-truth scan's original geometry (same shape and affine); nothing is resampled here, because
resampling a label map changes the metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from ..data.scans import CHANNEL_SUFFIX as _CHANNEL_SUFFIX
from ..data.scans import case_name, is_nifti, strip_nifti_ext
from ..runtime.files import atomic_write_text, refuse_overwriting_inputs
from ..data.color_tables import color_table_paths, read_slicer_ctbl
from ..data.datalist import DataError, _parse_labels
from .classes import classes_from_labels, parse_classes, value_name
from ..config import FinetuneConfig
from .metrics import ABSENT, CONVENTIONS, as_label_map, check_tolerance, compute_case_metrics, summarize
from .tables import paper_table

AFFINE_TOL_MM = 1e-3
_ROLE_SUFFIX = re.compile(r"_(pred|prediction|seg|segmentation|label|labels|gt)$", re.IGNORECASE)
_ROLE_PREFIX = re.compile(r"^(img|image|labels|label|seg|pred)(?:[_\-]|(?=\d))", re.IGNORECASE)


@dataclass(frozen=True)
class _Item:
    stem: str  # file (or, for datalists, image) name without extension: what names are matched on
    path: Path
    from_image: bool  # the name comes from an image file, so a channel suffix is expected


def _variants(stem: str) -> set[str]:
    """Names a file may be matched by: the stem with or without channel suffix, role suffix and prefix."""
    out = {stem}
    for strip in (_CHANNEL_SUFFIX, _ROLE_SUFFIX, _ROLE_PREFIX):
        out |= {strip.sub("", s) for s in out}
    return {s for s in out if s}


def _case_name(item: _Item) -> str:
    name = _CHANNEL_SUFFIX.sub("", item.stem) if item.from_image else item.stem
    return _ROLE_PREFIX.sub("", name) or name


def _collect(source: Path, datalist_key: str, role: str) -> list[_Item]:
    """The files behind a NIfTI file, a folder of NIfTI files or a datalist JSON (``role`` is pred or label)."""
    what = "prediction" if role == "pred" else "ground truth"
    if not source.exists():
        raise FileNotFoundError(f"{what} path {source} does not exist.")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p.name))
        if role == "pred":  # the predictor's optional probability maps sit next to the label maps
            files = [p for p in files if not strip_nifti_ext(p.name).endswith("_probs")]
        if not files:
            raise ValueError(f"{what} folder {source} contains no .nii or .nii.gz files.")
        return [_Item(strip_nifti_ext(p.name), p, False) for p in files]
    if is_nifti(source.name):
        return [_Item(strip_nifti_ext(source.name), source, False)]
    if source.suffix.lower() != ".json":
        raise ValueError(f"{what} {source} is neither a NIfTI file, a folder nor a datalist .json file.")
    try:
        data = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {source} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or datalist_key not in data:
        lists = sorted(k for k, v in data.items() if isinstance(v, list)) if isinstance(data, dict) else []
        raise ValueError(
            f"datalist {source} has no {datalist_key!r} list (its lists: {', '.join(lists) or 'none'}); "
            "choose one with --split (datalist_key)."
        )
    # Predictions may sit under "pred"; otherwise "label" holds the map to read.
    has_pred = any(isinstance(e, dict) and "pred" in e for e in data[datalist_key])
    field = "pred" if role == "pred" and has_pred else "label"
    items = []
    for i, entry in enumerate(data[datalist_key]):
        if not isinstance(entry, dict) or field not in entry:
            raise ValueError(f"entry {i} of {datalist_key!r} in datalist {source} has no {field!r} path: {entry!r}")
        path = Path(entry[field])
        path = path if path.is_absolute() else source.parent / path
        if entry.get("case"):  # an explicit case name is what the predictor names its output after
            items.append(_Item(str(entry["case"]), path, False))
            continue
        name_from = entry.get("image", entry[field])
        if isinstance(name_from, list):  # multi-channel images: the first channel names the case
            name_from = name_from[0]
        items.append(_Item(case_name(str(name_from)), path, "image" in entry))
    # The datalist readers' rule (medhpm.data.scans.case_name, so the predictor's file names): images sharing
    # a file name (case1/ct.nii.gz, case2/ct.nii.gz) are named by their path relative to the datalist's folder.
    stems = [it.stem for it in items]
    for i, (it, entry) in enumerate(zip(items, data[datalist_key])):
        if stems.count(it.stem) > 1 and not entry.get("case") and isinstance(entry.get("image"), str):
            items[i] = _Item(case_name(entry["image"], source.parent.resolve()), it.path, it.from_image)
    return items


def _described(source: Path, datalist_key: str) -> str:
    """A source as the messages name it: a datalist with the list that was read."""
    return f"the {datalist_key!r} list of {source}" if source.suffix.lower() == ".json" else str(source)


def _match(
    preds: list[_Item],
    labels: list[_Item],
    pred_src: Path,
    label_src: Path,
    only_predicted: bool = False,
    datalist_key: str = "test",
) -> tuple[list[tuple[_Item, _Item]], list[_Item]]:
    """Pairs of (prediction, ground truth), and the ground truths left without a prediction (empty unless
    ``only_predicted``: otherwise any unmatched file on either side is a ValueError)."""
    if len(preds) == 1 and len(labels) == 1 and not pred_src.is_dir() and not label_src.is_dir():
        if pred_src.suffix.lower() != ".json" and label_src.suffix.lower() != ".json":
            return [(preds[0], labels[0])], []  # two files given explicitly: their names need not agree
    pairs: list[tuple[_Item, _Item]] = []
    by_stem: dict[str, list[_Item]] = {}
    for p in preds:
        by_stem.setdefault(p.stem, []).append(p)
    left_labels, used = [], set()
    for g in labels:  # exact names first, so that 'case_0000' never pairs with 'case'
        cands = [p for p in by_stem.get(g.stem, []) if id(p) not in used]
        if len(cands) == 1:
            pairs.append((cands[0], g))
            used.add(id(cands[0]))
        else:
            left_labels.append(g)
    left_preds = [p for p in preds if id(p) not in used]
    pv = {id(p): _variants(p.stem) for p in left_preds}
    unmatched_labels = []
    for g in left_labels:
        gv = _variants(g.stem)
        cands = [p for p in left_preds if id(p) not in used and pv[id(p)] & gv]
        if len(cands) > 1:
            raise ValueError(
                f"ground truth {g.path} matches several predictions: {', '.join(str(p.path) for p in cands)}."
            )
        if cands:
            pairs.append((cands[0], g))
            used.add(id(cands[0]))
        else:
            unmatched_labels.append(g)
    unmatched_preds = [p for p in preds if id(p) not in used]
    label_is_datalist = label_src.suffix.lower() == ".json"
    # from here on the sources are named as the messages name them (str)
    pred_src, label_src = _described(pred_src, datalist_key), _described(label_src, datalist_key)  # type: ignore[assignment]
    skipped = []
    if only_predicted and not unmatched_preds:
        if not pairs:
            raise ValueError(f"no prediction in {pred_src} matches a ground truth in {label_src}: nothing to evaluate.")
        skipped, unmatched_labels = unmatched_labels, []
    if unmatched_labels or unmatched_preds:
        msg = []
        if unmatched_labels:
            msg.append(
                f"{len(unmatched_labels)} ground-truth case(s) from {label_src} have no prediction in {pred_src}: "
                + ", ".join(g.path.name for g in unmatched_labels)
            )
        if unmatched_preds:
            msg.append(
                f"{len(unmatched_preds)} prediction(s) in {pred_src} match no ground truth in {label_src}: "
                + ", ".join(p.path.name for p in unmatched_preds)
            )
        hint = (
            " To evaluate only the cases that have a prediction (a test subset against a folder of all the "
            "labels), add --only-predicted."
            if unmatched_labels and not unmatched_preds
            else ""
        )
        if unmatched_preds and label_is_datalist:
            hint += " A datalist is read for one list: --split test|validation|training chooses it."
        raise ValueError(
            "; ".join(msg) + ". Names match after removing .nii/.nii.gz, a '_0000' channel suffix, a "
            "'_pred'/'_seg'/'_label'/'_gt' suffix and an 'img'/'image'/'label'/'seg'/'pred' prefix." + hint
        )
    return pairs, skipped


def _load(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    try:
        img: Any = nib.load(str(path))  # nibabel types load() as a FileBasedImage, without dataobj and affine
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # not NIfTI, truncated, corrupt gzip: name the file
        raise ValueError(f"{what} file {path} is unreadable ({type(e).__name__}: {e}).") from None
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) as some writers store label maps
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{what} file {path} has shape {data.shape}; expected a 3D label map.")
    return as_label_map(data, f"{what} file {path}"), np.asarray(img.affine, dtype=float)


def _check_geometry(pred_path: Path, pred_shape, pred_aff, label_path: Path, label_shape, label_aff) -> None:
    if tuple(pred_shape) != tuple(label_shape):
        raise ValueError(
            f"prediction {pred_path} has shape {tuple(pred_shape)} but ground truth {label_path} has shape "
            f"{tuple(label_shape)}; predictions must be in the ground truth's original geometry."
        )
    diff = np.abs(pred_aff - label_aff)
    if diff.max() > AFFINE_TOL_MM:
        i, j = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise ValueError(
            f"prediction {pred_path} and ground truth {label_path} have different affines (largest difference "
            f"{diff.max():.4g} at [{i}, {j}], tolerance {AFFINE_TOL_MM} mm).\nprediction affine:\n"
            f"{np.array2string(pred_aff, precision=4)}\nground-truth affine:\n{np.array2string(label_aff, precision=4)}"
        )


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None and NumPy scalars -> Python, so that json.dumps(allow_nan=False) never fails."""
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _csv_text(cases: Mapping[str, Mapping[str, Mapping]], classes: Mapping[int, str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", "name", "dice", "hd95", "surface_dice", "assd", "status"])
    for case, per_label in cases.items():
        for v, name in classes.items():
            e = per_label[str(v)]
            cell = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731 - empty cell = undefined
            w.writerow(
                [
                    case,
                    v,
                    name,
                    cell(e["dice"]),
                    cell(e["hd95"]),
                    cell(e.get("surface_dice")),
                    cell(e.get("assd")),
                    e["status"],
                ]
            )
    return buf.getvalue()


def _datalist_labels(label_src: Path) -> tuple[dict[int, str], str] | None:
    """The ``labels`` of the datalist or dataset.json behind the ground truth: the JSON given, or a
    ``dataset.json`` in the ground-truth folder or the folder above it (nnU-Net's ``labelsTr/..``)."""
    if label_src.suffix.lower() == ".json":
        candidates = [label_src]
    else:
        folder = label_src if label_src.is_dir() else label_src.parent
        candidates = [folder / "dataset.json", folder.parent / "dataset.json"]
    for js in candidates:
        if not js.is_file():
            continue
        try:
            raw = json.loads(js.read_text()).get("labels")
        except (json.JSONDecodeError, AttributeError):
            continue  # an unreadable datalist given as ground truth is reported by _collect
        try:
            labels = _parse_labels(raw, str(js))
        except DataError as e:
            raise ValueError(f"{e}; pass --classes NAME=VALUE,... instead") from None
        named = classes_from_labels(labels)
        if named:
            return named, f"the labels of {js}"
    return None


def _checkpoint_labels(pred_items: list[_Item]) -> tuple[dict[int, str], str] | None:
    """The checkpoint's classes as ``medhpm predict`` wrote them beside the first prediction (``CASE.ctbl``)."""
    for it in pred_items[:1]:
        ctbl = color_table_paths(it.path)[0]
        if ctbl.is_file():
            named = classes_from_labels({v: name for v, (name, _) in read_slicer_ctbl(ctbl).items()})
            if named:
                return named, f"the checkpoint's classes in {ctbl} (written by medhpm predict)"
    return None


def _present(arr: np.ndarray) -> set[int]:
    counts = np.bincount(arr.ravel()) if arr.size else np.zeros(1, int)
    return {int(v) for v in np.flatnonzero(counts) if v > 0}


def evaluate_predictions(
    pred: str | Path,
    label: str | Path,
    classes: str | Mapping | None,
    out_dir: str | Path,
    datalist_key: str = "test",
    *,
    method: str | None = None,
    surface_tolerance_mm: float = FinetuneConfig.surface_tolerance_mm,
    only_predicted: bool = False,
) -> dict:
    """Per-case, per-organ Dice and HD95 (mm) of predictions against ground truth; writes the result files.

    Args:
        pred: a NIfTI label map, a folder of them, or a datalist JSON (entries' ``"pred"``, else ``"label"``).
        label: ground truth, in the same three forms; in a datalist the ``"label"`` of each entry of
            ``datalist_key`` is read (paths relative to the JSON's folder) and the case is named by the
            entry's ``"case"`` if given, else after its ``"image"``, so predictions named after the images
            (as ``medhpm predict`` writes them) match.
        classes: anything ``parse_classes`` takes (``"btcv8"``, ``"btcv13"``, ``"spleen=1,liver=6"``, a dict);
            a value that appears in no prediction and no ground truth is a ValueError (a typo, or the wrong
            numbering). None: the names of the ground truth's datalist / ``dataset.json`` ``labels``, else
            the checkpoint's classes from the colour table ``medhpm predict`` wrote beside the predictions,
            else every label value found, named ``class_<value>``; never BTCV names unless the data names
            them. metrics.json says which under ``"classes_source"``.
        out_dir: folder for ``metrics.json``, ``metrics.csv`` and ``table.md`` (each written atomically).
        datalist_key: which list of a datalist JSON to evaluate.
        method: row name in table.md (default: the name of ``pred``).
        surface_tolerance_mm: tolerance of the normalised surface Dice (default: the config's
            ``finetune.surface_tolerance_mm``); ASSD needs none.
        only_predicted: evaluate the ground-truth cases that have a prediction and skip the others (a test
            subset against a folder of all the labels, as nnU-Net's evaluation does); metrics.json lists the
            skipped ones under ``"not_evaluated"``. A prediction without ground truth stays an error.

    Matching rule: two files given directly are paired whatever their names. Otherwise cases pair by file name
    without ``.nii.gz``/``.nii``: exact names first, then names equal after removing any of a ``_0000``
    channel suffix (nnU-Net images), a ``_pred``/``_seg``/``_label``/``_gt`` suffix and an ``img``/``image``/
    ``label``/``seg``/``pred`` prefix (BTCV: ``img0001`` <-> ``label0001``, case ``0001``). Unmatched or
    ambiguous files on either side raise ValueError listing them, before anything is computed (with
    ``only_predicted``, ground truths without a prediction are skipped instead). In a
    prediction folder, ``*_probs.nii.gz`` (probability maps written by the predictor) are skipped.

    Each pair must have the same shape and affine (within 1e-3), else ValueError naming both files.

    Returns:
        the content of metrics.json: ``{"classes": {"1": "spleen", ...}, "cases": {case: {"1": {"dice", "hd95",
        "status"}}}, "summary": {"1": {...}, "mean": {...}}, "conventions": {...}}``, with None for undefined
        values (see ``metrics.CONVENTIONS``).
    """
    tolerance = check_tolerance(surface_tolerance_mm)
    pred_src, label_src, out_dir = Path(pred), Path(label), Path(out_dir)
    pred_items = _collect(pred_src, datalist_key, "pred")
    label_items = _collect(label_src, datalist_key, "label")
    refuse_overwriting_inputs(
        [out_dir] + [out_dir / n for n in ("metrics.json", "metrics.csv", "table.md")],
        [pred_src, label_src] + [it.path for it in pred_items + label_items],
        hint="choose another output folder with -o",
    )
    pairs, skipped = _match(pred_items, label_items, pred_src, label_src, only_predicted, datalist_key)
    table: dict[int, str] | None
    if classes is not None:
        table, source = parse_classes(classes), "given (--classes)"
    else:
        table, source = _datalist_labels(label_src) or _checkpoint_labels(pred_items) or (None, "")

    names = [_case_name(g) for _, g in pairs]
    if len(set(names)) != len(names):  # short names collide: keep the full stems
        names = [g.stem for _, g in pairs]
    order = sorted(range(len(pairs)), key=lambda i: names[i])

    cases: dict[str, dict[int | str, dict]] = {}
    present: set[int] = set()
    for i in order:
        p, g = pairs[i]
        label_arr, label_aff = _load(g.path, "ground truth")
        pred_arr, pred_aff = _load(p.path, "prediction")
        _check_geometry(p.path, pred_arr.shape, pred_aff, g.path, label_arr.shape, label_aff)
        spacing = np.linalg.norm(label_aff[:3, :3], axis=0)  # mm per voxel along each array axis
        here = _present(pred_arr) | _present(label_arr)
        present |= here
        wanted = table if table is not None else {v: value_name(v) for v in here}
        per_label = compute_case_metrics(pred_arr, label_arr, spacing, wanted, tolerance) if wanted else {}
        cases[names[i]] = {str(v): m for v, m in per_label.items()}

    if table is None:  # named by value: every value found in a prediction or a ground truth
        if not present:
            raise ValueError(
                f"no label value other than 0 in any prediction ({pred_src}) or ground truth "
                f"({label_src}): nothing to evaluate."
            )
        table, source = {v: value_name(v) for v in sorted(present)}, "the label values found (no names given)"
        for case_labels in cases.values():  # a value this case lacks on both sides is absent in it
            for v in table:
                case_labels.setdefault(
                    str(v),
                    {"dice": math.nan, "hd95": math.nan, "status": ABSENT, "surface_dice": math.nan, "assd": math.nan},
                )
            case_labels.update({k: case_labels.pop(k) for k in sorted(case_labels, key=int)})
    elif classes is not None:
        unseen = [f"{v} ({n})" for v, n in table.items() if v not in present]
        if unseen:
            raise ValueError(
                f"--classes names label value(s) {', '.join(unseen)} that appear in no prediction ({pred_src}) and "
                f"no ground truth ({label_src}); the values found are {sorted(present) or 'none'}. Check the "
                "numbering, or leave --classes out to take the names from the datalist."
            )
    classes = table

    metrics = _json_safe(
        {
            "classes": {str(v): n for v, n in classes.items()},
            "classes_source": source,
            "surface_tolerance_mm": tolerance,
            "cases": cases,
            "not_evaluated": sorted(_case_name(g) for g in skipped),
            "summary": summarize(cases, classes),
            "conventions": CONVENTIONS,
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "metrics.csv", _csv_text(metrics["cases"], classes))
    row_name = method or strip_nifti_ext(pred_src.name) or "prediction"
    table_md = paper_table({row_name: metrics["summary"]}, classes, surface_tolerance_mm=tolerance)
    label_summaries = [metrics["summary"][str(v)] for v in classes]
    n_missed = sum(s["n_missed"] for s in label_summaries)
    n_fp = sum(s["n_false_positive"] for s in label_summaries)
    note = (
        f"\nDSC in %, HD95 in mm; NSD (normalised surface Dice at {tolerance:g} mm) in %, ASSD in mm; "
        f"{len(cases)} case(s)"
        + (
            f" ({len(skipped)} ground-truth case(s) without a prediction not evaluated: --only-predicted)"
            if skipped
            else ""
        )
        + f"; Avg = mean over the organs shown (classes: {source}). "
        f"Organ instances missed: {n_missed}, false positive: {n_fp} (Dice and NSD 0, no HD95 or ASSD, so not "
        'in their means); organs absent from both are left out. See "conventions" in metrics.json.\n'
    )
    atomic_write_text(out_dir / "table.md", table_md + note)
    return metrics
