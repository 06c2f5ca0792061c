"""What test-time flips and largest-component post-processing do to Dice / HD95, and what they cost.

Usage (a finished demo run: ``finetune/best.pt`` and ``phantom/dataset.json``)::

    python -m benchmarks.postprocessing runs/demo -o benchmarks/results/postprocessing_demo.json

Predicts the run's test split four ways with ``medhpm.segment.predict.Predictor`` (plain, ``tta``,
``largest_component``, both), evaluates each with ``medhpm.evaluate.evaluate_predictions`` (the
checkpoint's reported classes, default surface tolerance) and writes one JSON: per variant the mean Dice,
HD95, NSD and ASSD over the reported organs, the differences from plain, and the wall-clock seconds per
scan (prediction only: preprocessing, sliding window, inversion, post-processing; the first scan of each
variant is timed like the others, the model is loaded once before). Scans run one at a time in this
process, on the device given (default: the checkpoint's config).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "plain": {},
    "tta": {"tta": True},
    "largest_component": {"largest_component": True},
    "tta+largest_component": {"tta": True, "largest_component": True},
}


def run(run_dir: Path, device: str = "auto", split: str = "test") -> dict:
    from medhpm.evaluate import evaluate_predictions
    from medhpm.runtime.checkpoint import load_checkpoint
    from medhpm.segment.predict import Predictor, plan_predictions

    ckpt, dataset = run_dir / "finetune" / "best.pt", run_dir / "phantom" / "dataset.json"
    for p in (ckpt, dataset):
        if not p.exists():
            raise SystemExit(f"{p} does not exist: pass the folder of a finished `medhpm demo` run")
    reported = load_checkpoint(ckpt, stage="finetune")["model_args"]["reported"]
    classes = {int(k): v for k, v in reported.items()}
    base = Predictor.from_checkpoint(ckpt, device=device)
    out: dict = {
        "run": str(run_dir.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "dataset": str(dataset.resolve()),
        "split": split,
        "device": str(base.device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "classes": reported,
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, switches in VARIANTS.items():
            p = Predictor(base.model, base.cfg, classes=base.classes, device=str(base.device), **switches)
            pred_dir = Path(tmp) / name
            items = plan_predictions(dataset, pred_dir, split)
            pred_dir.mkdir(parents=True)
            seconds = []
            for src, case, _ in items:
                t0 = time.perf_counter()
                res = p.predict(src)
                seconds.append(time.perf_counter() - t0)
                p._write(res, pred_dir, case)
            m = evaluate_predictions(pred_dir, dataset, classes, Path(tmp) / f"eval_{name}", datalist_key=split)
            mean = m["summary"]["mean"]
            out["variants"][name] = {
                "dice_mean": mean["dice_mean"],
                "hd95_mean": mean["hd95_mean"],
                "surface_dice_mean": mean.get("surface_dice_mean"),
                "assd_mean": mean.get("assd_mean"),
                "seconds_per_scan": sum(seconds) / len(seconds),
                "seconds": seconds,
                "scans": len(seconds),
            }
            print(
                f"{name}: Dice {mean['dice_mean']:.4f}, HD95 {mean['hd95_mean']:.2f} mm, "
                f"{sum(seconds) / len(seconds):.1f} s/scan",
                flush=True,
            )
    plain = out["variants"]["plain"]
    for v in out["variants"].values():
        v["dice_change"] = v["dice_mean"] - plain["dice_mean"]
        v["hd95_change_mm"] = v["hd95_mean"] - plain["hd95_mean"]
        v["seconds_per_scan_ratio"] = v["seconds_per_scan"] / plain["seconds_per_scan"]
    out["surface_tolerance_mm"] = m["surface_tolerance_mm"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished demo run folder (finetune/best.pt, phantom/dataset.json)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    from medhpm.runtime.files import atomic_write_text

    result = run(args.run, args.device)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
