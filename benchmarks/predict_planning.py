"""How `medhpm predict` planning grows with the number of input scans (issue 40: it was quadratic).

Usage::

    python -m benchmarks.predict_planning -o benchmarks/results/predict_planning_cpu.json

Writes N tiny NIfTI scans (8^3 voxels: planning reads no voxels) into a folder for each N of ``--sizes``
and times ``medhpm.segment.predict.plan_predictions`` (the product's planning: listing and naming the
scans, the output collision check, the check that no output lands on an input) on that folder, into an
empty output folder, several times each, interleaved. Reports the median seconds per N and the ratio of
each N's time to the first N's, against N's ratio: linear planning keeps the two close, quadratic makes the
time ratio the square of the size ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def write_scans(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    for i in range(n):
        nib.save(img, str(folder / f"scan_{i:05d}.nii.gz"))


def run(sizes: list[int], repeats: int) -> dict:
    from medhpm.segment.predict import plan_predictions

    times: dict[int, list[float]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            write_scans(Path(tmp) / f"in{n}", n)
        for _ in range(repeats):  # interleaved: a slow spell of the machine hits every size alike
            for n in sizes:
                t0 = time.perf_counter()
                planned = plan_predictions(Path(tmp) / f"in{n}", Path(tmp) / f"out{n}")
                times[n].append(time.perf_counter() - t0)
                assert len(planned) == n
    base = sizes[0]
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "benchmark": "predict_planning",
        "machine": platform.processor() or platform.machine(),
        "repeats": repeats,
        "sizes": sizes,
        "seconds_median": {str(n): round(med[n], 4) for n in sizes},
        "seconds_all": {str(n): [round(t, 4) for t in v] for n, v in times.items()},
        "time_ratio_to_first": {str(n): round(med[n] / med[base], 2) for n in sizes},
        "size_ratio_to_first": {str(n): round(n / base, 2) for n in sizes},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--out", type=Path, default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    res = run(sorted(args.sizes), args.repeats)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
