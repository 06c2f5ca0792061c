"""What medhpm tells its user on the console: :func:`echo` (a run's line, from the main process only), the
versions ``medhpm --version`` prints, which errors are a user's (bad input, a bad config: the command line
shows them as one ``error: ...`` line, without a traceback) and that line, and medhpm's own warnings as one
``warning: ...`` line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from medhpm.runtime.distributed import DistInfo


def echo(msg: str, info: DistInfo | None = None) -> None:
    if info is None or info.is_main:
        print(msg, flush=True)


def version_text() -> str:
    import platform

    import monai
    import torch

    from medhpm import __version__
    from medhpm.runtime.device import pick_device

    cuda = torch.version.cuda or "none (CPU build)"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (
        f"medhpm {__version__}\n"
        f"python {platform.python_version()}\n"
        f"torch {torch.__version__}\n"
        f"monai {monai.__version__}\n"
        f"cuda {cuda} ({gpus} GPU{'s' if gpus != 1 else ''} visible)\n"
        f"device {pick_device('auto')}"
    )


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean bad input or a bad config: shown as one clear line, no traceback."""
    from medhpm.config import ConfigError
    from medhpm.runtime.checkpoint import CheckpointError

    errs: list[type] = [ConfigError, CheckpointError, ValueError, OSError, KeyError]
    try:
        from medhpm.runtime.loop import NonFiniteLossError, TrainingError

        errs += [NonFiniteLossError, TrainingError]
    except ImportError:
        pass
    return tuple(errs)


def reportable(e: BaseException) -> Optional[BaseException]:
    """The user error to report for ``e``: ``e`` itself, or the first user error it was raised from (MONAI
    wraps an error of a transform in ``RuntimeError("applying transform ...")``); None for anything else,
    which is a bug and keeps its traceback."""
    errs = user_errors()
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, errs):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__
    return None


def error_message(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        return f"missing key {msg}"
    if "Original Traceback" in msg:
        # re-raised from a DataLoader worker: keep the original message, not the worker's traceback
        for marker in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__name__}: "):
            if marker in msg:
                return msg.rsplit(marker, 1)[1].strip()
        return msg.strip().splitlines()[-1]
    return msg


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # medhpm's own folder


def show_warning(message, category, filename, lineno, file=None, line=None, _default=None):
    """medhpm's own warnings as one ``warning: ...`` line, like its errors (not Python's
    ``path.py:124: UserWarning: ...`` with a source line under it); other packages' warnings as Python
    shows them."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _default(message, category, filename, lineno, file, line)
