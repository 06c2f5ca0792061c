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
    stamp = out / "phantom.json"
    want = {"cases": cfg.phantom_cases, "seed": cfg.phantom_seed}
    if cfg.phantom_variability != "standard":  # stamps of standard data sets stay as they were
        want["variability"] = cfg.phantom_variability
    if stamp.exists() and (out / "dataset.json").exists():
        try:
            if json.loads(stamp.read_text()) == want:
                return out / "dataset.json"
        except json.JSONDecodeError:
            pass
    path = write_phantom_dataset(out, cases=cfg.phantom_cases, seed=cfg.phantom_seed,
                                 variability=cfg.phantom_variability)

    atomic_write_text(stamp, json.dumps(want))
    return path
