"""What medhpm tells its user on the console: :func:`echo`, a run's line, printed by the main process only."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medhpm.runtime.distributed import DistInfo


def echo(msg: str, info: DistInfo | None = None) -> None:
    if info is None or info.is_main:
        print(msg, flush=True)
