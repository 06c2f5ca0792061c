"""Datalist readers: MSD/decathlon JSON, nnU-Net raw folders, the BTCV download, plain folders.

Every reader returns the same *normalised datalist*::

    {
      "name": str,                      # data set name
      "labels": {int: str},             # label value -> organ name (may be empty)
      "training":   [{"image": abs_path, "label": abs_path (optional), "case": str}, ...],
      "validation": [...],
      "test":       [...],
      "source": str,                    # what was read (file or folder, absolute)
      "format": str,                    # msd | nnunet | btcv | folder
      "split": str | None,              # BTCV only: transunet | monai; None elsewhere
      "root": str,                      # folder that relative paths are relative to
    }

An "image" is a NIfTI file (.nii / .nii.gz) or a folder holding one DICOM series. Problems with a
datalist raise :class:`DataError`, whose message names the datalist file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, cast

from medhpm.data.labels import BTCV_LABELS
from medhpm.data.scans import case_name, find_scans, is_nifti
from medhpm.runtime.files import atomic_write_text

__all__ = [
    "DataError",
    "BTCV_SPLITS",
    "SPLITS",
    "read_msd",
    "read_nnunet",
    "read_btcv",
    "read_folder",
    "load_datalist",
    "detect_format",
    "write_datalist",
    "split_validation",
    "choose_labelled",
    "finetune_cases",
]

SPLITS = ("training", "validation", "test")


class DataError(ValueError):
    """A data set, datalist or image that cannot be used; the message names the file and the problem."""


def root_cause(e: BaseException) -> BaseException:
    """The exception under MONAI's ``RuntimeError("applying transform ...")`` wrappers."""
    seen = set()
    while (
        isinstance(e, RuntimeError)
        and str(e).startswith("applying transform")
        and e.__cause__ is not None
        and id(e) not in seen
    ):
        seen.add(id(e))
        e = e.__cause__
    return e


def case_error(e: BaseException, item: Any) -> DataError:
    """A :class:`DataError` for a datalist entry whose chain failed: the cause's own message when it is a
    DataError (it names the file), else the case's files and the cause."""
    root = root_cause(e)
    if isinstance(root, DataError):
        return DataError(str(root))
    files = ""
    if isinstance(item, dict):
        files = ", ".join(f"{k} {item[k]}" for k in ("image", "label") if isinstance(item.get(k), str))
        case = item.get("case")
        files = f"case {case} ({files})" if case else files
    first = (str(root).strip().splitlines() or [""])[0]
    return DataError(f"cannot prepare {files or 'a case'}: {type(root).__name__}: {first}")


# --------------------------------------------------------------------------------------------------
# BTCV: the two published splits (docs/reproduce_btcv.md); the label table is medhpm.data.labels


# TransUNet's 18/12 split (the paper's Table 1); MONAI's 24/6 split (cases 1-10 and 21-34 vs 35-40).
BTCV_SPLITS: dict[str, dict[str, tuple[int, ...]]] = {
    "transunet": {
        "training": (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40),
        "validation": (),
        "test": (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38),
    },
    "monai": {"training": tuple(range(1, 11)) + tuple(range(21, 35)), "validation": tuple(range(35, 41)), "test": ()},
}


# --------------------------------------------------------------------------------------------------
# Helpers shared by the readers


def _norm(path: Path) -> str:
    # normpath, not resolve(): a data folder reached through a symlink must keep its user-visible path
    return os.path.normpath(str(path.expanduser().absolute()))


