"""Equality and speed of the exported models at demo size (issue 17), written as JSON.

    python -m benchmarks.export_check --model runs/demo/finetune/best.pt \
        --phantoms runs/demo/phantom/dataset.json -o benchmarks/results/export_check.json

Exports the checkpoint as a MONAI bundle, ONNX and TorchScript, then segments the data set's test scans (the
demo: 3 phantoms) and the real DICOM fixture ``tests/data/real_ct/abdomen_dicom/dicom`` with

* ``medhpm predict`` (:class:`~medhpm.segment.predict.Predictor`, the reference),
* the bundle, run by MONAI (``ConfigParser`` + its ``evaluator``, as ``python -m monai.bundle run`` does) in a
  Python that cannot import medhpm (:func:`run_without_medhpm`),
* the ONNX model (onnxruntime, CPU) and the TorchScript model through medhpm's sliding window
  (:func:`~medhpm.segment.export.exported_predictor`),

and records per scan and runtime the seconds (wall clock, one scan at a time, the network already loaded for
predict / ONNX / TorchScript; the bundle's time includes building its dataset and loading ``model.ts``), the
Dice of every label against ``medhpm predict``, whether the geometry is the same (NIfTI: shape and affine as
written; DICOM: after ``nibabel.as_closest_canonical``, see docs/export.md), and the largest logit
difference of ONNX and TorchScript against PyTorch on one preprocessed ROI. Times depend on the CPU and on
what else runs on it: the JSON names the CPU, the thread count and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import cpu_model

ROOT = Path(__file__).resolve().parent.parent
REAL_DICOM = ROOT / "tests" / "data" / "real_ct" / "abdomen_dicom" / "dicom"

# A Python that cannot import medhpm. `-I` drops PYTHONPATH and the user site; medhpm may still sit in the
# interpreter's site-packages (an editable .pth finder or a regular install), so a meta-path finder placed
# first refuses every `medhpm` import whatever the install type. The script proves medhpm is hidden, then
# runs the module named by its first argument as `python -m` would (or, for "-c", the code that follows).
HIDDEN = r"""
import importlib.abc, runpy, sys

