"""Every GPU measurement of issue 18 in one run, for a few minutes of H100/H200 time; JSON out.

* **Steps** (``benchmarks.compile_step.build_step``: the trainers' optimizer step, bf16 autocast on CUDA):
  ``mae``, ``hpm`` (alpha 0.5, teacher pass) and ``finetune`` (UNETR + DiceCE), eager and each
  ``runtime.compile`` mode, at batch 4 and at the largest batch that fits (doubling from 4 until CUDA runs
  out of memory, eager, capped by ``--max-batch``): ms per step, crops per second, peak CUDA memory
  (``torch.cuda.max_memory_allocated``), FLOPs per step (``torch.utils.flop_counter.FlopCounterMode``, one
  forward + backward, math attention) and MFU against the device's dense bf16 peak (H100/H200: 989.4
  TFLOP/s; ``--peak-tflops`` for another), plus hpm/mae per step and per crop.
* **Loader**: crops per second of the MONAI chain (``train_transforms``, memory cache) at 0, 4 and 8
  workers on phantom CT, and of the device-resident sampler when ``data.cache=device`` exists in this
  version of ``medhpm.data`` (recorded as unavailable otherwise).

The steps run as a list of jobs, most wanted first (:func:`step_jobs`: hpm, fine-tuning, mae, each eager
against CUDA graphs at batch 4 and at the largest batch; then the other compile modes), then the loader;
the JSON is rewritten after every job. ``--budget-s S`` starts no job after S seconds (the steps stop
``LOADER_RESERVE_S`` earlier to leave the loader its time) and lists what it left out under ``skipped``,
so that one device call of a known length returns the main figures rather than nothing; e.g.
``--budget-s 420`` inside a 600-second call (a job already started runs to its end; compiling one ViT-B
step takes a minute or two).

``python benchmarks/gpu_all.py`` (or ``python -m benchmarks.gpu_all``) writes ``$OUT/gpu_all.json``
(``--out DIR`` overrides; default ``benchmarks/results``). ``--tiny``: the micro model at 32^3, batches
2 and 4, eager and ``default`` with torch.compile's ``eager`` backend (dynamo's capture, no code
generation: inductor alone takes minutes on a small CPU), 0 and 1 workers, on the CPU if there is no
GPU: about a minute, for the test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: python benchmarks/gpu_all.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compile_step import MODES, SIZES, TASKS, build_step, measure  # noqa: E402

H100_H200_BF16 = 989.4e12
LOADER_RESERVE_S = 120.0  # with --budget-s: the steps stop starting jobs this long before the deadline


def _peak(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if torch.device(device).type != "cuda":
        return None
    from benchmarks.common import PEAK_BF16_FLOPS

    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_FLOPS.items():
        if key in name:
            return v
    return H100_H200_BF16 if ("H100" in name or "H200" in name) else None


def _flops(task, size, batch, device) -> int | None:
    from benchmarks.common import count_flops

    _, fb = build_step(task, size, batch, "none", device)
    return count_flops(fb)


def _peak_memory(task, size, batch, device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step, _ = build_step(task, size, batch, "none", device)
    step()
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _fits(task, size, batch, device) -> bool:
    try:
        _peak_memory(task, size, batch, device) if torch.device(device).type == "cuda" else build_step(
            task, size, batch, "none", device
        )[0]()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(task, size, device, start: int, cap: int) -> int:
    """Double from ``start`` while an eager step fits (CUDA memory), up to ``cap``."""
    b = start
    while b * 2 <= cap and _fits(task, size, b * 2, device):
        b *= 2
    return b


def step_jobs(tasks, modes: list[str]) -> list[tuple[str, str, list[str]]]:
    """The step measurements in the order they run, most wanted first, as ``(task, which batch, modes)``
    (``which``: ``"base"`` or ``"largest"``); each job times its modes interleaved with eager (``"none"``).

    First, for hpm, then fine-tuning, then mae: the base batch eager against the primary captured mode
    (``reduce-overhead``, CUDA graphs, where asked; else the first compiled mode) and the largest batch the
    same way; then the other compiled modes at the base batch (``max-autotune`` last: it compiles longest).
    A run cut short by ``--budget-s`` so still holds the issue's main figures."""
    first = ("hpm", "finetune", "mae")
    order = [t for t in first if t in tasks] + [t for t in tasks if t not in first]
    compiled = [m for m in modes if m != "none"]
    primary = [m for m in compiled if m == "reduce-overhead"][:1] or compiled[:1]
    jobs = []
    for task in order:
        jobs += [(task, "base", ["none", *primary]), (task, "largest", ["none", *primary])]
    rest = sorted((m for m in compiled if m not in primary), key=lambda m: m == "max-autotune")
    for mode in rest:
        jobs += [(task, "base", ["none", mode]) for task in order]
    return jobs


