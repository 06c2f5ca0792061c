"""Self-describing checkpoints, written atomically and loaded safely: the one place a checkpoint is read.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so ``torch.load`` runs with
``weights_only=True``): model arguments, resolved config, transform spec, epoch, step, optimizer,
scheduler state, EMA teacher, RNG states, package version. Names: ``last.pt`` (every epoch),
``best.pt`` (best validation), ``final.pt`` (end of training).

:func:`load_checkpoint` reads every ``.pt``/``.pth`` file medhpm opens (its own checkpoints and foreign
state dicts alike) and, given ``stage=``, checks that the file is a medhpm checkpoint of that stage with
the entries its use needs; every error is a :class:`CheckpointError` that names the file.
:func:`checkpoint_keys` (defined in ``medhpm.config``, beside ``CHECKPOINT_KEYS``) gives the config keys a
stage's checkpoint depends on.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from medhpm.runtime.files import atomic_write_bytes

STAGES = {"pretrain": "pre-training", "finetune": "fine-tuning"}

# entries of a checkpoint that hold a dict when present
_DICT_ENTRIES = ("model", "teacher", "optimizer", "config", "model_args", "transforms", "rng")


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
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours part of its message
    if "WeightsUnpickler error:" in text:  # the reason follows, on the same line or the next non-empty one
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        return (rest or [type(e).__name__])[0].split(". ")[0][:200]
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return first.split(". ")[0][:200]


# Which checkpoint of a run folder a command reads. Continuing a run: the newest weights first. Using a
# fine-tuning run's trained model (predict, export): the best validation Dice first, the checkpoint the
# demo and experiments evaluate, so a folder gives the figures its report shows.
# Initialising fine-tuning from a run folder (``--init RUN``): a fine-tuning run's reported model (best.pt,
# which only fine-tuning writes), else a pre-training run's newest weights.
RESUME_ORDER = ("last.pt", "final.pt", "best.pt")
MODEL_ORDER = ("best.pt", "final.pt", "last.pt")
INIT_ORDER = ("best.pt", "last.pt", "final.pt")


def load_checkpoint(
    path: str | Path,
    stage: str | None = None,
    map_location="cpu",
    keys: Sequence[str] = ("model",),
    purpose: str | None = None,
    folder_order: Sequence[str] = RESUME_ORDER,
) -> dict:
    """Read a checkpoint (or any ``torch.load``-able state dict) safely, ``weights_only=True``.

    Args:
        path: the file, or a run folder (its first checkpoint of ``folder_order``).
        stage: ``None`` to accept any dict (foreign state dicts included); ``"pretrain"`` or ``"finetune"``
            to require a medhpm checkpoint of that stage holding every entry of ``keys``.
        map_location: as for ``torch.load``.
        keys: entries a ``stage`` checkpoint must hold (not None; a dict for model, config, ...); a dotted
            key (``"model_args.encoder"``) names a nested entry.
        purpose: what the checkpoint is for, said when it is of another stage
            (e.g. ``"prediction needs a fine-tuning checkpoint (best.pt or final.pt of `medhpm finetune`)"``).
        folder_order: checkpoint names tried in a run folder: :data:`RESUME_ORDER` (``last.pt`` first) or
            :data:`MODEL_ORDER` (``best.pt`` first).
    Returns:
        The checkpoint dict.
    Raises:
        CheckpointError: naming the file, when it is missing, damaged or truncated, holds objects that
            ``weights_only`` refuses, is not a dict, or (with ``stage``) is not a medhpm checkpoint, is of
            another stage or lacks one of ``keys``.
    """
    path = resolve_checkpoint(path, folder_order)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {load_error_reason(e)}") from None
    except Exception as e:
        reason = load_error_reason(e)
        calls = code_in_pickle(path)
        if calls:  # the true cause: a pickle that would import and call these when loaded
            raise CheckpointError(
                f"{path} is not a medhpm checkpoint: it is a pickle that calls {', '.join(calls[:3])} when "
                "loaded, so loading it would run code; it was not loaded (medhpm reads checkpoints with "
                "torch.load(weights_only=True))"
            ) from None
        if _UNSAFE.search(reason):  # weights_only refuses arbitrary pickled objects: say so plainly
            raise CheckpointError(
                f"checkpoint {path} holds objects that cannot be loaded safely (weights_only=True): {reason}"
            ) from None
        # anything else the unpickler stumbles on (random bytes, a cut or overwritten file) is damage
        raise CheckpointError(
            f"checkpoint {path} is not a readable checkpoint: it is damaged or not a PyTorch file ({reason})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint or state dict")
    if stage is not None:
        _check_stage(state, path, stage, keys, purpose)
    return state


# the globals a PyTorch state dict's pickle names: tensors' rebuild functions and storages, OrderedDict, and
# the helpers torch and numpy use for bytes and scalars; any other global is code the pickle would call
_STATE_DICT_GLOBALS = re.compile(r"^((torch|numpy)([._ ].*)?|collections OrderedDict|_codecs encode)$")
_PICKLE_SCAN_BYTES = 64 * 2**20  # a state dict's pickle is small (tensors live beside it); bounded work


def code_in_pickle(path: str | Path) -> list[str]:
    """The globals (``"module name"``) that the pickle of ``path`` (a plain pickle, or the ``data.pkl`` of a
    ``torch.save`` zip) would import and call, other than those of a state dict; read opcode by opcode with
    :mod:`pickletools`, which builds and calls nothing. Empty when there are none or the file cannot be
    scanned (damage is then the cause to report)."""
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not names or z.getinfo(names[0]).file_size > _PICKLE_SCAN_BYTES:
                    return []
                data = z.read(names[0])
        else:
            with open(path, "rb") as f:
                data = f.read(_PICKLE_SCAN_BYTES)
        found: list[str] = []
        strings: list[str] = []  # the strings on top of the stack, as STACK_GLOBAL will take them
        memo: dict[int, str] = {}  # memoised strings (module and name are often fetched from the memo)
        memo_n = 0
        top: str | None = None  # the string the last opcode pushed, if it pushed one
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = None
            pushed = None
            if "UNICODE" in op.name and isinstance(arg, str):
                pushed = arg
            elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                index = memo_n if op.name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
                memo_n += op.name == "MEMOIZE"  # every object memoised takes an index, strings or not
                if top is not None:
                    memo[index] = top
                pushed = top  # memoising leaves the stack as it was
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(int(arg))  # type: ignore[arg-type]
            elif op.name in ("GLOBAL", "INST"):
                name = str(arg)
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                name = f"{strings[0]} {strings[1]}"
            if pushed is not None and op.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                strings = (strings + [pushed])[-2:]
            elif pushed is None:
                strings = []
            top = pushed
            if name and not _STATE_DICT_GLOBALS.match(name) and name not in found:
                found.append(name)
        return [n.replace(" ", ".") for n in found]
    except Exception:  # not a pickle, or cut short: nothing to tell beyond the loader's error
        return []


# what weights_only=True says when a file holds objects it will not build (a pickle that would run code)
_UNSAFE = re.compile(r"global|not an allowed|Unsupported class|weights_only", re.IGNORECASE)


def resolve_checkpoint(path: str | Path, folder_order: Sequence[str] = RESUME_ORDER) -> Path:
    """``path`` itself if it is a file, else the first of ``folder_order`` in the run folder ``path``;
    CheckpointError naming the path when there is none."""
    path = Path(path)
    if path.is_dir():
        for name in folder_order:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without {', '.join(folder_order[:-1])} or {folder_order[-1]}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _check_stage(state: dict, path: Path, stage: str, keys: Sequence[str], purpose: str | None) -> None:
    name = STAGES[stage]
    need = purpose or f"a {name} checkpoint is needed"
    if state.get("format") != "medhpm-checkpoint" and "stage" not in state:
        raise CheckpointError(
            f"{path} is not a medhpm checkpoint (a dict with keys {', '.join(sorted(map(str, state))[:6])}); {need}"
        )
    if state.get("stage") != stage:
        raise CheckpointError(f"{path} is a {state.get('stage')!r} checkpoint, not a {name} one; {need}")
    lacking = [k for k in keys if _entry(state, k) is None or (k in _DICT_ENTRIES and not isinstance(state[k], dict))]
    if lacking:
        raise CheckpointError(
            f"{name} checkpoint {path} lacks {', '.join(lacking)}: it is damaged or was written "
            "by an incompatible medhpm version"
        )


def _entry(state: dict, key: str):
    """``state[key]``, or for a dotted key (``"model_args.encoder"``) the nested entry; None if absent."""
    obj = state
    for part in key.split("."):
        if not isinstance(obj, dict) or obj.get(part) is None:
            return None
        obj = obj[part]
    return obj
