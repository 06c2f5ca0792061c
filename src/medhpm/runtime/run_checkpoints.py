"""A training run's checkpoints: what they hold (the loop's state, and what a stage adds through the four
hooks that open :class:`RunCheckpoints`), the disk room they need, writing them, and resuming a run from its
``last.pt``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from medhpm import __version__
from medhpm.config import Config, checkpoint_keys, differences, from_dict, to_dict
from medhpm.runtime.checkpoint import load_checkpoint, save_checkpoint
from medhpm.runtime.console import echo
from medhpm.runtime.distributed import DistInfo, unwrap
from medhpm.runtime.errors import TrainingError
from medhpm.runtime.files import atomic_write_text, disk_needed
from medhpm.runtime.seed import rng_state, set_rng_state


class RunCheckpoints:
    """The checkpoints of :class:`medhpm.runtime.loop.Trainer`, which derives from this class: it sets the
    attributes below (in its ``__init__`` and set-up), calls :meth:`_check_disk`, :meth:`_restore` and
    :meth:`_trim_metrics` at set-up and :meth:`save` after the epochs. A stage overrides the hooks."""

    # set by Trainer (its __init__ and set-up)
    stage: str
    cfg: Config
    sec: Any  # the stage's own config section
    run_dir: Path
    dist: DistInfo
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.AdamW
    base_lr: float
    start_epoch: int
    global_step: int
    best_metric: float
    skipped_steps: int
    history: list[dict]
    _last_saved: int | None

    # ------------------------------------------------------------------ what a stage adds to its checkpoints
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def model_args(self) -> dict:
        return {}

    def transforms_spec(self) -> dict:
        return {}

    # ------------------------------------------------------------------ room, resuming
    # the checkpoints a run of this stage leaves (fine-tuning adds best.pt)
    checkpoint_names: tuple[str, ...] = ("last", "final")

    def _check_disk(self) -> None:
        import shutil

        need, why = disk_needed(
            self._checkpoint_bytes(),
            self.checkpoint_names,
            existing=[n for n in self.checkpoint_names if (self.run_dir / f"{n}.pt").exists()],
        )
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            raise OSError(
                f"output folder {self.run_dir} has only {free / 2**20:.1f} MiB free; at least "
                f"{need / 2**20:.0f} MiB are needed for checkpoints and outputs ({why})"
            )

    def _checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: model, AdamW's two moments, tensors of ``extra_state``."""

        def nbytes(obj) -> int:
            if torch.is_tensor(obj):
                return obj.numel() * obj.element_size()
            if isinstance(obj, dict):
                return sum(nbytes(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(nbytes(v) for v in obj)
            return 0

        model = unwrap(self.model)
        moments = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        return nbytes(model.state_dict()) + moments + nbytes(self.extra_state())

    def _restore(self) -> None:
        path = self.run_dir / "last.pt"
        if not path.exists():
            raise TrainingError(
                f"cannot resume: {path} does not exist (the run stopped before its first "
                f"checkpoint, or {self.run_dir} is not a run folder); start it again without --resume"
            )
        state = load_checkpoint(
            path,
            stage=self.stage,
            map_location=self.device,
            keys=("model", "optimizer", "epoch", "step"),
            purpose=f"cannot resume a {self.stage} run from it",
        )
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another method's or model's weights
            raise TrainingError(self._misfit(path, state, e)) from None
        self.start_epoch = int(state["epoch"]) + 1
        self.global_step = int(state["step"])
        self.best_metric = float(state.get("best_metric", -math.inf))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.history = list(state.get("history", []))
        set_rng_state(state.get("rng", {}))
        self.load_extra_state(state)
        echo(f"[{self.stage}] resumed from {path} at epoch {self.start_epoch} (step {self.global_step})", self.dist)
        old = (state.get("config") or {}).get(self.stage) or {}
        old_batch = int(old.get("batch_size", 0)) * int(old.get("accum_steps", 1)) * int(state.get("world_size", 1))
        new_batch = self.sec.batch_size * self.sec.accum_steps * self.dist.world_size
        if old_batch and old_batch != new_batch:
            echo(
                f"[{self.stage}] note: the effective batch changes from {old_batch} to {new_batch} (world size "
                f"{state.get('world_size', 1)} -> {self.dist.world_size}); set {self.stage}.batch_size to keep it",
                self.dist,
            )

    def _misfit(self, path: Path, state: dict, e: BaseException) -> str:
        """Why the weights in ``path`` do not fit this run's model: the checkpoint keys whose values differ
        from the run's config (e.g. another pre-training method), else torch's first line."""
        changed: list[str] = []
        try:
            changed = differences(from_dict(state.get("config") or {}), self.cfg, checkpoint_keys(self.stage))
        except Exception:  # a stored config this version cannot read: say what torch said
            pass
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        why = (
            f"it was written with {'; '.join(changed)} (checkpoint -> this run)"
            if changed
            else f"{type(e).__name__}: {first}"
        )
        cfg_file = self.run_dir / f"config_{self.stage}.yaml"
        return (
            f"cannot resume from {path}: its weights do not fit the model of this run ({why}); the checkpoint "
            f"comes from another run than {cfg_file}. Put the run's own last.pt back, or start a new run "
            "with another --out"
        )

    def _trim_metrics(self) -> None:
        """Drop the log records of the epochs that are about to be (re)done: work after ``last.pt`` that a
        kill threw away, or an earlier attempt that never wrote ``last.pt`` (a fresh start drops every
        training record), so metrics.jsonl reads as one uninterrupted run."""
        import json

        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] >= self.start_epoch:
                continue
            keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, epoch: int) -> dict:
        return {
            "format": "medhpm-checkpoint",
            "version": __version__,
            "stage": self.stage,
            "epoch": epoch,
            "step": self.global_step,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "kind": "cosine",
                "base_lr": self.base_lr,
                "warmup_epochs": self.sec.warmup_epochs,
                "min_lr": self.sec.min_lr,
                "epochs": self.sec.epochs,
            },
            "model_args": self.model_args(),
            "config": to_dict(self.cfg),
            "transforms": self.transforms_spec(),
            "rng": rng_state(),
            "best_metric": self.best_metric,
            "skipped_steps": self.skipped_steps,
            "history": self.history,
            "world_size": self.dist.world_size,
            **self.extra_state(),
        }

    def save(self, name: str, epoch: int) -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.run_dir / f"{name}.pt"
        save_checkpoint(self.checkpoint_state(epoch), path)
        if name == "last":
            self._last_saved = epoch
        return path
