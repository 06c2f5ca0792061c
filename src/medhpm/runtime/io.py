"""Atomic file writes: a temporary file in the same folder, flushed and renamed over the target.

A crash (even SIGKILL) while writing leaves either the previous file or the new one, never a half-written
file under the final name. Every output of medhpm goes through these helpers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    ``suffix`` keeps an extension that writers look at (``.nii.gz``, ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # the data must be on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # directory entry durable too (not possible on every FS)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_save_nifti(img, path: str | Path) -> Path:
    """Save a nibabel image atomically (keeps the .nii/.nii.gz extension on the temp file)."""
    import nibabel as nib

    return atomic_write_with(path, lambda tmp: nib.save(img, str(tmp)))


def check_writable(folder: str | Path, need_bytes: int = 50 * 1024 * 1024) -> Path:
    """Fail early, before any training, when ``folder`` cannot take our outputs.

    Raises OSError naming the folder when it cannot be created, is read-only or has less than
    ``need_bytes`` free.
    """
    import shutil

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    probe = folder / f".medhpm-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
    except OSError as e:
        raise OSError(f"output folder {folder} is not writable: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OSError(
            f"output folder {folder} has only {free / 2**20:.1f} MiB free; at least "
            f"{need_bytes / 2**20:.0f} MiB are needed for checkpoints and outputs"
        )
    return folder
