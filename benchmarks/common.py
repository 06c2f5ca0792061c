"""Shared machinery of the benchmarks: sizes, machine description, interleaved timing, memory probes,
FLOP counting and the JSON result files.

Method (the same for every benchmark):

* Baseline and ours are built in the SAME process, with the same shapes, dtype, threads and device.
* Timing is interleaved: every repeat runs each variant once, the order alternating between repeats, so a
  burst of load from another process hits all variants alike. ``warmup`` untimed rounds come first.
  The garbage collector is off inside a timed call; CUDA is synchronised around it.
* Reported: the median of the repeats (wall clock), plus min / max / all samples and the process CPU time.
  A ratio is ``median(ours) / median(baseline)``; ``paired_median`` is the median of the per-repeat
  ratios, which is more robust to load that drifts over the run.
* Memory (CPU): each variant is built and run for two steps in a FRESH process (forked from a
  ``forkserver`` that has only imported the libraries), and the peak resident set size (Linux
  ``VmHWM``, reset at the child's start through ``/proc/self/clear_refs``) minus the child's RSS before
  building is reported: weights, gradients, optimizer state, EMA teacher, activations and allocator
  overhead of that variant alone. ``tracemalloc`` would miss torch's allocations, and the RSS of the
  timing process would mix the variants. Memory (CUDA): ``torch.cuda.max_memory_allocated`` in the same
  fresh child (tensors only, without the caching allocator's reserve), host peak RSS alongside.
* FLOPs: one forward + backward pass under ``torch.utils.flop_counter.FlopCounterMode`` with the math
  attention backend (the CPU flash-attention kernel is not in the counter's registry; the math path
  counts the same matrix products). Model FLOP utilisation = FLOPs per step / median step time / the
  device's peak (CUDA only; pass ``--peak-tflops`` for an unknown GPU).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "medhpm-benchmark/1"
SIZES = ("smoke", "cpu", "paper")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_PATH = REPO_ROOT / "docs" / "PERFORMANCE.md"

# dense bf16 tensor-core peaks (no sparsity), in FLOP/s, for model FLOP utilisation
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "A10": 125.0e12,
}


# --------------------------------------------------------------------------------------------------
# run context
# --------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every benchmark gets: where to run, how big, how often."""

    device: str = "cpu"
    size: str = "cpu"
    threads: int = 0  # 0: torch's default
    repeats: int | None = None  # None: the benchmark's default for the size
    warmup: int | None = None
    memory: bool = True
    flops: bool = True
    peak_tflops: float | None = None
    results_dir: Path = RESULTS_DIR
    verbose: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[bench] {msg}", flush=True)

    def reps(self, default: dict[str, int]) -> int:
        return int(self.repeats) if self.repeats is not None else int(default[self.size])

    def warm(self, default: dict[str, int] | int = 1, flops_warm: bool = True) -> int:
        """Untimed warm-up rounds. The FLOP count runs one full step of every variant first, which
        serves as one warm-up round on the CPU (on CUDA the full default is kept: autotuning)."""
        if self.warmup is not None:
            return int(self.warmup)
        n = int(default[self.size]) if isinstance(default, dict) else int(default)
        if flops_warm and self.flops and self.torch_device.type == "cpu":
            n = max(n - 1, 0)
        return n


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 keeps the default) and return the count in use."""
    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def amp_context(device: torch.device | str):
    """The trainers' precision: bfloat16 autocast on CUDA, float32 on CPU (medhpm.runtime.device)."""
    from medhpm.runtime.device import autocast, autocast_dtype

    dev = torch.device(device)
    return autocast(dev, autocast_dtype(dev, "auto"))


