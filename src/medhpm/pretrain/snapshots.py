"""Snapshots of the encoder during pre-training (``pretrain.snapshot_steps``): where they lie, the check of
the listed steps before any training, the device-side count that finds the step of each, and the writers
(the encoder in the format of :func:`medhpm.pretrain.export.write_encoder_file`, and with
``pretrain.snapshot_student`` the whole student beside it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch

from medhpm.config import to_dict
from medhpm.pretrain.export import write_encoder_file
from medhpm.pretrain.model import HPMPretrainModel
from medhpm.runtime.distributed import unwrap
from medhpm.runtime.files import atomic_write_with, remove_stale_temps, sha256_file
from medhpm.runtime.loop import Trainer, TrainingError, echo
from medhpm.runtime.weights import sidecar_path


class SnapshotTrainer(Trainer):
    """The encoder snapshots of :class:`medhpm.pretrain.trainer.PretrainTrainer`, which derives from this
    class and sets the two attributes below in its ``__init__``; it calls :meth:`plan_snapshots` at set-up
    and :meth:`write_snapshot` after the optimizer step that :meth:`_snapshot_step` names."""

    _snapshot_todo: list[int]  # pretrain.snapshot_steps still to write (main process only)
    _applied_steps: torch.Tensor | None  # a device count of the optimizer steps applied, while a snapshot is due

    def student(self) -> HPMPretrainModel:
        """The student under its DDP / ``torch.compile`` wrappers."""
        return cast(HPMPretrainModel, unwrap(self.model))

    def snapshot_path(self, step: int) -> Path:
        return self.run_dir / "snapshots" / f"encoder_step{step:07d}.safetensors"

    def plan_snapshots(self) -> None:
        """The ``pretrain.snapshot_steps`` this run will reach, checked before any training: a listed step
        beyond the run (known only now when ``steps_per_epoch`` is 0) or passed before a resume is named,
        and a file in the way that is not this run's snapshot stops the run here rather than at its step."""
        steps, p = list(self.cfg.pretrain.snapshot_steps), self.cfg.pretrain
        if not steps or not self.dist.is_main:  # only the main process writes snapshots
            return
        total = p.epochs * self.steps_per_epoch
        beyond = [s for s in steps if s > total]
        if beyond:
            echo(
                f"[pretrain] warning: pretrain.snapshot_steps {beyond} lie beyond this run's {total} optimizer steps "
                f"({p.epochs} epochs x {self.steps_per_epoch} steps): no snapshot is written for "
                f"{'them' if len(beyond) > 1 else 'it'}"
            )
        passed = [s for s in steps if s <= self.global_step and not self.snapshot_path(s).exists()]
        if passed:
            echo(
                f"[pretrain] note: pretrain.snapshot_steps {passed} were passed before the run resumed at step "
                f"{self.global_step}: no snapshot is written for {'them' if len(passed) > 1 else 'it'}"
            )
        todo = [s for s in steps if self.global_step < s <= total]
        folder = self.run_dir / "snapshots"
        remove_stale_temps(folder, keep_own=False)  # half-written snapshots of a killed run
        new = 0
        for s in todo:
            there = self.snapshot_on_disk(s)
            if there not in (None, "same", "incomplete"):
                raise TrainingError(
                    f"{self.snapshot_path(s)} is in the way of the snapshot of step {s} "
                    f"(pretrain.snapshot_steps): {there}. It is not this run's; move it away, "
                    "or leave that step out of pretrain.snapshot_steps"
                )
            new += there != "same"
        if new:
            import shutil

            model = self.student() if self.cfg.pretrain.snapshot_student else self.student().encoder
            need = new * sum(t.numel() * t.element_size() for t in model.state_dict().values())
            free = shutil.disk_usage(self.run_dir).free
            if free < need:
                raise OSError(
                    f"output folder {self.run_dir} has only {free / 2**20:.1f} MiB free; the {new} encoder "
                    f"snapshots of pretrain.snapshot_steps need {need / 2**20:.0f} MiB"
                )
        if todo:
            echo(f"[pretrain] snapshots of the encoder after optimizer steps {', '.join(map(str, todo))} in {folder}")
        self._snapshot_todo = todo
        self._applied_steps = torch.tensor(self.global_step, device=self.device) if todo else None

    def snapshot_on_disk(self, step: int) -> str | None:
        """What lies at the snapshot path of ``step``: None (nothing), ``"same"`` (this run's snapshot of
        that step: both files, its sidecar records the step and the sha256 of the weights beside it),
        ``"incomplete"`` (one of the two files: a run killed between writing them), else why it is
        another file."""
        path = self.snapshot_path(step)
        side = sidecar_path(path)
        if not path.exists() and not side.exists():
            return None
        if not (path.exists() and side.exists()):
            return "incomplete"
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            return f"its sidecar {side.name} is not readable JSON"
        if not isinstance(meta, dict) or meta.get("step") != step:
            return f"its sidecar {side.name} records step {meta.get('step') if isinstance(meta, dict) else None}"
        if meta.get("sha256") != sha256_file(path):
            return f"its sha256 is not the one its sidecar {side.name} records"
        return "same"

    def _snapshot_step(self, applied: torch.Tensor) -> int | None:
        """The next listed step if the optimizer step just made is it, else None.

        ``global_step`` counts every step of the log interval as taken until the flush takes skipped
        ones back out (``pretrain.nonfinite=skip``), so it can run ahead of the steps applied. Those are
        counted on the device (``applied`` is false for a masked step: weights and teacher unchanged) and
        read back only once ``global_step`` has reached the next listed step: no host sync elsewhere."""
        count = self._applied_steps
        assert count is not None  # set by plan_snapshots while _snapshot_todo (the caller's test) is not empty
        self._applied_steps = count + applied.to(count.dtype)
        if self.global_step < self._snapshot_todo[0]:
            return None
        done = int(self._applied_steps)  # the read-back, only at (or, after a skipped step, just past) a listed step
        if done < self._snapshot_todo[0]:
            return None
        step = self._snapshot_todo.pop(0)
        if not self._snapshot_todo:
            self._applied_steps = None
        return step if done == step else None  # done > step cannot happen: the count rises by one at most

    def student_snapshot_path(self, step: int) -> Path:
        return self.run_dir / "snapshots" / f"student_step{step:07d}.safetensors"

    def write_student_snapshot(self, step: int) -> Path:
        """With ``pretrain.snapshot_student``: the whole student (encoder and decoders, the state dict of
        :class:`HPMPretrainModel`) after optimizer step ``step``, written atomically beside the encoder's
        snapshot. One already there (a resumed run retracing its steps) is kept, as the encoder's is."""
        from safetensors.torch import save_file

        path = self.student_snapshot_path(step)
        if not path.exists():
            state = {
                k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(self.model).state_dict().items()
            }
            atomic_write_with(
                path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "step": str(step)})
            )
        return path

    def write_snapshot(self, step: int) -> Path | None:
        """The student's encoder as it is after optimizer step ``step`` (and its EMA update), in the format
        of :func:`export_encoder`, at ``RUN/snapshots/encoder_stepNNNNNNN.safetensors`` (main process)."""
        path = self.snapshot_path(step)
        there = self.snapshot_on_disk(step)
        if self.cfg.pretrain.snapshot_student and there in (None, "incomplete", "same"):
            self.write_student_snapshot(step)
        if there == "same":
            # The run is deterministic: a resumed run retraces the steps after last.pt with the same data,
            # masks and weights (bit for bit in --deterministic CPU mode), so the snapshot of this step that
            # the attempt cut short wrote holds the weights this one would write. Kept, not replaced.
            echo(
                f"[pretrain] snapshot of the encoder at step {step}: {path} (already there, written before the "
                "run resumed; kept)"
            )
            return path
        if there not in (None, "incomplete"):  # appeared during the run: never replaced
            echo(f"[pretrain] warning: no snapshot of the encoder at step {step}: {path} is in the way ({there})")
            return None
        state = self.student().encoder.state_dict()
        enc = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}  # the read-back
        epochs = step / self.steps_per_epoch
        write_encoder_file(
            path,
            enc,
            to_dict(self.cfg),
            self.model_args()["encoder"],
            self.transforms_spec(),
            weights="student",
            epochs=int(epochs) if epochs.is_integer() else round(epochs, 4),
            step=step,
        )
        echo(
            f"[pretrain] snapshot of the encoder at step {step}: {path}"
            + (" (replacing a half-written one)" if there == "incomplete" else "")
        )
        return path
