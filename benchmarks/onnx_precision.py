"""Where the ONNX export's logit differences come from (issue 17), written as JSON.

    python -m benchmarks.onnx_precision --model runs/demo/finetune/best.pt \
        --scan runs/demo/phantom/imagesTr/phantom_013.nii.gz --scan tests/data/real_ct/abdomen_dicom/dicom \
        -o benchmarks/results/onnx_precision.json

Exports the checkpoint to ONNX with ``medhpm export-model``'s own exporter, takes the central ROI of each scan
after medhpm's preprocessing, and compares on it, against a float64 reference (the same network and weights,
``model.double()``, on the same ROI):

* PyTorch float32 (what ``medhpm predict`` runs on a CPU), at each thread count;
* onnxruntime (CPU) at each ``graph_optimization_level`` and thread count, against float64 and against
  PyTorch float32; with the operators of the optimised graph, to see which fusions a level applies.

Largest absolute logit difference and the fraction of voxels whose argmax differs. Seconds per ROI are
recorded as a ratio to PyTorch float32 in the same process (a shared CPU makes absolute times noisy).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn, repeat: int = 2):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="fine-tuning checkpoint (best.pt)")
    p.add_argument("--scan", required=True, type=Path, action="append", help="a scan (repeat for several)")
    p.add_argument("--threads", default="1,2", help="thread counts to compare (comma separated)")
    p.add_argument("-o", "--out", required=True, type=Path, help="JSON to write")
    a = p.parse_args(argv)

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from benchmarks.export_check import central_roi, cpu_model
    from medhpm.runtime.files import atomic_write_text, sha256_file
    from medhpm.segment.export import export_model, ort_session_options
    from medhpm.segment.predict import load_model

    threads = [int(t) for t in a.threads.split(",")]
    work = Path(tempfile.mkdtemp(prefix="onnx_precision_"))
    onnx_path = export_model(a.model, work / "onnx", "onnx") / "model.onnx"
    model, cfg, _ = load_model(a.model)
    model = model.cpu().float().eval()
    model64 = copy.deepcopy(model).double()
    levels = [
        n
        for n in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
        if hasattr(ort.GraphOptimizationLevel, n)
    ]

    def ops_of(level: str) -> dict[str, int]:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(work / f"{level}.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
        return dict(
            sorted(collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph.node).items())
        )

    result: dict = {
        "model": str(a.model),
        "checkpoint_sha256": sha256_file(a.model),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "roi": [int(r) for r in cfg.data.roi],
        "medhpm_session_options": ort_session_options_summary(),
        "optimised_graph_ops": {lv: ops_of(lv) for lv in levels},
        "scans": {},
    }

    def compare(got: np.ndarray, ref: np.ndarray) -> dict:
        return {
            "max_abs": float(np.max(np.abs(got - ref))),
            "argmax_differs_fraction": float(np.mean(got.argmax(1) != ref.argmax(1))),
        }

    for scan in a.scan:
        x = central_roi(cfg, scan)
        with torch.no_grad():
            ref64 = model64(x.double()).numpy()
            entry: dict = {
                "max_abs_logit_float64": float(np.max(np.abs(ref64))),
                "torch_float32": {},
                "onnxruntime": {},
            }
            torch_seconds = {}
            ref32 = None
            for t in threads:
                torch.set_num_threads(t)
                out, sec = _timed(lambda: model(x).numpy())
                torch_seconds[t] = sec
                entry["torch_float32"][f"threads={t}"] = {"vs_float64": compare(out, ref64), "seconds_per_roi": sec}
                if ref32 is None:
                    ref32 = out
                else:
                    entry["torch_float32"][f"threads={t}"]["vs_torch_threads={threads[0]}"] = compare(out, ref32)
        for level in levels:
            for t in threads:
                so = ort.SessionOptions()
                so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
                so.intra_op_num_threads = t
                sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
                out, sec = _timed(lambda: sess.run(["logits"], {"image": x.numpy()})[0])
                entry["onnxruntime"][f"{level} threads={t}"] = {
                    "vs_float64": compare(out, ref64),
                    "vs_torch_float32": compare(out, ref32),
                    "seconds_per_roi_vs_torch": sec / torch_seconds[t],
                }
        # the session medhpm itself creates (OnnxRuntimeNetwork, the export's check)
        sess = ort.InferenceSession(str(onnx_path), ort_session_options(), providers=["CPUExecutionProvider"])
        out = sess.run(["logits"], {"image": x.numpy()})[0]
        entry["onnxruntime"]["medhpm"] = {"vs_float64": compare(out, ref64), "vs_torch_float32": compare(out, ref32)}
        result["scans"][str(scan)] = entry
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=2))
    print(json.dumps({s: {k: v for k, v in e.items()} for s, e in result["scans"].items()}, indent=1))
    return 0


def ort_session_options_summary() -> dict:
    from medhpm.segment.export import ort_session_options

    so = ort_session_options()
    return {
        "graph_optimization_level": str(so.graph_optimization_level),
        "intra_op_num_threads": so.intra_op_num_threads,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