def _parse_labels(raw: Any, where: str) -> dict[int, str]:
    """Label table as {int: name}; accepts MSD style {"0": "background"}, nnU-Net style {"background": 0}
    and a plain list of names."""
    if raw is None or raw == {} or raw == []:
        return {}
    if isinstance(raw, list):
        return {i: str(n) for i, n in enumerate(raw)}
    if not isinstance(raw, dict):
        raise DataError(f"{where}: 'labels' must be a mapping, not {type(raw).__name__}")

    def as_int(v: Any) -> Optional[int]:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
            return int(v)
        return None

    out: dict[int, str]
    if all(as_int(k) is not None for k in raw):  # value -> name
        out = {cast(int, as_int(k)): str(v) for k, v in raw.items()}
    else:  # name -> value (nnU-Net)
        bad = {k: v for k, v in raw.items() if as_int(v) is None}
        if bad:
            k, v = next(iter(bad.items()))
            kind = "a region (list of values)" if isinstance(v, (list, tuple)) else repr(v)
            raise DataError(
                f"{where}: label {k!r} maps to {kind}; only one integer value per label is supported "
                "(region-based nnU-Net labels are not)"
            )
        out = {cast(int, as_int(v)): str(k) for k, v in raw.items()}
    if any(v < 0 for v in out):
        raise DataError(f"{where}: label values must be >= 0, got {sorted(out)}")
    return dict(sorted(out.items()))


def _unique_case_names(datalist: dict) -> None:
    """Give every entry a unique 'case' name (they name prediction files and log rows)."""
    entries = [e for s in SPLITS for e in datalist[s]]
    root = datalist.get("root") or "/"
    uses: dict[str, list[str]] = {}
    for s in SPLITS:
        for i, e in enumerate(datalist[s]):
            uses.setdefault(e["image"], []).append(f"{s}[{i}]")
    twice = {p: u for p, u in uses.items() if len(u) > 1}
    if twice:
        listing = "\n  ".join(f"{p}: {', '.join(u)}" for p, u in list(twice.items())[:20])
        raise DataError(
            f"{datalist['source']}: {len(twice)} image(s) listed more than once (in two splits "
            f"this leaks evaluation data into training):\n  {listing}"
        )
    seen: dict[str, int] = {}
    for e in entries:
        seen[e["case"]] = seen.get(e["case"], 0) + 1
    for e in entries:
        if seen[e["case"]] > 1:  # e.g. case1/ct.nii.gz and case2/ct.nii.gz: use the relative path
            e["case"] = case_name(e["image"], root)
    by_name: dict[str, list[str]] = {}
    for e in entries:
        by_name.setdefault(e["case"], []).append(e["image"])
    dup = {n: imgs for n, imgs in sorted(by_name.items()) if len(imgs) > 1}
    if dup:  # e.g. case.nii and case.nii.gz: one prediction file, one log row for two scans
        listing = "\n  ".join(f"{n}: {' and '.join(imgs)}" for n, imgs in list(dup.items())[:10])
        raise DataError(
            f"{datalist['source']}: {len(dup)} case name(s) are given to more than one scan (their "
            f"predictions would overwrite each other); rename or move one of each:\n  {listing}"
        )


def _check_paths_exist(datalist: dict, where: str) -> None:
    missing = []
    for split in SPLITS:
        for e in datalist[split]:
            for key in ("image", "label"):
                p = e.get(key)
                if p is not None and not os.path.exists(p):
                    missing.append(f"{split}/{e['case']} {key}: {p}")
    if missing:
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DataError(
            f"{where}: {len(missing)} referenced file(s) do not exist:\n  " + "\n  ".join(missing[:20]) + more
        )


def _finish(datalist: dict, where: str, check_paths: bool) -> dict:
    _unique_case_names(datalist)
    if not datalist["training"]:
        raise DataError(f"{where}: the datalist has no training cases")
    if check_paths:
        _check_paths_exist(datalist, where)
    return datalist


def _new(name: str, labels: dict, source: str, fmt: str, root: str, split: Optional[str] = None) -> dict:
    return {
        "name": name,
        "labels": labels,
        "training": [],
        "validation": [],
        "test": [],
        "source": source,
        "format": fmt,
        "split": split,
        "root": root,
    }


# --------------------------------------------------------------------------------------------------
# MSD / MONAI decathlon datalist JSON


