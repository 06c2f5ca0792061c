"""The demo's CPU training steps with glibc's default malloc against ``runtime.cpu_memory=reuse``.

glibc hands large freed blocks back to the operating system, so a CPU step that frees its activations and
gradients at its end maps and zero-fills them again in the next one (page faults);
``medhpm.runtime.device.configure_cpu_memory("reuse")`` raises malloc's mmap and trim thresholds so that
the pages are reused. The setting is process-wide and cannot be undone to glibc's adaptive default, so
each policy runs in its own child process; the children alternate (release, reuse, release, ...) for
``--rounds`` rounds so that load on the machine hits both alike. A child builds the steps of
``benchmarks.demo_step`` (fine-tuning: UNETR at 2 x 48^3 with DiceCE, clipping, fused AdamW; pre-training:
hpm on 4 crops), runs each twice to warm up, then ``--steps`` times, and reports per step: seconds, minor
page faults and system CPU seconds (``getrusage``), and at its end the process's peak resident memory.

Reported: per step kind the median over all rounds' steps for each policy and the ratio reuse / release
(below 1: faster), the median page faults per step, and the children's median peak resident memory with
its ratio (the memory the setting costs). bf16 variants are measured where the CPU computes bf16
natively (``runtime.precision=bf16-native``, the demo's setting).

Run: ``python -m benchmarks.cpu_memory [--rounds 3] [--steps 5] [--threads 2] [--out DIR]`` ->
``cpu_memory_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_machine, upper_median

POLICIES = ("release", "reuse")


def child(policy: str, steps: int, threads: int) -> dict:
    """One process: apply ``policy``, then time the demo's steps (see the module text)."""
    from benchmarks.demo_step import native_demo_steps
    from medhpm.runtime.device import configure_cpu_memory

    done = configure_cpu_memory(policy, "cpu")
    torch.set_num_threads(threads)
    kinds = native_demo_steps()
    out = {}
    for kind, step in kinds.items():
        for _ in range(2):
            step()
        rows = []
        for _ in range(steps):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rows.append({"s": dt, "minor_faults": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime})
        out[kind] = rows
    return {
        "policy": policy,
        "configured": done,
        "steps": out,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def summarise(children: list[dict]) -> dict:
    """Medians per step kind and policy over every child's steps, and the ratios reuse / release."""
    kinds = list(children[0]["steps"])
    results = {}
    for kind in kinds:
        per = {}
        for policy in POLICIES:
            rows = [r for c in children if c["policy"] == policy for r in c["steps"][kind]]
            per[policy] = {
                "median_s": upper_median([r["s"] for r in rows]),
                "median_minor_faults": upper_median([r["minor_faults"] for r in rows]),
                "median_sys_s": upper_median([r["sys_s"] for r in rows]),
                "steps": len(rows),
                "samples_s": [r["s"] for r in rows],
            }
        per["ratio_reuse_vs_release"] = per["reuse"]["median_s"] / per["release"]["median_s"]
        results[kind] = per
    rss = {p: upper_median([c["peak_rss_mib"] for c in children if c["policy"] == p]) for p in POLICIES}
    return {"results": results, "peak_rss_mib": {**rss, "ratio_reuse_vs_release": rss["reuse"] / rss["release"]}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each kind per child")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the demo uses the machine's)")
    ap.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.threads)))
        return {}
    started = time.time()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    children = []
    for rnd in range(a.rounds):
        for policy in POLICIES:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.cpu_memory",
                "--child",
                policy,
                "--steps",
                str(a.steps),
                "--threads",
                str(a.threads),
            ]
            done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(
                    f"cpu_memory: the {policy} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
                )
            children.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {rnd + 1}/{a.rounds} {policy}: peak RSS {children[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    summary = summarise(children)
    payload = {
        "name": "cpu_memory",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": time.time() - started,
        "machine": cpu_machine(a.threads),
        "settings": {
            "rounds": a.rounds,
            "steps": a.steps,
            "config": "demo",
            "finetune_batch": 2,
            "pretrain_batch": 4,
            "configured": {p: next(c["configured"] for c in children if c["policy"] == p) for p in POLICIES},
        },
        **summary,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_memory_cpu.json").write_text(json.dumps(payload, indent=1))
    for kind, r in summary["results"].items():
        print(
            f"{kind:16s} release {r['release']['median_s']:.3f} s ({r['release']['median_minor_faults']} faults)"
            f"  reuse {r['reuse']['median_s']:.3f} s ({r['reuse']['median_minor_faults']} faults)"
            f"  x{r['ratio_reuse_vs_release']:.3f}"
        )
    p = summary["peak_rss_mib"]
    print(f"peak RSS: release {p['release']:.0f} MiB, reuse {p['reuse']:.0f} MiB, x{p['ratio_reuse_vs_release']:.3f}")
    return payload


if __name__ == "__main__":
    main()
