"""How real do the phantoms look? Organ intensities of standard and wide phantoms against the real CT fixture,
and the Dice of trained models on the real DICOM fixture (issue 14).

    python -m benchmarks.phantom_realism [--cases 24] [--model NAME=CKPT ...] [--out FILE.json]

* Intensities: the median HU inside each organ of the real fixture (``tests/data/real_ct/abdomen_dicom``,
  a contrast CT of the upper abdomen with TotalSegmentator labels), and over ``--cases`` phantoms of each
  variability: the median over cases of the per-case median, and the 5th to 95th percentile over cases, with
  whether the real value falls inside that range. Organs eroded by one voxel (away from partial volume).
* Models: each ``--model`` predicts the real DICOM series (``medhpm predict``'s path, in the series' own
  geometry) and is scored per organ present in the fixture (Dice %, HD95 mm) against its label map.
Writes JSON (default ``benchmarks/results/phantom_realism.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks.common import machine_info
from medhpm.data.ct_reader import load_image
from medhpm.data.labels import BTCV_LABELS
from medhpm.data.phantom import generate_case
from medhpm.evaluate.metrics import compute_case_metrics

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "real_ct" / "abdomen_dicom"
ORGANS = {1: "spleen", 6: "liver", 7: "stomach", 8: "aorta", 9: "ivc", 10: "portal/splenic vein", 11: "pancreas"}


def _organ_medians(image: np.ndarray, label: np.ndarray) -> dict[str, float]:
    out = {}
    for value, name in ORGANS.items():
        mask = ndimage.binary_erosion(label == value, iterations=1)
        if mask.sum() >= 20:
            out[name] = float(np.median(image[mask]))
    return out


def real_fixture_medians() -> dict[str, float]:
    image, _, _ = load_image(FIXTURE / "dicom", orientation="RAS")
    label, _, _ = load_image(FIXTURE / "labels_btcv13.nii.gz", orientation="RAS")
    return _organ_medians(image.astype(np.float32), np.rint(label).astype(np.uint8))


def phantom_medians(cases: int, variability: str) -> dict[str, dict]:
    per_case: dict[str, list[float]] = {}
    for seed in range(cases):
        c = generate_case(seed, variability=variability)
        for name, med in _organ_medians(c.image.astype(np.float32), c.label).items():
            per_case.setdefault(name, []).append(med)
    return {
        name: {
            "median": float(np.median(v)),
            "p5": float(np.percentile(v, 5)),
            "p95": float(np.percentile(v, 95)),
            "n": len(v),
        }
        for name, v in per_case.items()
    }


def model_on_fixture(ckpt: Path) -> dict:
    from medhpm.segment.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        out = Predictor.from_checkpoint(ckpt).predict_file(FIXTURE / "dicom", Path(tmp), name="abdomen")
        pred = np.asarray(nib.load(str(out)).dataobj).astype(np.uint8)
    ref_img = nib.load(str(FIXTURE / "labels_btcv13.nii.gz"))
    ref = np.rint(np.asarray(ref_img.dataobj)).astype(np.uint8)
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    present = {v: BTCV_LABELS[v] for v in sorted(set(np.unique(ref).tolist()) - {0})}
    m = compute_case_metrics(pred, ref, spacing, present)
    return {
        BTCV_LABELS[v]: {"dice_pct": round(100 * r["dice"], 1), "hd95_mm": r["hd95"], "status": r["status"]}
        for v, r in m.items()
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=24, help="phantoms per variability")
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="a fine-tuned checkpoint to score on the real DICOM fixture (repeatable)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "phantom_realism.json")
    args = ap.parse_args(argv)
    real = real_fixture_medians()
    res = {
        "machine": machine_info("cpu"),
        "real_fixture": str(FIXTURE.relative_to(FIXTURE.parents[3])),
        "real_median_hu": real,
        "phantoms": {v: phantom_medians(args.cases, v) for v in ("standard", "wide")},
        "models": {},
    }
    for v, organs in res["phantoms"].items():
        for name, s in organs.items():
            if name in real:
                s["real_inside_p5_p95"] = bool(s["p5"] <= real[name] <= s["p95"])
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model {spec!r}: write NAME=CHECKPOINT")
        res["models"][name] = {"checkpoint": path, "dice_on_real_fixture": model_on_fixture(Path(path))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float))
    print("organ | real | standard median [p5, p95] | wide median [p5, p95]")
    for name, r in real.items():
        cells = []
        for v in ("standard", "wide"):
            s = res["phantoms"][v].get(name)
            cells.append(f"{s['median']:.0f} [{s['p5']:.0f}, {s['p95']:.0f}]" if s else "n/a")
        print(f"{name} | {r:.0f} | {cells[0]} | {cells[1]}")
    for name, m in res["models"].items():
        print(name, {k: v["dice_pct"] for k, v in m["dice_on_real_fixture"].items()})
    return res


if __name__ == "__main__":
    main()
