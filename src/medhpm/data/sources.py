"""Where a run's data comes from: the configured data set, or phantoms generated on the spot."""

from __future__ import annotations

import json
from pathlib import Path

from medhpm.config import DataConfig
from medhpm.data.phantom import write_phantom_dataset
from medhpm.runtime.files import atomic_write_text


def resolve_dataset(cfg: DataConfig, work_dir: str | Path) -> Path:
    """Return the path of the data set to read.

    ``dataset: phantom`` generates ``phantom_cases`` phantoms with ``phantom_seed`` into
    ``work_dir/phantom`` once and reuses them afterwards (same cases and seed); anything else is a
    user path, returned as given.
    """
    if cfg.dataset != "phantom":
        path = Path(cfg.dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.dataset {cfg.dataset!r} does not exist")
        return path

    out = Path(work_dir) / "phantom"
    if phantoms_written(cfg, work_dir):
        return out / "dataset.json"
    stamp, want = out / "phantom.json", _phantom_stamp(cfg)
    path = write_phantom_dataset(
        out, cases=cfg.phantom_cases, seed=cfg.phantom_seed, variability=cfg.phantom_variability
    )

    atomic_write_text(stamp, json.dumps(want))
    return path


def _phantom_stamp(cfg: DataConfig) -> dict:
    want: dict[str, int | str] = {"cases": cfg.phantom_cases, "seed": cfg.phantom_seed}
    if cfg.phantom_variability != "standard":  # stamps of standard data sets stay as they were
        want["variability"] = cfg.phantom_variability
    return want


def phantoms_written(cfg: DataConfig, work_dir: str | Path) -> bool:
    """Whether ``work_dir/phantom`` already holds the phantoms ``cfg`` asks for (so that
    :func:`resolve_dataset` only returns their path)."""
    out = Path(work_dir) / "phantom"
    stamp = out / "phantom.json"
    if not (stamp.exists() and (out / "dataset.json").exists()):
        return False
    try:
        return json.loads(stamp.read_text()) == _phantom_stamp(cfg)
    except json.JSONDecodeError:
        return False