def read_msd(json_path: str | os.PathLike, check_paths: bool = True) -> dict:
    """Read an MSD/decathlon datalist JSON; relative paths are relative to the JSON's folder.

    Entries are ``{"image": ..., "label": ...}`` or plain path strings (MSD's ``"test"`` list). A
    relative path that leads out of the JSON's folder (``../``) is an error; absolute paths are allowed
    but must exist (when ``check_paths``).
    """
    path = Path(json_path).expanduser()
    where = f"datalist {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: must hold a JSON object with 'training' (and optionally 'validation', "
            f"'test', 'labels'), not a {type(obj).__name__}"
        )
    for key in ("modality", "channel_names"):
        chans = obj.get(key)
        if isinstance(chans, dict) and len(chans) > 1:
            raise DataError(
                f"{where}: {len(chans)} input channels ({key} {chans}); medhpm supports single-channel CT only"
            )
    root = Path(_norm(path.parent))
    labels = _parse_labels(obj.get("labels"), where)
    # a datalist written by write_datalist keeps the BTCV split it was made from
    prov = cast(dict, obj.get("medhpm")) if isinstance(obj.get("medhpm"), dict) else {}
    dl = _new(str(obj.get("name") or path.parent.name), labels, _norm(path), "msd", str(root), prov.get("split"))
    escaping = []

    def resolve(p: Any, at: str) -> str:
        if isinstance(p, (list, tuple)):
            raise DataError(
                f"{where}: {at} lists {len(p)} files (several channels); medhpm supports single-channel CT only"
            )
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{where}: {at} must be a path string, got {p!r}")
        q = Path(p).expanduser()
        if q.is_absolute():
            return _norm(q)
        full = os.path.normpath(str(root / q))
        if os.path.commonpath([full, str(root)]) != str(root):
            escaping.append(f"{at}: {p!r}")
        return full

    for split in SPLITS:
        raw = obj.get(split, [])
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise DataError(f"{where}: '{split}' must be a list, not {type(raw).__name__}")
        for i, item in enumerate(raw):
            at = f"{split}[{i}]"
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or "image" not in item:
                raise DataError(f"{where}: {at} must be a path or an object with an 'image' key, got {item!r}")
            entry = {"image": resolve(item["image"], at + ".image")}
            if item.get("label") not in (None, ""):
                entry["label"] = resolve(item["label"], at + ".label")
            entry["case"] = str(item["case"]) if item.get("case") else case_name(entry["image"])
            dl[split].append(entry)
    if escaping:
        raise DataError(
            f"{where}: {len(escaping)} relative path(s) lead out of the datalist's folder {root} "
            "(use paths inside it, or absolute paths):\n  " + "\n  ".join(escaping[:20])
        )
    return _finish(dl, where, check_paths)


# --------------------------------------------------------------------------------------------------
# nnU-Net raw folder