def step_measurements(a, size, device, log, out: dict, deadline: float, save, skipped: list) -> None:
    """Fill ``out`` job by job (:func:`step_jobs`), calling ``save()`` after each; a job that would start
    after ``deadline`` (``time.time()``) is appended to ``skipped`` instead of run."""
    peak = _peak(device, a.peak_tflops)
    largest: dict[str, int] = {}
    for task, which, modes in step_jobs(a.tasks, a.modes):
        if time.time() > deadline:
            skipped.append(f"steps {task}/{which} {'+'.join(modes)}")
            continue
        if task not in largest:
            largest[task] = largest_batch(task, size, device, a.batch, a.max_batch)
            log(f"{task}: largest batch {largest[task]} (cap {a.max_batch})")
        batch = a.batch if which == "base" else largest[task]
        if which == "largest" and batch == a.batch:
            continue  # the base batch is already the largest that fits
        key = f"{task}/b{batch}"
        r = measure(task, size, batch, modes, device, a.repeats, a.warmup, log=log, backend=a.backend)
        entry = out.setdefault(key, {"task": task, "batch": batch, "largest": batch == largest[task], "modes": {}})
        if "flops_per_step" not in entry:
            entry["flops_per_step"] = _flops(task, size, batch, device)
            entry["peak_cuda_bytes_eager"] = _peak_memory(task, size, batch, device)
        flops = entry["flops_per_step"]
        for mode, v in r.items():
            v.pop("wall_s", None)
            v["flops_per_step"] = flops
            v["tflops_per_s"] = flops / v["s_per_step"] / 1e12 if flops else None
            v["mfu"] = flops / v["s_per_step"] / peak if (flops and peak) else None
            v["peak_cuda_bytes_eager"] = entry["peak_cuda_bytes_eager"]
            v["speedup_vs_eager"] = r["none"]["s_per_step"] / v["s_per_step"]  # within this job's interleaving
            if mode != "none" or "none" not in entry["modes"]:  # eager: the first job's timing is kept
                entry["modes"][mode] = v
        _hpm_over_mae(out)
        save()


def _hpm_over_mae(out: dict) -> None:
    for key in [k for k in out if k.startswith("hpm/")]:
        mae = out.get("mae/" + key.split("/", 1)[1])
        if mae and "none" in mae["modes"]:
            h, m = out[key]["modes"]["none"], mae["modes"]["none"]
            out[key]["hpm_over_mae_per_step"] = h["s_per_step"] / m["s_per_step"]
            out[key]["hpm_over_mae_per_crop"] = h["s_per_step"] / m["s_per_step"]  # same batch: per crop alike


