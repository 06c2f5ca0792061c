"""Atomic file writes: a temporary file in the same folder, flushed and renamed over the target.

A crash (even SIGKILL) while writing leaves either the previous file or the new one, never a half-written
file under the final name. Every output of medhpm goes through these helpers.

The temporary file is named ``.NAME.PID.XXXXXXXX.tmp[SUFFIX]`` (hidden, never ``NAME`` itself): a SIGKILL
can leave one behind, and :func:`remove_stale_temps` deletes those whose writer process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import yaml

from medhpm.config import Config, to_dict


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    ``suffix`` keeps an extension that writers look at (``.nii.gz``, ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # the data must be on disk before the rename makes it visible
            os.fsync(fh.fileno())
        # mkstemp creates 0600; outputs get the permissions an ordinary write would give them
        os.chmod(tmp_path, 0o666 & ~_umask())
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    # no extension on the temporary file: a half-written ``.last.pt.PID.X.tmp`` never matches ``*.pt``
    with atomic_path(path, suffix="") as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (encoders are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_png(fig, path: str | Path, dpi: int = 90) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it (the one way figures are saved)."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def atomic_save_nifti(img, path: str | Path) -> Path:
    """Save a nibabel image atomically (keeps the .nii/.nii.gz extension on the temp file)."""
    import nibabel as nib

    return atomic_write_with(path, lambda tmp: nib.save(img, str(tmp)))


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")


def _pid_alive(pid: int, keep_own: bool = True) -> bool:
    if pid == os.getpid():
        return keep_own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | Path, keep_own: bool = True) -> list[Path]:
    """Delete temporary files of :func:`atomic_path` in ``folder`` (not below) whose writer process is no
    longer running on this machine: what a SIGKILL during a checkpoint write leaves behind (as large as a
    checkpoint). Files of live writers are kept. ``keep_own=False`` also deletes files named with this
    process's id (a restarted container often reuses the dead writer's id): only call it so before this
    process writes into ``folder``. Returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_RE.match(p.name)
        if m is None or not p.is_file() or _pid_alive(int(m.group("pid")), keep_own):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


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


class OverwriteError(ValueError):
    """An output of a command would be written onto one of its inputs."""


def _input_files(inputs) -> list[str]:
    """The input files: each input that is not a folder, and for a folder (a DICOM series, a folder of
    scans) the files directly inside it (writing into an input folder is fine, onto its files is not)."""
    out: list[str] = []
    for p in inputs:
        if p is None:
            continue
        p = os.fspath(p)
        if os.path.isdir(p):
            with contextlib.suppress(OSError):
                out += [e.path for e in os.scandir(p) if e.is_file()]
        else:
            out.append(p)
    return out


def refuse_overwriting_inputs(outputs, inputs, hint: str = "choose another output path with -o") -> None:
    """The one rule of every command that writes: no output may be written onto an input.

    ``outputs``: the paths a command will write (files, or a folder it writes into); ``inputs``: the files
    and folders it reads (a folder stands for the files directly in it). An output is the input when it
    resolves to the same path or, existing, is the same file (a symbolic link, a hard link, another spelling
    on a case-insensitive disk): one look-up per output, so thousands of scans plan in linear time. Raises
    :class:`OverwriteError` naming both paths, so call it before anything is read or written.
    """
    by_path: dict[str, str] = {}
    by_file: dict[tuple[int, int], str] = {}
    for inp in _input_files(inputs):
        by_path.setdefault(os.path.realpath(inp), inp)
        with contextlib.suppress(OSError):
            st = os.stat(inp)
            by_file.setdefault((st.st_dev, st.st_ino), inp)
    for out in outputs:
        if out is None:
            continue
        out = os.fspath(out)
        hit = by_path.get(os.path.realpath(out))
        if hit is None:
            with contextlib.suppress(OSError):
                st = os.stat(out)
                hit = by_file.get((st.st_dev, st.st_ino))
        if hit is not None:
            what = "is" if os.path.normpath(out) == os.path.normpath(hit) else "would be written onto"
            raise OverwriteError(
                f"refusing to write {out}: it {what} the input {hit}, which would be destroyed; "
                f"nothing was read or written ({hint})"
            )


# ---------------------------------------------------------------------------------------------- run folders
LOCK_NAME = ".medhpm.lock"


class RunFolderLocked(OSError):
    """Another live process holds the run folder's lock."""


def _lock_holder(fd: int) -> dict:
    """The holder record in an open lock file ({} when empty or unreadable)."""
    import json
    import time

    for _ in range(20):  # the holder writes its record just after taking the lock: give it a moment
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode("utf-8", "replace")
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _holder_text(h: dict) -> str:
    if not h:
        return "a process that has not written its pid yet"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}" + (
        f" ({h['command']})" if h.get("command") else ""
    )


@contextlib.contextmanager
def run_folder_lock(folder: str | Path, enabled: bool = True, what: str = "run") -> Iterator[Path | None]:
    """Hold an exclusive lock on a run folder (``folder/.medhpm.lock``, ``fcntl.flock``) for the ``with``
    block: one run per folder, or its config, metrics and checkpoints would mix two runs.

    A second process is refused at once with :class:`RunFolderLocked` naming the holder (pid, host, start
    time, command). The kernel releases a flock when its holder dies, even by SIGKILL: the lock of a killed
    run is taken over (and said so on stderr). ``enabled=False`` (torchrun ranks other than 0) holds nothing.
    Yields the lock file (None when disabled).
    """
    import fcntl
    import json
    import socket
    import sys
    import time

    if not enabled:
        yield None
        return
    folder = check_writable(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            raise RunFolderLocked(
                f"{folder} is in use by another {what}: {_holder_text(holder)} holds {path}. One run per folder: "
                "wait for it to finish (or stop it), or choose another --out"
            ) from None
        previous = _lock_holder(fd) if os.fstat(fd).st_size else {}
        if previous and previous.get("pid") != os.getpid():  # its holder died without releasing the folder
            print(
                f"note: {folder} was locked by a run that is gone ({_holder_text(previous)}); taking it over",
                file=sys.stderr,
                flush=True,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(fd)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):  # an empty file: released on purpose, not a killed holder
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- run outputs
OUTPUT_MARGIN = 50 * 2**20  # figures, metrics.jsonl, TensorBoard events, configs


def disk_needed(checkpoint_bytes: int, names, existing=(), margin: int = OUTPUT_MARGIN) -> tuple[int, str]:
    """The bytes a run will write, and how they add up: one checkpoint for each of ``names`` that does
    not exist yet (a resumed run replaces ``existing`` ones in place), one temporary copy while a
    checkpoint is written (atomic writes: the old file stays until the new one is complete), and
    ``margin`` for figures and logs."""
    new = [n for n in names if n not in set(existing)]
    mib = checkpoint_bytes / 2**20
    total = (len(new) + 1) * checkpoint_bytes + margin
    files = ", ".join(f"{n}.pt" for n in new)
    parts = [
        f"{len(new)} new checkpoint(s) of {mib:.1f} MiB ({files})" if new else "no new checkpoint",
        f"1 temporary copy of {mib:.1f} MiB while one is written",
        f"{margin / 2**20:.0f} MiB for figures and logs",
    ]
    return total, " + ".join(parts)


def write_run_summary(run_dir: Path, summary: dict) -> None:
    """``RUN/summary.json`` of a finished stage (atomic)."""
    import json

    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
