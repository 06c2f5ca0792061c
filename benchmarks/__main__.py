"""``python -m benchmarks``: run the benchmarks, write their JSON results, regenerate docs/PERFORMANCE.md.

Examples (from the repository root)::

    python -m benchmarks                                   # all three at the CPU size (< 10 min, 2 cores)
    python -m benchmarks --only pretrain_step --repeats 9  # one benchmark, more repeats
    python -m benchmarks --device cuda --size paper        # ViT-B/16, 96^3, batch 4 on a GPU (+ MFU)
    python -m benchmarks --size smoke --results-dir /tmp/r --docs /tmp/r/PERFORMANCE.md   # the test's size
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

# run from anywhere: the package ``benchmarks`` lives in the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.common import DOCS_PATH, RESULTS_DIR, SIZES, Context, _loadavg, apply_threads  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Benchmarks: " + ", ".join(BENCHMARKS),
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--size",
        choices=SIZES,
        default=None,
        help="smoke (seconds, for the test), cpu (default on CPU: whole suite < 10 min on 2 cores), "
        "paper (ViT-B/16, 96^3, batch 4, 512x512x150 volume; default on CUDA)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this benchmark (repeatable, or comma-separated)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: per benchmark and size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default: per benchmark)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak (dense bf16 TFLOP/s) for model FLOP utilisation on an unknown GPU",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    p.add_argument("--docs", type=Path, default=DOCS_PATH, help=f"PERFORMANCE.md to regenerate (default {DOCS_PATH})")
    p.add_argument("--no-docs", action="store_true", help="do not regenerate the docs")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but this torch build sees no CUDA device", file=sys.stderr)
        return 2
    size = args.size or ("paper" if torch.device(device).type == "cuda" else "cpu")
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    threads = apply_threads(args.threads)
    ctx = Context(
        device=device,
        size=size,
        threads=threads,
        repeats=args.repeats,
        warmup=args.warmup,
        memory=not args.no_memory,
        flops=not args.no_flops,
        peak_tflops=args.peak_tflops,
        results_dir=args.results_dir,
        verbose=not args.quiet,
    )
    os.makedirs(ctx.results_dir, exist_ok=True)
    todo = only or list(BENCHMARKS)
    ctx.log(f"device {device}, size {size}, {threads} threads, benchmarks: {', '.join(todo)}")
    t_all = time.time()
    failed = []
    for name in todo:
        t0 = time.time()
        ctx.extra["loadavg_start"] = _loadavg()
        try:
            payload = importlib.import_module(f"benchmarks.{name}").run(ctx)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for r in payload.get("ratios", []):
            met = "met" if r.get("meets_target") else "NOT met"
            tgt = "" if r.get("target") is None else f" (target <= {r['target']}: {met})"
            ctx.log(f"  {name}: {r['name']} = {r['ratio']:.3f}{tgt}")
        ctx.log(f"{name} took {time.time() - t0:.1f}s")
    total = time.time() - t_all
    ctx.log(f"all done in {total:.1f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if not args.no_docs:
        from benchmarks.report import write_docs

        path = write_docs(ctx.results_dir, args.docs)
        ctx.log(f"regenerated {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
