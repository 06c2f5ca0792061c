"""The demo's CPU training steps inside a cgroup CPU quota: torch's own thread count against ``runtime.threads=0``.

A container limited by a CFS quota (``docker --cpus``, a Kubernetes CPU limit) still sees every core of its
host, and torch starts a thread per core; within the quota those threads run for the quota's share of each
scheduling period and are then stopped together, and every parallel region waits for the stopped ones.
``medhpm.runtime.device.configure_threads(0)`` (what ``runtime.threads=0`` does in the trainers, and what
``medhpm predict`` does) caps torch's threads at the quota rounded down.

This script makes a real cgroup with a quota of ``--cpus`` CPUs (cgroup v1's ``cpu`` hierarchy, or a v2 root
with the cpu controller; it needs root, and says so where it cannot), and runs child processes inside it
that alternate: ``torch`` keeps the thread count torch chose from the cores it sees (``--torch-threads N``
forces N instead, standing for a larger host), ``capped`` calls ``configure_threads(0)``. Each child builds
the steps of ``benchmarks.demo_step`` (fine-tuning: UNETR at 2 x 48^3; pre-training: hpm on 4 crops; float32,
plus bf16 where the CPU computes it natively, as the demo trains), runs each twice to warm up, then
``--steps`` times. Reported per step kind: the median seconds for each mode and the ratio capped / torch
(below 1: capping is faster), with the thread counts and the quota the children read.

Run (root): ``python -m benchmarks.cpu_quota [--cpus 1] [--rounds 3] [--steps 4] [--out DIR]`` ->
``cpu_quota_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_details, cpu_model, upper_median

MODES = ("torch", "capped")


def make_cgroup(cpus: float) -> Path:
    """A new cgroup limited to ``cpus`` CPUs; SystemExit naming the reason where none can be made."""
    name = f"medhpm_bench_{os.getpid()}"
    reason: object = "no cgroup v1 cpu hierarchy and no v2 root with the cpu controller"
    # (hierarchy, the file that shows it is one, cgroup v2?)
    for base, marker, v2 in (
        (Path("/sys/fs/cgroup/cpu"), "cpu.cfs_quota_us", False),
        (Path("/sys/fs/cgroup"), "cgroup.controllers", True),
    ):
        if not (base / marker).exists():
            continue
        group = base / name
        try:
            group.mkdir()
            if v2:
                (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000\n")
            else:
                period = int((group / "cpu.cfs_period_us").read_text())
                (group / "cpu.cfs_quota_us").write_text(f"{int(cpus * period)}\n")
            return group
        except OSError as e:
            if group.exists():
                group.rmdir()
            reason = e
    raise SystemExit(f"cpu_quota: cannot make a cgroup with a CPU quota here ({reason}); run as root on Linux")


def child(mode: str, group: str, steps: int, torch_threads: int) -> dict:
    """One process, moved into ``group`` first: set the threads by ``mode``, then time the demo's steps."""
    (Path(group) / "cgroup.procs").write_text(str(os.getpid()))
    from benchmarks.demo_step import native_demo_steps
    from medhpm.runtime.device import configure_threads, cpu_quota

    if torch_threads:
        torch.set_num_threads(torch_threads)
    chose = torch.get_num_threads()
    said = configure_threads(0) if mode == "capped" else None
    kinds = native_demo_steps()
    out = {}
    for kind, step in kinds.items():
        for _ in range(2):
            step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        out[kind] = times
    return {
        "mode": mode,
        "quota_read": cpu_quota(),
        "torch_chose": chose,
        "threads": torch.get_num_threads(),
        "configure_threads_said": said,
        "steps": out,
    }


def summarise(children: list[dict]) -> dict:
    results = {}
    for kind in children[0]["steps"]:
        per = {
            m: {
                "median_s": upper_median([t for c in children if c["mode"] == m for t in c["steps"][kind]]),
                "samples_s": [t for c in children if c["mode"] == m for t in c["steps"][kind]],
            }
            for m in MODES
        }
        per["ratio_capped_vs_torch"] = per["capped"]["median_s"] / per["torch"]["median_s"]
        results[kind] = per
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=float, default=1.0, help="the cgroup's CPU quota")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each kind per child")
    ap.add_argument("--torch-threads", type=int, default=0, help="threads of the torch mode (0: torch's choice)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.group, a.steps, a.torch_threads)))
        return {}
    started = time.time()
    root = Path(__file__).resolve().parent.parent
    from medhpm.runtime.device import THREAD_ENV

    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}  # the children choose their threads
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    group = make_cgroup(a.cpus)
    children = []
    try:
        for rnd in range(a.rounds):
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.cpu_quota",
                    "--child",
                    mode,
                    "--group",
                    str(group),
                    "--steps",
                    str(a.steps),
                    "--torch-threads",
                    str(a.torch_threads),
                ]
                done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(
                        f"cpu_quota: the {mode} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
                    )
                children.append(json.loads(done.stdout.strip().splitlines()[-1]))
                c = children[-1]
                print(
                    f"round {rnd + 1}/{a.rounds} {mode}: quota read {c['quota_read']}, {c['threads']} threads",
                    flush=True,
                )
    finally:
        group.rmdir()
    results = summarise(children)
    threads = {m: next(c["threads"] for c in children if c["mode"] == m) for m in MODES}
    payload = {
        "name": "cpu_quota",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": time.time() - started,
        "machine": {
            "cpu": cpu_model(),
            **cpu_details(),
            "visible_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg": list(os.getloadavg()),
        },
        "settings": {
            "cpus_quota": a.cpus,
            "rounds": a.rounds,
            "steps": a.steps,
            "config": "demo",
            "threads": threads,
            "quota_read": children[0]["quota_read"],
            "configure_threads_said": next(c["configure_threads_said"] for c in children if c["mode"] == "capped"),
        },
        "results": results,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_quota_cpu.json").write_text(json.dumps(payload, indent=1))
    for kind, r in results.items():
        print(
            f"{kind:16s} torch ({threads['torch']} threads) {r['torch']['median_s']:.3f} s  capped "
            f"({threads['capped']}) {r['capped']['median_s']:.3f} s  x{r['ratio_capped_vs_torch']:.3f}"
        )
    return payload


if __name__ == "__main__":
    main()
