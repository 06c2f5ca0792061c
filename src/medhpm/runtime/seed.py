"""Seeding and deterministic mode; RNG state capture for exact resume."""

from __future__ import annotations

import os
import random
from typing import cast

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy, torch (all devices) and MONAI's global state.

    ``deterministic`` also asks torch for deterministic kernels, so two runs with the same seed give
    identical losses on CPU.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    from monai.utils import set_determinism

    set_determinism(seed=seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:  # MONAI's set_determinism switches cudnn to deterministic; we only want that when asked
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def rng_state() -> dict:
    """Every RNG state a training run depends on, as tensors/lists that torch.load(weights_only) accepts."""
    state = {"python": list(_py_state_to_list(random.getstate())), "numpy": _np_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if not state:
        return
    if "python" in state:
        random.setstate(_py_state_from_list(state["python"]))
    if "numpy" in state:
        np_state = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                np.asarray(np_state["keys"], dtype=np.uint32),
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_state_from_list(lst):
    version, internal, gauss = lst
    return (int(version), tuple(int(v) for v in internal), gauss)


def _np_state() -> dict:
    # the legacy tuple (numpy types the default call as the tuple or a dict)
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