def amp_name(device: torch.device | str) -> str:
    return "bf16 autocast" if torch.device(device).type == "cuda" else "fp32"


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``platform.processor()`` is often just the architecture)."""
    from medhpm.runtime.device import cpu_info

    return cpu_info().get("model name") or platform.processor() or platform.machine()


def cpu_details(cpuinfo: str | None = None) -> dict:
    """The first CPU's ``cpu family`` and ``model`` and which of the vector extensions that set a step's speed
    (avx2, avx512f, avx512_bf16, amx_bf16) its flags list; the model name alone does not tell an AVX2-only
    EPYC (family 23) from an AVX512-BF16 one (family 25)."""
    from medhpm.runtime.device import cpu_info

    fields = cpu_info(cpuinfo)
    if not fields:
        return {}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_family": fields.get("cpu family"),
        "cpu_model_number": fields.get("model"),
        "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
    }


def cpu_machine(threads: int) -> dict:
    """The CPU benchmarks' machine record: the CPU, whether it has native bf16, the torch threads and
    version, the load average when the result was written."""
    from medhpm.runtime.device import cpu_has_native_bf16

    return {
        "cpu": cpu_model(),
        **cpu_details(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": threads,
        "torch": torch.__version__,
        "loadavg": list(os.getloadavg()),
    }


def machine_info(device: str) -> dict:
    import monai

    import medhpm

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    info = {
        "cpu": cpu_model(),
        **cpu_details(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "medhpm": getattr(medhpm, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": device,
        "device_name": "cpu",
        "loadavg_start": _loadavg(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_line(m: dict) -> str:
    dev = m.get("device_name", "cpu") if m.get("device", "cpu") != "cpu" else "CPU"
    return (
        f"{m.get('cpu')} ({m.get('usable_cores')} usable cores), torch threads {m.get('threads')}, "
        f"device {dev}, torch {m.get('torch')}, MONAI {m.get('monai')}, Python {m.get('python')}"
    )


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def peak_flops(ctx: Context) -> float | None:
    """Dense bf16 peak of the GPU (FLOP/s), or None (CPU, unknown GPU)."""
    if ctx.peak_tflops:
        return float(ctx.peak_tflops) * 1e12
    if ctx.torch_device.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(ctx.torch_device).name
    for key, value in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# a variant to time
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One variant: ``step()`` runs one full unit of work (e.g. forward, backward, AdamW step, EMA).
    Its FLOPs are counted on one call of ``step()`` (only matrix products, convolutions and attention
    count, so the optimizer and EMA add nothing)."""

    step: Callable[[], Any]
    info: dict = field(default_factory=dict)
    phases: dict[str, list[float]] = field(default_factory=dict)  # filled by steps that time phases


