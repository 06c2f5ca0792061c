"""Device and precision choice: CUDA when present, else CPU; bfloat16 autocast on CUDA, float32 on CPU.

``runtime.precision``:

* ``auto``: bf16 autocast on CUDA, float32 on a CPU;
* ``fp32`` / ``bf16``: always that;
* ``bf16-native``: bf16 autocast where the device computes bf16 natively (CUDA; a CPU whose flags list
  ``avx512_bf16`` or ``amx_bf16``), float32 elsewhere (a CPU without them would emulate bf16, which is slower
  than float32). A training setting: prediction (:func:`inference_dtype`) treats it as ``auto``, so a CPU
  prediction stays float32 and equal to the exported models' (docs/export.md). The default demo uses it:
  about half the fine-tuning step on a CPU with AVX512-BF16 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import os
import resource

import torch

from medhpm.config import CPU_MEMORY


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device={spec!r} asks for CUDA, but this torch build sees no CUDA device")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "bf16-native")


def cpu_info(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (or the given text), e.g. ``model name``,
    ``cpu family``, ``model``, ``flags``; empty where that file does not exist (macOS, Windows)."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # a blank line ends the first processor's block
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (x86 ``avx512_bf16`` or ``amx_bf16`` in the flags of
    :func:`cpu_info`); False where ``/proc/cpuinfo`` does not exist (macOS, Windows)."""
    flags = set(cpu_info(cpuinfo).get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(device: torch.device, precision: str = "auto"):
    """None for float32; torch.bfloat16 when the trainers' autocast should run (see the module text)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "bf16-native" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return torch.bfloat16 if device.type == "cuda" else None


def inference_dtype(device: torch.device, precision: str = "auto"):
    """The prediction's autocast dtype: as :func:`autocast_dtype`, but ``bf16-native`` (a training speed
    setting) predicts as ``auto`` does."""
    return autocast_dtype(device, "auto" if precision == "bf16-native" else precision)


def autocast(device: torch.device, dtype) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# where a CPU limit lives: cgroup v2's cpu.max ("QUOTA PERIOD", or "max PERIOD" for none), else cgroup v1's
# cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us, under the names the v1 cpu controller is mounted with
_CGROUP_V1_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a user's explicit choice, never overridden


def _own_cgroups(proc_cgroup: str | os.PathLike) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 cpu-controller path) of this process, from /proc/self/cgroup."""
    from pathlib import Path

    v2 = v1 = None
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _up_to(root, path: str | None) -> list:
    """``root/path`` and each folder above it up to ``root`` (a namespaced container's path is "/")."""
    rel = [p for p in (path or "/").split("/") if p]
    return [root.joinpath(*rel[:n]) for n in range(len(rel), -1, -1)]


