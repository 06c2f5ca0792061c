"""Benchmark 5: the training data pipeline, in crops per second, per cache mode and worker count.

Data: phantom CT volumes written by ``medhpm.data.phantom.write_phantom_dataset`` into a temporary
folder. Chain: ``medhpm.data.transforms.train_transforms`` (load, orient, resample to the configured
spacing, HU window, foreground crop, pad, then ``num_samples`` random label-guided ROI crops, flips,
rotations, intensity jitter). Dataset and loader: ``medhpm.data.dataset.make_dataset`` with
``data.cache`` = none / memory / disk and ``make_loader`` (one volume per batch, so a batch holds
``num_samples`` crops; shuffled; persistent workers).

Per cache mode the dataset is built once (``build_s``: for memory the cache fill, for disk nothing yet);
per worker count a new loader runs one untimed epoch (worker start-up; for disk the first pass also
writes the cache, recorded as ``cold_epoch_s``) and then ``repeats`` timed epochs with the main process
only fetching batches (no training). Reported: median crops per second. Ratios are time per crop of the
cached dataset / time per crop without a cache at the same worker count (below 1: caching helps).

``data.cache=device`` (``medhpm.data.device_sampler.DeviceCropSampler``, same chain, volumes as tensors on
the benchmark's device, CPU tensors on a CPU run): ``device/b1`` iterates it as the trainers do (one volume,
``num_samples`` crops per batch, as the loaders above), ``device/b16`` draws batches of 16 volumes
(``16 * num_samples`` crops, the large-batch case); each timed sample is ``device_epochs`` epochs (b1) or
as many crops (b16), CUDA synchronised. Ratios: time per crop of the device sampler / of the MONAI chain
with the memory cache at 0 and at the most workers (below 1: the device sampler is faster).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Context, summarize, sync, write_result

NAME = "data_pipeline"
TITLE = "Data pipeline: training crops per second"

SIZES = {
    "smoke": dict(
        cases=2,
        phantom_size=(48, 48, 32),
        spacing=(4.0, 4.0, 4.0),
        roi=32,
        num_samples=2,
        workers=(0, 2),
        repeats=1,
        device_epochs=2,
    ),
    "cpu": dict(
        cases=4,
        phantom_size=None,
        spacing=(1.5, 1.5, 2.0),
        roi=96,
        num_samples=4,
        workers=(0, 1, 2),
        repeats=2,
        device_epochs=8,
    ),
    "paper": dict(
        cases=8,
        phantom_size=None,
        spacing=(1.5, 1.5, 2.0),
        roi=96,
        num_samples=4,
        workers=(0, 1, 2, 4, 8),
        repeats=3,
        device_epochs=20,
    ),
}
MODES = ("none", "memory", "disk")
LARGE_BATCH_VOLUMES = 16


def _epoch(loader, epochs: int = 1, device="cpu") -> tuple[float, int]:
    crops = 0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            crops += int(batch["image"].shape[0])
    sync(device)
    return time.perf_counter() - t0, crops


def _draws(sampler, vols, calls: int, device) -> tuple[float, int]:
    crops = 0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        crops += int(sampler.draw(vols)["image"].shape[0])
    sync(device)
    return time.perf_counter() - t0, crops


def _device_results(ctx: Context, entries, transform, s: dict, repeats: int) -> dict:
    """The device sampler: built once (the head of every case), then timed as b1 and b16 (module doc)."""
    from medhpm.data.device_sampler import DeviceCropSampler

    dev = ctx.torch_device
    t0 = time.perf_counter()
    sampler = DeviceCropSampler(entries, transform, batch_size=s["num_samples"], seed=0, device=dev)
    sync(dev)
    build_s = time.perf_counter() - t0
    out = {}
    ne = s["device_epochs"]
    n_large = max(1, ne * len(entries) // LARGE_BATCH_VOLUMES)
    g = torch.Generator().manual_seed(0)
    vols = torch.randint(len(entries), (LARGE_BATCH_VOLUMES,), generator=g).to(dev)
    for key, run_once, batch in (
        ("device/b1", lambda: _epoch(sampler, ne, dev), 1),
        (f"device/b{LARGE_BATCH_VOLUMES}", lambda: _draws(sampler, vols, n_large, dev), LARGE_BATCH_VOLUMES),
    ):
        first_s, _ = run_once()  # warm-up
        times, crops = [], 0
        for _ in range(repeats):
            dt, crops = run_once()
            times.append(dt)
        med = statistics.median(times)
        out[key] = {
            "variant": key,
            "cache": "device",
            "workers": 0,
            "batch_volumes": batch,
            "crops_per_epoch": crops,
            "crops_per_s": crops / med,
            "wall_s": summarize([t / crops for t in times]),
            "epoch_s": summarize(times),
            "first_epoch_s": first_s,
            "build_s": build_s,
            "device_bytes": sampler.nbytes,
        }
        ctx.log(
            f"  {key}: {crops / med:.1f} crops/s ({crops} crops in {med:.3f}s, build {build_s:.2f}s, "
            f"{sampler.nbytes / 2**20:.0f} MiB on {dev})"
        )
    return out


def run(ctx: Context) -> dict:
    from medhpm.config import Config
    from medhpm.data.dataset import make_dataset, make_loader
    from medhpm.data.phantom import write_phantom_dataset
    from medhpm.data.transforms import train_transforms

    started = time.time()
    s = {**SIZES[ctx.size], **{k: v for k, v in ctx.extra.items() if k in ("cases", "workers")}}
    repeats = ctx.reps({k: v["repeats"] for k, v in SIZES.items()})
    tmp = Path(tempfile.mkdtemp(prefix="medhpm-bench-data-"))
    results: dict[str, dict] = {}
    ratios = []
    try:
        t0 = time.perf_counter()
        js = write_phantom_dataset(tmp / "phantom", cases=s["cases"], seed=0, size=s["phantom_size"])
        gen_s = time.perf_counter() - t0
        meta = json.loads(Path(js).read_text())
        root = Path(js).parent
        entries = [
            {k: str(root / v) for k, v in e.items()}
            for split in ("training", "validation", "test")
            for e in meta.get(split, [])
        ]
        base = dataclasses.replace(
            Config().data, spacing=tuple(s["spacing"]), roi=(s["roi"],) * 3, num_samples=s["num_samples"], num_workers=0
        )
        ctx.log(
            f"{NAME}: {len(entries)} phantom volumes ({gen_s:.1f}s to write), ROI {s['roi']}^3, "
            f"{s['num_samples']} crops per volume, workers {list(s['workers'])}, {repeats} timed epochs"
        )
        transform = train_transforms(base)
        modes = tuple(ctx.extra.get("modes", MODES))  # a quick run may measure fewer (e.g. memory only)
        for mode in modes:
            cfg = dataclasses.replace(base, cache=mode)
            t0 = time.perf_counter()
            ds = make_dataset(entries, transform, cfg, cache_dir=tmp / "cache")
            build_s = time.perf_counter() - t0
            cold = None
            for w in s["workers"]:
                loader = make_loader(ds, batch_size=1, shuffle=True, num_workers=w, seed=0, prefetch_factor=2)
                first_s, _ = _epoch(loader)  # worker start-up; disk: writes the cache on the first pass
                if mode == "disk" and cold is None:
                    cold = first_s
                times, crops = [], 0
                for _ in range(repeats):
                    dt, crops = _epoch(loader)
                    times.append(dt)
                del loader
                key = f"{mode}/w{w}"
                med = statistics.median(times)
                results[key] = {
                    "variant": key,
                    "cache": mode,
                    "workers": w,
                    "crops_per_epoch": crops,
                    "crops_per_s": crops / med,
                    "wall_s": summarize([t / crops for t in times]),
                    "epoch_s": summarize(times),
                    "first_epoch_s": first_s,
                    "build_s": build_s,
                }
                if mode == "disk":
                    results[key]["cold_epoch_s"] = cold
                ctx.log(
                    f"  {key}: {crops / med:.2f} crops/s (epoch {med:.2f}s, first {first_s:.2f}s, "
                    f"dataset build {build_s:.2f}s)"
                )
            del ds
        for mode in [m for m in ("memory", "disk") if m in modes and "none" in modes]:
            for w in s["workers"]:
                a, b = results[f"{mode}/w{w}"], results[f"none/w{w}"]
                ratio = a["wall_s"]["median"] / b["wall_s"]["median"]
                ratios.append(
                    {
                        "name": f"{mode} / none, {w} workers",
                        "numerator": f"{mode}/w{w}",
                        "denominator": f"none/w{w}",
                        "ratio": ratio,
                        "paired_median": statistics.median(
                            x / y for x, y in zip(a["wall_s"]["samples"], b["wall_s"]["samples"], strict=True)
                        ),
                        "target": None,
                        "meets_target": None,
                        "what": "time per crop with the cache / without (below 1: the cache helps)",
                    }
                )
        results.update(_device_results(ctx, entries, transform, s, repeats))
        w_max = max(s["workers"])
        for key in ("device/b1", f"device/b{LARGE_BATCH_VOLUMES}") if "memory" in modes else ():
            for w in sorted({0, w_max}):
                a, b = results[key], results[f"memory/w{w}"]
                ratios.append(
                    {
                        "name": f"{key} / memory cache, {w} workers",
                        "numerator": key,
                        "denominator": f"memory/w{w}",
                        "ratio": a["wall_s"]["median"] / b["wall_s"]["median"],
                        "paired_median": None,
                        "target": None,
                        "meets_target": None,
                        "what": "time per crop of the device sampler / of the MONAI chain with the memory "
                        "cache (below 1: the device sampler is faster)",
                    }
                )
        for mode in modes:
            a, b = results[f"{mode}/w{w_max}"], results[f"{mode}/w0"]
            ratios.append(
                {
                    "name": f"{mode}: {w_max} workers / 0 workers",
                    "numerator": f"{mode}/w{w_max}",
                    "denominator": f"{mode}/w0",
                    "ratio": a["wall_s"]["median"] / b["wall_s"]["median"],
                    "paired_median": None,
                    "target": None,
                    "meets_target": None,
                    "what": "time per crop with workers / in the main process",
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "title": TITLE,
        "measures": __doc__.strip().split("\n\n", 1)[1],
        "settings": {
            "cases": s["cases"],
            "phantom_size": s["phantom_size"] or "drawn per case",
            "spacing": list(s["spacing"]),
            "roi": s["roi"],
            "num_samples": s["num_samples"],
            "workers": list(s["workers"]),
            "repeats": repeats,
            "chain": "train_transforms",
            "device_epochs": s["device_epochs"],
            "modes": list(modes),
            "large_batch_volumes": LARGE_BATCH_VOLUMES,
            "batch_volumes": 1,
            "phantom_write_s": gen_s,
        },
        "results": results,
        "ratios": ratios,
    }
    write_result(ctx, NAME, payload, started)
    return payload
