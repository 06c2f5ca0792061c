"""Self-describing checkpoints, written atomically and loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so ``torch.load`` runs with
``weights_only=True``): model arguments, resolved config, transform spec, epoch, step, optimizer,
scheduler state, EMA teacher, RNG states, package version. Names: ``last.pt`` (every epoch),
``best.pt`` (best validation), ``final.pt`` (end of training).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from medhpm.runtime.io import atomic_write_bytes


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Serialise to memory, then write atomically: a kill mid-write leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_error_reason(e: BaseException) -> str:
    """The telling part of a ``torch.load`` error, in one line: the first sentence of a damaged-file error, or
    what ``weights_only`` refused (not torch's advice to load the file unsafely)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours part of its message
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0][:200]
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return first.split(". ")[0][:200]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        for name in ("last.pt", "final.pt", "best.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} is a folder without last.pt, final.pt or best.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {load_error_reason(e)}") from None
    except Exception as e:  # weights_only refuses arbitrary pickled objects: say so plainly
        raise CheckpointError(
            f"checkpoint {path} holds objects that cannot be loaded safely (weights_only=True): "
            f"{load_error_reason(e)}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a medhpm checkpoint dict")
    return state
