"""``medhpm data check``: read every case of a data set and report what would break or mislead training.

Errors make a case unusable (missing or unreadable file, 2D/4D image, image and label on different
grids, non-integer or undeclared label values, NaN/inf, a constant image, implausible voxel spacing,
values far outside any CT range, the same scan in two splits). Warnings do not (intensities that do not
look like HU, scans smaller than the ROI at the target spacing, which get padded). The rules for one
volume's values and spacing are :mod:`medhpm.data.volume_checks`, which the loader applies too. Every problem is
listed, not only the first. Files are read with the same loader as the training chains
(:func:`medhpm.data.ct_reader.load_image`), reoriented to RAS so that a DICOM series and its NIfTI label map
are compared in world space.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medhpm.data.datalist import SPLITS, DataError, load_datalist
from medhpm.data.ct_reader import load_image
from medhpm.data.volume_checks import (
    HU_LIMITS,
    SPACING_LIMITS,
    grid_problem,
    image_problems,
    label_problems,
    spacing_of,
)

__all__ = ["Finding", "CheckReport", "check_dataset", "HU_LIMITS", "SPACING_LIMITS"]


@dataclass
class Finding:
    severity: str  # "error" (case unusable) | "warning"
    split: str  # training | validation | test | "" (whole data set)
    case: str
    file: str
    problem: str

    def line(self) -> str:
        where = f"{self.split}/{self.case}" if self.case else "data set"
        return f"{self.severity.upper():7s} {where}: {self.file}: {self.problem}"


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`: ``findings`` (all problems), per-case ``cases`` and a ``summary``."""

    source: str
    data_format: str = ""
    findings: list[Finding] = field(default_factory=list)
    cases: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def add(self, severity: str, split: str, case: str, file: str, problem: str) -> None:
        self.findings.append(Finding(severity, split, case, str(file), problem))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def unusable(self) -> list[tuple[str, str]]:
        """(split, case) of the cases with at least one error."""
        seen: list[tuple[str, str]] = []
        for f in self.errors:
            if f.case and (f.split, f.case) not in seen:
                seen.append((f.split, f.case))
        return seen

    @property
    def ok(self) -> bool:
        """False when any case (or the data set itself) has an error."""
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.data_format,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "unusable_cases": [f"{s}/{c}" for s, c in self.unusable],
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "cases": self.cases,
            "summary": self.summary,
        }

    def format(self) -> str:
        """Human-readable report: summary, then every error and warning, then the verdict."""
        s = self.summary
        lines = [f"data check: {self.source}" + (f" (format {self.data_format})" if self.data_format else "")]
        if s:
            counts = s.get("cases", {})
            lab = s.get("labelled", {})
            lines.append("cases: " + ", ".join(f"{k} {counts.get(k, 0)} ({lab.get(k, 0)} labelled)" for k in SPLITS))
            if s.get("spacing_mm"):
                lo, hi = s["spacing_mm"]["min"], s["spacing_mm"]["max"]
                lines.append(
                    "spacing (mm, RAS axes): " + ", ".join(f"{ax} {a:.3g}-{b:.3g}" for ax, a, b in zip("xyz", lo, hi))
                )
            if s.get("shape"):
                lo, hi = s["shape"]["min"], s["shape"]["max"]
                lines.append("size (voxels): " + ", ".join(f"{ax} {a}-{b}" for ax, a, b in zip("xyz", lo, hi)))
            if s.get("shape_at_target"):
                lo, hi = s["shape_at_target"]["min"], s["shape_at_target"]["max"]
                lines.append(
                    f"size at {tuple(s['target_spacing'])} mm: "
                    + ", ".join(f"{ax} {a}-{b}" for ax, a, b in zip("xyz", lo, hi))
                    + f" (ROI {tuple(s['roi'])})"
                )
            if s.get("intensity"):
                lines.append(f"intensity: {s['intensity']['min']:.1f} to {s['intensity']['max']:.1f}")
            if s.get("labels"):
                lines.append("label voxels (cases):")
                for v, info in s["labels"].items():
                    name = f" {info['name']}" if info.get("name") else ""
                    lines.append(f"  {v}{name}: {info['voxels']} ({info['cases']})")
        for f in self.errors + self.warnings:
            lines.append(f.line())
        n = sum(s.get("cases", {}).values()) if s else 0
        if self.ok:
            lines.append(f"OK: all {n} cases usable" + (f", {len(self.warnings)} warning(s)" if self.warnings else ""))
        else:
            bad = len(self.unusable)
            extra = "" if bad else " (the data set itself has errors)"
            lines.append(
                f"NOT OK: {bad} of {n} cases unusable, {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s){extra}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def _read(path: str):
    return load_image(path, orientation="RAS")


def _check_image(
    rep: CheckReport, split: str, case: str, path: str, arr: np.ndarray, affine: np.ndarray, info: dict
) -> None:
    for problem in image_problems(arr, affine, reject_constant=True):
        rep.add(problem.severity, split, case, path, problem.message)
    info["shape"] = [int(s) for s in arr.shape]
    info["spacing"] = [round(float(s), 4) for s in spacing_of(affine)]
    if np.iscomplexobj(arr):  # already an error above; no HU range to report (a cast would warn)
        return
    a = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
    vals = a[np.isfinite(a)] if np.issubdtype(arr.dtype, np.floating) else a
    if vals.size:
        info["min"], info["max"] = float(vals.min()), float(vals.max())


def _check_label(
    rep: CheckReport,
    split: str,
    case: str,
    path: str,
    lab: np.ndarray,
    laff: np.ndarray,
    img_shape: Optional[tuple],
    img_aff: Optional[np.ndarray],
    declared: dict,
    num_classes: Optional[int],
    tol: float,
    info: dict,
) -> None:
    err = lambda msg: rep.add("error", split, case, path, msg)  # noqa: E731
    if img_shape is not None and img_aff is not None:
        problem = grid_problem(img_shape, img_aff, lab.shape, laff, tol)
        if problem:
            err(problem)
    for found in label_problems(lab, num_classes, declared):
        rep.add(found.severity, split, case, path, found.message)
    a = lab
    if np.issubdtype(a.dtype, np.floating):
        a = np.round(np.where(np.isfinite(a), a, 0))
    values, counts = np.unique(a.astype(np.int64), return_counts=True)
    info["labels"] = {int(v): int(c) for v, c in zip(values, counts)}


def _check_duplicate(
    rep: CheckReport, seen: dict[str, tuple[str, str, str]], split: str, case: str, path: str, arr: np.ndarray
) -> None:
    """The same scan under two names, found by its voxels (as read, reoriented to RAS, as float32: another
    file name, format or integer type does not hide it): an error across splits (a test case that is a
    training case makes the test a memory test), a warning within one (the scan counts twice)."""
    import hashlib

    if np.iscomplexobj(arr):
        return
    voxels = np.ascontiguousarray(arr, dtype=np.float32)
    key = hashlib.sha256(str(voxels.shape).encode() + voxels.tobytes()).hexdigest()
    if key not in seen:
        seen[key] = (split, case, path)
        return
    first_split, first_case, first_path = seen[key]
    where = f"case {first_case!r} of the {first_split} split ({first_path})"
    if first_split != split:
        rep.add(
            "error",
            split,
            case,
            path,
            f"the same scan as {where}: identical voxels in two splits leak one into the other",
        )
    else:
        rep.add("warning", split, case, path, f"the same scan as {where}: identical voxels, so it counts twice")


def check_dataset(
    source: str | os.PathLike,
    num_classes: Optional[int] = None,
    roi: Sequence[int] = (96, 96, 96),
    spacing: Optional[Sequence[float]] = None,
    format: str = "auto",
    split: str = "transunet",
    geometry_tol: float = 1e-3,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> CheckReport:
    """Read every case of ``source`` (any format of :func:`load_datalist`) and report its problems.

    ``num_classes`` (incl. background) and the datalist's labels bound the label values. ``roi`` and
    ``spacing`` (the training voxel size in mm; None = native) give the size under which a scan is
    padded (a warning). ``geometry_tol`` (mm) bounds the difference of image and label affines.
    ``progress(i, n, case)`` is called before each case. Never raises for a bad file: it is reported.
    """
    rep = CheckReport(source=str(source))
    try:
        dl = load_datalist(source, format=format, split=split, check_paths=False)
    except DataError as err:
        rep.add("error", "", "", str(source), str(err))
        return rep
    rep.data_format = dl["format"]
    declared = dict(dl.get("labels") or {})
    roi = tuple(int(r) for r in roi)
    target = tuple(float(s) for s in spacing) if spacing is not None else None

    todo = [(s, e) for s in SPLITS for e in dl[s]]
    seen: dict[str, tuple[str, str, str]] = {}  # voxel fingerprint -> (split, case, path) of its first scan
    for i, (s, e) in enumerate(todo):
        case = e["case"]
        if progress is not None:
            progress(i, len(todo), case)
        info: dict[str, Any] = {"split": s, "case": case, "image": e["image"], "label": e.get("label")}
        rep.cases.append(info)
        img_shape = img_aff = None
        for key in ("image", "label"):
            path = e.get(key)
            if path is None:
                continue
            if not os.path.exists(path):
                rep.add("error", s, case, path, f"{key} file does not exist")
                continue
            try:
                arr, aff, _ = _read(path)
            except Exception as ex:  # a bad file is a finding, never a crash of the check
                msg = str(ex)
                if path in msg:  # our DataErrors name the file; don't repeat it
                    msg = msg.replace(f"{path}: ", "").replace(path, "this file")
                rep.add("error", s, case, path, f"{key}: {msg}")
                continue
            if key == "image":
                _check_image(rep, s, case, path, arr, aff, info)
                _check_duplicate(rep, seen, s, case, path, arr)
                img_shape, img_aff = arr.shape, aff
                sp = spacing_of(aff)
                size = np.asarray(arr.shape, dtype=float)
                if target is not None:
                    size = np.floor(size * sp / np.asarray(target) + 1e-6)
                info["shape_at_target"] = [int(x) for x in size]
                small = [f"{ax} {int(n)} < {r}" for ax, n, r in zip("xyz", size, roi) if n < r]
                if small:
                    at = f"at {target} mm" if target else "at its own spacing"
                    rep.add(
                        "warning", s, case, path, f"smaller than the ROI {at} ({', '.join(small)}): it will be padded"
                    )
            else:
                _check_label(
                    rep, s, case, path, arr, aff, img_shape, img_aff, declared, num_classes, geometry_tol, info
                )
            del arr
        info["usable"] = not any(f.severity == "error" and f.case == case and f.split == s for f in rep.findings)
    rep.summary = _summary(dl, rep, declared, roi, target)
    return rep


def _summary(dl: dict, rep: CheckReport, declared: dict, roi: tuple, target: Optional[tuple]) -> dict:
    cases = rep.cases
    out: dict[str, Any] = {
        "cases": {s: len(dl[s]) for s in SPLITS},
        "labelled": {s: sum(1 for e in dl[s] if e.get("label")) for s in SPLITS},
        "usable_cases": sum(1 for c in cases if c.get("usable")),
        "roi": list(roi),
        "target_spacing": list(target) if target else None,
    }
    sp = np.array([c["spacing"] for c in cases if "spacing" in c])
    if sp.size:
        out["spacing_mm"] = {"min": sp.min(0).round(4).tolist(), "max": sp.max(0).round(4).tolist()}
    sh = np.array([c["shape"] for c in cases if "shape" in c])
    if sh.size:
        out["shape"] = {"min": sh.min(0).tolist(), "max": sh.max(0).tolist()}
    st = np.array([c["shape_at_target"] for c in cases if "shape_at_target" in c])
    if st.size and target:
        out["shape_at_target"] = {"min": st.min(0).tolist(), "max": st.max(0).tolist()}
    lows = [c["min"] for c in cases if "min" in c]
    if lows:
        out["intensity"] = {"min": min(lows), "max": max(c["max"] for c in cases if "max" in c)}
    labels: dict[int, dict] = {}
    for c in cases:
        for v, n in c.get("labels", {}).items():
            d = labels.setdefault(v, {"name": declared.get(v, ""), "voxels": 0, "cases": 0})
            d["voxels"] += n
            d["cases"] += 1
    out["labels"] = {v: labels[v] for v in sorted(labels)}
    return out
