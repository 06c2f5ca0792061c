"""Metric logging: a JSON-lines file in the run folder plus TensorBoard; rank 0 only."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


class MetricLogger:
    """Append records to ``run_dir/metrics.jsonl`` and scalars to TensorBoard under ``run_dir/tb``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
                except Exception as e:  # TensorBoard is a convenience: never let it stop training
                    print(f"[medhpm] TensorBoard logging disabled: {e}", file=sys.stderr)

    def log(self, record: dict, step: int | None = None, prefix: str = "") -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}{k}", v, step)

    def image(self, tag: str, array_hwc, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, array_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    out: list[dict] = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