def read_nnunet(folder: str | os.PathLike, check_paths: bool = True) -> dict:
    """Read an nnU-Net (v2) raw data set folder: imagesTr/CASE_0000<ext>, labelsTr/CASE<ext>, imagesTs/."""
    folder = Path(folder).expanduser()
    dj = folder / "dataset.json"
    where = f"nnU-Net dataset {dj}"
    if not dj.is_file():
        raise DataError(f"nnU-Net dataset {folder}: no dataset.json in the folder")
    try:
        meta = json.loads(dj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: must hold a JSON object")
    chans = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if not isinstance(chans, dict) or len(chans) != 1:
        raise DataError(
            f"{where}: {len(chans) if isinstance(chans, dict) else '?'} input channels "
            f"(channel_names {chans}); medhpm supports single-channel CT only"
        )
    fe = str(meta.get("file_ending", ".nii.gz"))
    if fe not in (".nii.gz", ".nii"):
        raise DataError(f"{where}: file_ending {fe!r} is not supported; medhpm reads NIfTI (.nii.gz, .nii)")
    labels = _parse_labels(meta.get("labels"), where)
    root = Path(_norm(folder))
    dl = _new(str(meta.get("name") or folder.name), labels, str(root), "nnunet", str(root))

    img_tr, lab_tr = root / "imagesTr", root / "labelsTr"
    if not img_tr.is_dir():
        raise DataError(f"{where}: no imagesTr folder")

    def cases_in(images: Path) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        if not images.is_dir():
            return found
        for p in sorted(images.iterdir()):
            if p.name.startswith(".") or not p.name.endswith(fe):
                continue
            m = re.fullmatch(r"(.+)_(\d{4})" + re.escape(fe), p.name)
            if not m:
                raise DataError(f"{where}: {p.name} in {images.name} does not follow CASE_XXXX{fe}")
            found.setdefault(m.group(1), []).append(m.group(2))
        return found

    tr = cases_in(img_tr)
    multi = [c for c, ch in tr.items() if ch != ["0000"]]
    if multi:
        raise DataError(
            f"{where}: cases with channels other than _0000 ({', '.join(multi[:5])}); medhpm "
            "supports single-channel CT only"
        )
    label_cases = sorted(case_name(p) for p in lab_tr.glob("*" + fe)) if lab_tr.is_dir() else []
    no_image = [c for c in label_cases if c not in tr]
    if no_image:
        raise DataError(f"{where}: labels without an image in imagesTr: {', '.join(no_image[:20])}")
    num = meta.get("numTraining")
    if num is not None and int(num) != len(tr):
        raise DataError(f"{where}: numTraining is {num} but imagesTr holds {len(tr)} cases")
    for case in sorted(tr):
        entry = {"image": str(img_tr / f"{case}_0000{fe}"), "case": case}
        lab = lab_tr / f"{case}{fe}"
        if lab.exists():
            entry["label"] = str(lab)
        dl["training"].append(entry)
    ts = cases_in(root / "imagesTs")
    for case in sorted(ts):
        entry = {"image": str(root / "imagesTs" / f"{case}_0000{fe}"), "case": case}
        lab = root / "labelsTs" / f"{case}{fe}"
        if lab.exists():
            entry["label"] = str(lab)
        dl["test"].append(entry)
    return _finish(dl, where, check_paths)


# --------------------------------------------------------------------------------------------------
# BTCV download

_BTCV_SUBDIRS = ("", "Training", "RawData/Training", "Abdomen/RawData/Training", "RawData")


def _btcv_root(folder: Path) -> Optional[Path]:
    for sub in _BTCV_SUBDIRS:
        cand = folder / sub if sub else folder
        if (cand / "img").is_dir() and (cand / "label").is_dir():
            return cand
    return None


def read_btcv(folder: str | os.PathLike, split: str = "transunet", check_paths: bool = True) -> dict:
    """Read the BTCV download (img/img0001.nii.gz, label/label0001.nii.gz, possibly under
    RawData/Training/) with one of the published splits.

    ``split="transunet"``: "training" = the 18 training cases, "test" = the 12 test cases (paper, Table 1).
    ``split="monai"``: "training" = cases 1-10 and 21-34, "validation" = cases 35-40.
    Cases of the split that are missing from the folder are an error that lists them.
    """
    folder = Path(folder).expanduser()
    if split not in BTCV_SPLITS:
        raise DataError(f"BTCV {folder}: unknown split {split!r}; use one of {', '.join(BTCV_SPLITS)}")
    base = _btcv_root(folder)
    if base is None:
        raise DataError(
            f"BTCV {folder}: no img/ and label/ folders (looked in "
            + ", ".join(str(folder / s) if s else str(folder) for s in _BTCV_SUBDIRS)
            + ")"
        )
    base = Path(_norm(base))
    where = f"BTCV {base}"
    dl = _new("BTCV", dict(BTCV_LABELS), _norm(folder), "btcv", str(base), split=split)
    missing = []
    for part, ids in BTCV_SPLITS[split].items():
        for i in ids:
            img = base / "img" / f"img{i:04d}.nii.gz"
            lab = base / "label" / f"label{i:04d}.nii.gz"
            for p in (img, lab):
                if not p.exists():
                    missing.append(f"{p.parent.name}/{p.name}")
            dl[part].append({"image": str(img), "label": str(lab), "case": f"img{i:04d}"})
    if missing:
        raise DataError(f"{where}: {len(missing)} file(s) of the {split} split are missing: " + ", ".join(missing))
    return _finish(dl, where, check_paths)


# --------------------------------------------------------------------------------------------------
# Plain folder (label-free, for pre-training)


def read_folder(folder: str | os.PathLike, check_paths: bool = True) -> dict:
    """All NIfTI files and DICOM series under ``folder`` (recursively) as unlabelled "training" cases.

    A DICOM series is a folder holding DICOM files (detected by the 'DICM' marker at byte 128, so
    extension-less files count); ``folder`` itself may be one. A single NIfTI file is accepted too.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"folder {folder}: does not exist")
    root = Path(_norm(folder if folder.is_dir() else folder.parent))
    dl = _new(folder.name if folder.is_dir() else case_name(folder.name), {}, _norm(folder), "folder", str(root))
    if folder.is_file():
        if not is_nifti(folder):
            raise DataError(f"{folder}: not a NIfTI file (.nii/.nii.gz) or a folder")
        dl["training"].append({"image": _norm(folder), "case": case_name(folder.name)})
        return _finish(dl, f"folder {folder}", check_paths)

    for path, name in find_scans(root):
        dl["training"].append({"image": path, "case": name})
    if not dl["training"]:
        raise DataError(f"folder {root}: no NIfTI files (.nii, .nii.gz) or DICOM series found")
    return _finish(dl, f"folder {root}", check_paths)


# --------------------------------------------------------------------------------------------------
# Dispatch


def detect_format(source: str | os.PathLike) -> str:
    """msd | nnunet | btcv | folder, from the layout of ``source``."""
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"data source {source}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "msd"
        return "folder"
    dj = p / "dataset.json"
    if dj.is_file():
        try:
            meta = json.loads(dj.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        # An MSD task folder also has dataset.json + imagesTr, but its JSON lists the cases itself
        if isinstance(meta, dict) and "training" in meta:
            return "msd"
        if (p / "imagesTr").is_dir():
            return "nnunet"
    if _btcv_root(p) is not None:
        return "btcv"
    return "folder"


def load_datalist(
    source: str | os.PathLike, format: str = "auto", split: str = "transunet", check_paths: bool = True
) -> dict:
    """Read any supported data source into the normalised datalist (see the module docstring).

    ``format``: auto | msd | nnunet | btcv | folder. ``split`` applies to BTCV only. With
    ``check_paths`` every referenced file must exist (the data check turns it off to list them per file).
    """
    fmt = detect_format(source) if format == "auto" else format
    p = Path(source).expanduser()
    if fmt == "msd":
        return read_msd(p / "dataset.json" if p.is_dir() else p, check_paths=check_paths)
    if fmt == "nnunet":
        return read_nnunet(p, check_paths=check_paths)
    if fmt == "btcv":
        return read_btcv(p, split=split, check_paths=check_paths)
    if fmt == "folder":
        return read_folder(p, check_paths=check_paths)
    raise DataError(f"data source {source}: unknown format {format!r}; use auto, msd, nnunet, btcv or folder")


# --------------------------------------------------------------------------------------------------
# Writing and splitting


def write_datalist(datalist: dict, out_json: str | os.PathLike) -> Path:
    """Write ``datalist`` as MSD-style JSON (atomically), paths relative to ``out_json``'s folder where
    they lie inside it and absolute otherwise (a relative path may not leave the folder)."""
    out = Path(out_json).expanduser()
    root = _norm(out.parent)

    def rel(p: str) -> str:
        p = os.path.normpath(p)
        if os.path.commonpath([p, root]) == root and p != root:
            return os.path.relpath(p, root).replace(os.sep, "/")
        return p

    obj: dict[str, Any] = {
        "name": datalist.get("name", ""),
        "labels": {str(k): v for k, v in sorted(datalist.get("labels", {}).items())},
        "medhpm": {"source": datalist.get("source"), "format": datalist.get("format"), "split": datalist.get("split")},
    }
    for split in SPLITS:
        rows = []
        for e in datalist.get(split, []):
            row = {"image": rel(e["image"])}
            if e.get("label"):
                row["label"] = rel(e["label"])
            row["case"] = e["case"]
            rows.append(row)
        obj[split] = rows
    return atomic_write_text(out, json.dumps(obj, indent=2) + "\n")


def split_validation(training_entries: list[dict], n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split ``training_entries`` into (train, val) with ``n_val`` validation cases drawn from them.

    The choice depends only on the case names and the seed (not on the listing order or the Python
    version): cases are ranked by a hash of ``seed:case``. Both lists keep the input order.
    """
    entries = list(training_entries)
    if n_val <= 0:
        return entries, []
    if n_val >= len(entries):
        raise DataError(
            f"cannot keep {n_val} validation case(s) out of {len(entries)} training case(s): at least one "
            "must remain for training (lower data.val_cases)"
        )

    chosen = _drawn(entries, n_val, f"{seed}")
    return [e for e in entries if id(e) not in chosen], [e for e in entries if id(e) in chosen]


def _drawn(entries: list[dict], n: int, salt: str) -> set[int]:
    """``id()`` of the ``n`` entries first in the order of a hash of ``salt:case``: a draw that depends only
    on the case names and the salt, not on the listing order or the Python version."""

    def rank(e: dict) -> str:
        return hashlib.sha256(f"{salt}:{e.get('case') or e['image']}".encode()).hexdigest()

    return {id(e) for e in sorted(entries, key=rank)[:n]}


def choose_labelled(train_entries: list[dict], k: int, seed: int = 0) -> list[dict]:
    """The ``k`` training cases whose labels fine-tuning learns from (label-efficiency runs); ``k = 0``
    keeps them all.

    Call it on the training cases left after :func:`split_validation`, so a validation or test case is never
    chosen. Like the validation split, the choice depends only on the case names and the seed (ranked by a
    hash of ``labelled:seed:case``, another draw than the validation split's): every method run with the
    same seed learns from the same cases. The result keeps the input order.
    """
    entries = list(train_entries)
    if k <= 0:
        return entries
    if k > len(entries):
        raise DataError(
            f"config key 'finetune.labelled_cases' ({k}) asks for more labelled cases than the {len(entries)} "
            "training case(s) left after the validation split; lower it, or 0 for all"
        )

    chosen = _drawn(entries, k, f"labelled:{seed}")
    return [e for e in entries if id(e) in chosen]


def finetune_cases(
    datalist: dict, val_cases: int, labelled_cases: int = 0, seed: int = 0
) -> tuple[list[dict], list[dict], int]:
    """The cases fine-tuning learns from and validates on: ``(train, val, n)``, ``n`` the training cases
    before the ``labelled_cases`` draw.

    Validation: the datalist's own labelled ``validation`` split when it has one (a split the user chose,
    disjoint from ``test``), else ``val_cases`` drawn from the training cases (:func:`split_validation`);
    then ``labelled_cases`` of the rest (:func:`choose_labelled`; 0 keeps them all). The fine-tuning
    trainer and the frozen-encoder probe both choose their cases here.
    """
    given = [e for e in datalist.get("validation", []) if "label" in e]
    if given:
        train, val = list(datalist["training"]), given
    else:
        train, val = split_validation(datalist["training"], val_cases, seed=seed)
    return choose_labelled(train, labelled_cases, seed=seed), val, len(train)
