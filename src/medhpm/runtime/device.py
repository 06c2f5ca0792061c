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


def configure_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


def peak_memory(device) -> dict:
    """Peak memory of this process: CUDA max allocated on a GPU, else the max resident set size."""
    if getattr(device, "type", "cpu") == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "cpu_max_rss"}