def _crops_per_s(loader, epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += int(batch["image"].shape[0])
    return n / (time.perf_counter() - t0)


def loader_measurements(a, size, device, log) -> dict:
    from medhpm.config import Config
    from medhpm.data.dataset import make_dataset, make_loader, training_loader
    from medhpm.data.phantom import write_phantom_dataset
    from medhpm.data.transforms import train_transforms

    tmp = Path(tempfile.mkdtemp(prefix="medhpm-gpu-all-"))
    out: dict = {}
    try:
        js = write_phantom_dataset(tmp / "phantom", cases=a.cases, seed=0, size=(48, 48, 32) if a.tiny else None)
        meta = json.loads(Path(js).read_text())
        root = Path(js).parent
        entries = [{k: str(root / v) for k, v in e.items()} for e in meta["training"]]
        roi = size["roi"]
        base = dataclasses.replace(
            Config().data,
            roi=(roi,) * 3,
            num_samples=4,
            num_workers=0,
            cache="memory",
            **({"spacing": (4.0, 4.0, 4.0)} if a.tiny else {}),
        )
        ds = make_dataset(entries, train_transforms(base), base, cache_dir=tmp / "cache")
        for w in a.workers:
            loader = make_loader(ds, batch_size=1, shuffle=True, num_workers=w, seed=0, prefetch_factor=2)
            _crops_per_s(loader, 1)  # worker start-up
            out[f"monai_memory_w{w}"] = {"workers": w, "crops_per_s": _crops_per_s(loader, a.loader_epochs)}
            log(f"  loader MONAI memory cache, {w} workers: {out[f'monai_memory_w{w}']['crops_per_s']:.1f} crops/s")
            del loader
        try:  # the device sampler is built elsewhere; record what this version offers
            dcfg = dataclasses.replace(base, cache="device")
            loader = training_loader(entries, train_transforms(dcfg), dcfg, 4 * max(1, a.batch // 4), 0, tmp / "run")
            _crops_per_s(loader, 1)
            out["device_sampler"] = {"available": True, "crops_per_s": _crops_per_s(loader, a.loader_epochs)}
        except Exception as e:  # noqa: BLE001 - not there yet, or it failed: say which
            out["device_sampler"] = {"available": False, "why": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"  device sampler: {out['device_sampler']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> dict:
    from benchmarks.common import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="micro model, CPU if no GPU: under a minute")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (default 256)")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no measurement after this many seconds; the rest is listed as skipped (e.g. 420 "
        "for a 10-minute device call: a job already started runs to its end)",
    )
    ap.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default inductor; --tiny: eager, "
        "dynamo's capture without code generation, so that it stays under a minute)",
    )
    a = ap.parse_args(argv)
    if a.tiny:
        size, a.batch, a.modes, a.workers = SIZES["tiny"], 2, ["none", "default"], [0, 1]
        a.max_batch, a.repeats, a.warmup, a.cases, a.loader_epochs = a.max_batch or 4, 3, 1, 2, 1
        a.tasks = ["mae", "hpm", "finetune"]
        a.backend = a.backend or "eager"
    else:
        size, a.batch, a.modes, a.workers = SIZES["paper"], 4, list(MODES), [0, 4, 8]
        a.max_batch, a.repeats, a.warmup, a.cases, a.loader_epochs = a.max_batch or 256, 10, 3, 8, 2
        a.tasks = list(TASKS)
        a.backend = a.backend or "inductor"
    torch.manual_seed(0)
    if torch.device(a.device).type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    payload: dict = {
        "schema": "medhpm-gpu-all/1",
        "tiny": a.tiny,
        "device": a.device,
        "device_name": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else cpu_model(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "settings": {
            "size": size,
            "batch": a.batch,
            "max_batch": a.max_batch,
            "modes": a.modes,
            "workers": a.workers,
            "repeats": a.repeats,
            "backend": a.backend,
            "peak_flops": _peak(a.device, a.peak_tflops),
        },
        "errors": {},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_all_tiny.json" if a.tiny else "gpu_all.json")

    def save():
        payload["duration_s"] = time.time() - started
        path.write_text(json.dumps(payload, indent=1, default=str))

    deadline = started + a.budget_s if a.budget_s is not None else float("inf")

    def error(name) -> None:  # keep what was measured; the error goes into the JSON
        payload["errors"][name] = traceback.format_exc()[-2000:]
        log(payload["errors"][name])

    # the steps first (the main figures; saved after every job), leaving the loader about 2 minutes
    payload["steps"], payload["skipped"] = {}, []
    try:
        step_measurements(
            a,
            size,
            a.device,
            log,
            payload["steps"],
            deadline - (0 if a.skip_loader else LOADER_RESERVE_S),
            save,
            payload["skipped"],
        )
    except Exception:  # noqa: BLE001
        error("steps")
    save()
    if not a.skip_loader and time.time() > deadline:
        payload["skipped"].append("loader")
    elif not a.skip_loader:
        try:
            payload["loader"] = loader_measurements(a, size, a.device, log)
        except Exception:  # noqa: BLE001
            error("loader")
    save()
    log(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