class HideMedhpm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "medhpm" or name.startswith("medhpm."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None

sys.meta_path.insert(0, HideMedhpm())
for name in [m for m in sys.modules if m == "medhpm" or m.startswith("medhpm.")]:
    del sys.modules[name]
try:
    import medhpm  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("medhpm is importable: the check would prove nothing")
module = sys.argv[1]
if module == "-c":  # python -c CODE ARGS: CODE sees sys.argv == ["-c", *ARGS], as with python itself
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    exec(compile(code, "<hidden>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
assert not any(m == "medhpm" or m.startswith("medhpm.") for m in sys.modules)
"""


def run_without_medhpm(
    *args, cwd: Path, timeout: int = 3600, threads: int | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m ARGS`` (or ``-c CODE``) with medhpm hidden; raises on a non-zero exit, with its output."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run(
        [sys.executable, "-I", "-c", HIDDEN, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"{args[:2]} failed without medhpm (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        )
    return r


# the bundle, timed scan by scan in one process without medhpm
_BUNDLE_TIMER = r"""
import json, sys, time
from monai.bundle import ConfigParser
bundle, out, scans, result = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
seconds = {}
for scan in scans:
    parser = ConfigParser()
    parser.read_config(bundle + "/configs/inference.json")
    parser["bundle_root"], parser["output_dir"], parser["datalist"] = bundle, out, [scan]
    t = time.perf_counter()
    parser.get_parsed_content("evaluator").run()
    seconds[scan] = time.perf_counter() - t
json.dump(seconds, open(result, "w"))
"""


def dice_per_label(a, b) -> dict[str, float]:
    import numpy as np

    out = {}
    for v in sorted(set(np.unique(a)) | set(np.unique(b))):
        if v:
            x, y = a == v, b == v
            out[str(int(v))] = float(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return out


def compare(ref_path: Path, got_path: Path, canonical: bool) -> dict:
    import nibabel as nib
    import numpy as np

    ref, got = nib.load(str(ref_path)), nib.load(str(got_path))
    if canonical:
        ref, got = nib.as_closest_canonical(ref), nib.as_closest_canonical(got)
    same = ref.shape == got.shape and bool(np.allclose(ref.affine, got.affine, atol=1e-4))
    dice = dice_per_label(np.asarray(ref.dataobj), np.asarray(got.dataobj)) if ref.shape == got.shape else {}
    return {
        "same_geometry": same,
        "compared": "canonical (RAS) grid" if canonical else "as written",
        "dice": dice,
        "min_dice": min(dice.values()) if dice else None,
    }


def central_roi(cfg, scan: Path):
    """The central ROI ``(1, 1, *roi)`` float32 of ``scan`` after medhpm's preprocessing (what the network
    sees in the middle of the sliding window)."""
    from medhpm.data.transforms import predict_transforms

    img = predict_transforms(cfg.data)({"image": str(scan)})["image"].as_tensor()
    roi = [int(r) for r in cfg.data.roi]
    starts = [max(0, (s - r) // 2) for s, r in zip(img.shape[1:], roi, strict=True)]
    x = img[None, :, starts[0] : starts[0] + roi[0], starts[1] : starts[1] + roi[1], starts[2] : starts[2] + roi[2]]
    return x.contiguous()


def roi_differences(ckpt: Path, exports: dict[str, Path], scan: Path) -> dict:
    import numpy as np
    import torch

    from medhpm.segment.export import load_exported
    from medhpm.segment.predict import load_model

    model, cfg, _ = load_model(ckpt)
    roi = [int(r) for r in cfg.data.roi]
    x = central_roi(cfg, scan)
    with torch.no_grad():
        ref = model(x).numpy()
        out = {}
        for fmt in ("onnx", "torchscript"):
            net, _ = load_exported(exports[fmt])
            out[fmt] = float(np.max(np.abs(net(x).numpy() - ref)))
    return {"roi": roi, "scan": str(scan), "max_abs_logit_difference": out, "max_abs_logit": float(np.max(np.abs(ref)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="fine-tuning checkpoint (best.pt)")
    p.add_argument("--phantoms", required=True, type=Path, help="the data set whose test scans to segment")
    p.add_argument("--dicom", type=Path, default=REAL_DICOM, help="a DICOM series folder (default: the fixture)")
    p.add_argument("-o", "--out", required=True, type=Path, help="JSON to write")
    p.add_argument("--work", type=Path, default=None, help="folder for exports and label maps (default: temp)")
    p.add_argument("--threads", type=int, default=0, help="torch / OMP threads (0: their default)")
    a = p.parse_args(argv)

    import torch

    from medhpm.data.datalist import load_datalist
    from medhpm.runtime.files import atomic_write_text, sha256_file
    from medhpm.segment.export import export_model, exported_predictor
    from medhpm.segment.predict import Predictor

    if a.threads:
        torch.set_num_threads(a.threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="export_check_"))
    work.mkdir(parents=True, exist_ok=True)
    scans = [(Path(e["image"]), False) for e in load_datalist(a.phantoms).get("test", [])]
    scans.append((a.dicom, True))
    result: dict = {
        "model": str(a.model),
        "checkpoint_sha256": sha256_file(a.model),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": list(os.getloadavg()),
        },
        "note": "seconds per scan, one scan at a time; on a shared CPU they are inflated by the "
        "other work on it (loadavg)",
        "export_seconds": {},
        "scans": {},
    }
    exports = {}
    for fmt in ("bundle", "onnx", "torchscript"):
        t = time.perf_counter()
        exports[fmt] = export_model(a.model, work / "export" / fmt, fmt, force=True)
        result["export_seconds"][fmt] = time.perf_counter() - t

    def named(path: Path) -> str:
        return "dicom" if path.is_dir() else path.name.split(".")[0]

    timings: dict[str, dict[str, float]] = {k: {} for k in ("predict", "bundle", "onnx", "torchscript")}
    ref = Predictor.from_checkpoint(a.model, device="cpu")
    for scan, _ in scans:
        t = time.perf_counter()
        ref.predict_file(scan, work / "predict", name=named(scan))
        timings["predict"][str(scan)] = time.perf_counter() - t
    for fmt in ("onnx", "torchscript"):
        pr = exported_predictor(exports[fmt])
        for scan, _ in scans:
            t = time.perf_counter()
            pr.predict_file(scan, work / fmt, name=named(scan))
            timings[fmt][str(scan)] = time.perf_counter() - t
    bundle_out = work / "bundle"
    run_without_medhpm(
        "-c",
        _BUNDLE_TIMER,
        str(exports["bundle"]),
        str(bundle_out),
        json.dumps([str(s) for s, _ in scans]),
        str(work / "bundle_seconds.json"),
        cwd=work,
        threads=a.threads or None,
    )
    timings["bundle"] = json.loads((work / "bundle_seconds.json").read_text())

    for scan, is_dicom in scans:
        name = named(scan)
        entry = {"predict_seconds": timings["predict"][str(scan)]}
        for runtime in ("bundle", "onnx", "torchscript"):
            if runtime == "bundle":
                got = bundle_out / (f"{scan.name}.nii.gz" if is_dicom else scan.name)
            else:
                got = work / runtime / f"{name}.nii.gz"
            entry[runtime] = {
                "seconds": timings[runtime][str(scan)],
                **compare(work / "predict" / f"{name}.nii.gz", got, canonical=is_dicom),
            }
        result["scans"][str(scan)] = entry
    result["roi_check"] = roi_differences(a.model, exports, scans[0][0])
    mins = [e[r]["min_dice"] for e in result["scans"].values() for r in ("bundle", "onnx", "torchscript")]
    geos = [e[r]["same_geometry"] for e in result["scans"].values() for r in ("bundle", "onnx", "torchscript")]
    result["summary"] = {
        "min_dice_against_predict": min(m for m in mins if m is not None) if any(m is not None for m in mins) else None,
        "all_same_geometry": all(geos),
        "max_roi_logit_difference": max(result["roi_check"]["max_abs_logit_difference"].values()),
        "mean_seconds_per_scan": {k: sum(v.values()) / len(v) for k, v in timings.items()},
    }
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    ok = (
        (result["summary"]["min_dice_against_predict"] or 0) >= 0.999
        and result["summary"]["all_same_geometry"]
        and result["summary"]["max_roi_logit_difference"] <= 1e-4
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