def _limit(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_quota(
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike = "/proc/self/cgroup"
) -> float | None:
    """The CPUs this process may use by its cgroup's CFS quota (``docker --cpus``, a Kubernetes CPU limit,
    a batch scheduler's cgroup), e.g. 2.0: the smallest quota / period of its cgroup and the cgroups above
    it (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); None when none is set or readable."""
    from pathlib import Path

    root = Path(cgroup_root)
    v2, v1 = _own_cgroups(proc_cgroup)
    limits = []
    for d in _up_to(root, v2):
        try:
            limits.append(_limit(*(d / "cpu.max").read_text().split()[:2]))
        except (OSError, TypeError):
            continue
    if not any(f.exists() for f in (root / "cpu.max", root / "cgroup.controllers")):  # not a v2 hierarchy
        for name in _CGROUP_V1_DIRS:
            for d in _up_to(root / name, v1):
                try:
                    limits.append(
                        _limit(
                            (d / "cpu.cfs_quota_us").read_text().strip(), (d / "cpu.cfs_period_us").read_text().strip()
                        )
                    )
                except OSError:
                    continue
    known = [x for x in limits if x is not None]
    return min(known) if known else None


def configure_threads(
    threads: int,
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
) -> str | None:
    """``threads`` > 0: pin torch to that many threads. 0: torch's own count (every core it sees, which
    follows the CPU affinity mask but not a cgroup CPU quota), capped at the quota rounded down (at least
    1): a container limited to 2 CPUs on a 64-core host would otherwise run 64 threads in 2 CPUs' time,
    and every parallel region would wait for threads the quota has stopped. Left alone when the
    environment sets OMP_NUM_THREADS or MKL_NUM_THREADS. Returns what was capped, for the run's first line,
    or None."""
    if threads and threads > 0:
        torch.set_num_threads(threads)
        return None
    if any(os.environ.get(k) for k in THREAD_ENV):
        return None
    quota = cpu_quota(cgroup_root, proc_cgroup)
    have = torch.get_num_threads()
    if quota is None or have <= max(int(quota), 1):
        return None
    torch.set_num_threads(max(int(quota), 1))
    return f"the cgroup CPU quota of {quota:g} CPU{'' if quota == 1 else 's'} (torch would use {have})"


# glibc's mallopt(3) parameters, and the values ``reuse`` sets: blocks up to 1 GiB come from the heap (not a
# fresh mmap each time), and up to 2 GiB - 1 of free memory at the heap's top stays with the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
REUSE_MMAP_THRESHOLD = 1 << 30
REUSE_MMAP_THRESHOLD_CAPPED = 32 << 20  # where a glibc refuses 1 GiB: mallopt(3)'s documented upper limit on 64 bits
REUSE_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int


def configure_cpu_memory(policy: str, device: torch.device | str = "cpu") -> dict:
    """``runtime.cpu_memory``: whether this process keeps the memory a training step frees for the next step.

    By default glibc's malloc hands every large freed block back to the operating system (a block of more
    than its mmap threshold, which adapts up to 32 MiB, is unmapped when freed; free memory above its trim
    threshold at the heap's top is returned), so a CPU training step, whose activations and gradients are
    tens of MiB each and are all freed at its end, maps and zero-fills them again every step: 15 000 to
    50 000 page faults a step at the demo's shapes. ``reuse`` raises both thresholds (mallopt(3): blocks up to
    1 GiB from the heap, or 32 MiB where a glibc refuses more (glibc 2.36 takes 1 GiB); up to 2 GiB of free
    memory kept), so the next step reuses the pages: the demo's float32 fine-tuning step is about 11 %
    faster on an Intel Xeon and the whole demo 5 % (docs/PERFORMANCE.md section 8). The process's
    resident memory then stays near its peak instead of falling between steps; the peak itself does not
    grow by more than fragmentation (``benchmarks/cpu_memory.py`` measures both).

    ``auto``: ``reuse`` on a CPU device where the C library is glibc, else nothing; ``release``: leave glibc's
    defaults. A process-wide setting: DataLoader workers forked after it inherit it. CUDA tensors come from
    PyTorch's own caching allocator, which already reuses. Returns what was done, e.g. ``{"policy": "reuse",
    "applied": True, "mmap_threshold": 1073741824, "trim_threshold": 2147483647}``; ``applied`` is False
    (with a ``reason``) where nothing was changed.
    """
    if policy not in CPU_MEMORY:
        raise ValueError(f"runtime.cpu_memory={policy!r} is not one of {', '.join(CPU_MEMORY)}")
    if policy == "release":
        return {"policy": policy, "applied": False, "reason": "glibc's defaults kept (runtime.cpu_memory=release)"}
    if torch.device(device).type != "cpu" and policy == "auto":
        return {"policy": policy, "applied": False, "reason": f"device {device}: PyTorch's caching allocator reuses"}
    libc = _glibc()
    if libc is None:
        return {"policy": policy, "applied": False, "reason": "the C library is not glibc (no mallopt)"}
    mmap_threshold = REUSE_MMAP_THRESHOLD
    if not libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        mmap_threshold = REUSE_MMAP_THRESHOLD_CAPPED
        if not libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
            return {"policy": policy, "applied": False, "reason": "glibc refused a higher mmap threshold"}
    if not libc.mallopt(_M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD):
        return {"policy": policy, "applied": False, "reason": "glibc refused a higher trim threshold"}
    return {"policy": policy, "applied": True, "mmap_threshold": mmap_threshold, "trim_threshold": REUSE_TRIM_THRESHOLD}


def _glibc():
    """The process's glibc (``ctypes.CDLL``) with a typed ``mallopt``, or None where the C library is another
    (musl, macOS, Windows)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def peak_memory(device) -> dict:
    """Peak memory of this process: CUDA max allocated on a GPU, else the max resident set size."""
    if getattr(device, "type", "cpu") == "cuda":
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_kind": "cuda_max_allocated",
        }
    return {
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_kind": "cpu_max_rss",
    }
