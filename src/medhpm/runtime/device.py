"""Device and precision choice: CUDA when present, else CPU; bfloat16 autocast on CUDA, float32 on CPU."""

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


def autocast_dtype(device: torch.device, precision: str = "auto"):
    """None for float32; torch.bfloat16 when autocast should run."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


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