def upper_median(values) -> float | None:
    """The middle value, the upper of the two middle ones for an even count (``statistics.median_high``);
    None for no values."""
    v = sorted(values)
    return v[len(v) // 2] if v else None


def summarize(samples: list[float]) -> dict:
    s = [float(v) for v in samples]
    return {
        "median": statistics.median(s),
        "min": min(s),
        "max": max(s),
        "mean": statistics.fmean(s),
        "n": len(s),
        "samples": [round(v, 6) for v in s],
    }


def time_interleaved(cases: dict[str, Case], repeats: int, warmup: int, device: str, log=None) -> dict:
    """Run every case ``warmup`` times untimed, then ``repeats`` timed rounds, one call of each case per
    round, alternating the order. Returns ``{name: {"wall_s": summary, "cpu_s": summary, "phases_s": ...}}``."""
    names = list(cases)
    gc.collect()
    gc.freeze()  # long-lived objects (modules, models) out of the collector's way: per-call collects stay cheap
    for w in range(warmup):
        for name in names:
            cases[name].step()
            sync(device)
        if log:
            log(f"  warm-up round {w + 1}/{warmup} done")
    for case in cases.values():
        case.phases.clear()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            gc.disable()
            try:
                sync(device)
                c0, t0 = time.process_time(), time.perf_counter()
                cases[name].step()
                sync(device)
                t1, c1 = time.perf_counter(), time.process_time()
            finally:
                gc.enable()
            wall[name].append(t1 - t0)
            cpu[name].append(c1 - c0)
        if log:
            log("  round " + f"{r + 1}/{repeats}: " + ", ".join(f"{n} {wall[n][-1]:.3f}s" for n in names))
    gc.unfreeze()  # let the models of this benchmark be collected once the caller drops them
    out = {}
    for name in names:
        out[name] = {"wall_s": summarize(wall[name]), "cpu_s": summarize(cpu[name])}
        if cases[name].phases:
            out[name]["phases_s"] = {k: statistics.median(v) for k, v in cases[name].phases.items()}
    return out


def ratio_entry(name: str, num: str, den: str, timings: dict, target: float | None = None, what: str = "") -> dict:
    """``median(num) / median(den)`` and the median of the per-repeat ratios."""
    a, b = timings[num]["wall_s"], timings[den]["wall_s"]
    ratio = a["median"] / b["median"]
    paired = statistics.median(x / y for x, y in zip(a["samples"], b["samples"], strict=True))
    ca, cb = timings[num].get("cpu_s"), timings[den].get("cpu_s")
    entry = {
        "name": name,
        "numerator": num,
        "denominator": den,
        "ratio": ratio,
        "paired_median": paired,
        "cpu_ratio": ca["median"] / cb["median"] if ca and cb and cb["median"] > 0 else None,
        "target": target,
        "meets_target": None if target is None else bool(ratio <= target),
        "what": what,
    }
    return entry


class PhaseTimer:
    """Accumulates wall-clock phase times of one step into ``case.phases`` (CUDA synchronised)."""

    def __init__(self, phases: dict[str, list[float]], device: str) -> None:
        self.phases, self.device = phases, device
        sync(device)
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.phases.setdefault(name, []).append(now - self.t)
        self.t = now


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int | None:
    """FLOPs of one call of ``fn`` (forward + backward), counted with the math attention backend."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_only = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # older torch
        math_only = contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    try:
        with math_only, counter:
            fn()
    except Exception as e:  # a FLOP count must never cost the benchmark
        print(f"[bench] FLOP count failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return int(counter.get_total_flops())


def count_case_flops(ctx: Context, cases: dict[str, Case]) -> None:
    """``case.info["flops"]`` for every case (one full step each, which also warms it up)."""
    if ctx.flops:
        for case in cases.values():
            case.info["flops"] = count_flops(case.step)


def add_flops(ctx: Context, cases: dict[str, Case], timings: dict, results: dict) -> None:
    """Add FLOPs per step, achieved TFLOP/s and (CUDA) model FLOP utilisation to ``results``."""
    peak = peak_flops(ctx)
    for name, case in cases.items():
        flops = case.info.get("flops")
        res = results.setdefault(name, {})
        res["flops_per_step"] = flops
        if flops:
            t = timings[name]["wall_s"]["median"]
            res["achieved_tflops"] = flops / t / 1e12
            res["mfu"] = flops / t / peak if peak else None
        else:
            res["achieved_tflops"] = None
            res["mfu"] = None


# --------------------------------------------------------------------------------------------------
# memory probes (fresh process per variant)
# --------------------------------------------------------------------------------------------------
_PRELOAD = [
    "torch",
    "monai",
    "medhpm",
    "medhpm.models",
    "medhpm.pretrain.trainer",
    "monai.networks.nets",
    "monai.losses",
    "monai.inferers",
    "benchmarks.common",
]
_CTX = None


def _mp_context():
    global _CTX
    if _CTX is None:
        methods = mp.get_all_start_methods()
        if "forkserver" in methods:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(_PRELOAD)
        else:  # e.g. macOS / Windows: a fresh interpreter per probe, slower but equally clean
            _CTX = mp.get_context("spawn")
    return _CTX


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux); empty elsewhere."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    st = _proc_status()
    if "VmHWM" in st:
        return st["VmHWM"]
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _memory_child(module: str, spec: dict, device: str, threads: int, steps: int) -> dict:
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    apply_threads(threads)
    reset_ok = _reset_peak_rss()
    rss0 = _proc_status().get("VmRSS", _peak_rss_bytes())
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        alloc0 = torch.cuda.memory_allocated(device)
    case = importlib.import_module(module).build_case(spec, device)
    sync(device)
    rss_built = _proc_status().get("VmRSS", 0)
    alloc_built = torch.cuda.memory_allocated(device) if cuda else 0
    for _ in range(steps):
        case.step()
    sync(device)
    out = {
        "method": "peak RSS (VmHWM) of a fresh process minus its RSS before building the variant",
        "rss_start_mib": rss0 / 2**20,
        "static_mib": max(rss_built - rss0, 0) / 2**20,
        "peak_mib": max(_peak_rss_bytes() - rss0, 0) / 2**20,
        "peak_reset": reset_ok,
        "steps": steps,
    }
    if cuda:
        out["cuda_static_mib"] = (alloc_built - alloc0) / 2**20
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - alloc0) / 2**20
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        out["method"] += "; CUDA: max_memory_allocated minus allocated before building"
    return out


def measure_memory(ctx: Context, module: str, spec: dict, steps: int = 2) -> dict | None:
    """Peak memory of ``module.build_case(spec, device)`` plus ``steps`` steps, in a fresh process."""
    if not ctx.memory:
        return None
    mpc = _mp_context()
    try:
        with mpc.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(_memory_child, (module, spec, ctx.device, torch.get_num_threads(), steps))
    except Exception as e:  # report, never fail the benchmark over a memory probe
        ctx.log(f"memory probe failed for {spec}: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------------
def result_path(ctx: Context, name: str) -> Path:
    return Path(ctx.results_dir) / f"{name}_{ctx.torch_device.type}_{ctx.size}.json"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN / inf become None, tuples lists, tensors numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(ctx: Context, name: str, payload: dict, started: float) -> Path:
    from medhpm.runtime.files import atomic_write_text

    doc = {
        "schema": SCHEMA,
        "name": name,
        "device": ctx.torch_device.type,
        "size": ctx.size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": time.time() - started,
        "machine": {**machine_info(ctx.device), "loadavg_end": _loadavg()},
        **payload,
    }
    doc["machine"]["loadavg_start"] = ctx.extra.get("loadavg_start", doc["machine"]["loadavg_start"])
    path = result_path(ctx, name)
    atomic_write_text(path, json.dumps(_clean(doc), indent=2) + "\n")
    ctx.log(f"wrote {path}")
    return path


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
