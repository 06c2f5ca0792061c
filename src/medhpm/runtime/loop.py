"""The training loop shared by pre-training and fine-tuning.

The loop is short and calls named steps (``build_model``, ``train_step``, ``after_optimizer_step``,
``end_of_epoch``, ``checkpoint_state``); a stage overrides steps, never copies the loop.

Reproducibility: every epoch re-seeds torch, NumPy, Python and the MONAI transforms from
``(seed, epoch)`` and the sampler is told the epoch, so an epoch is a function of the weights at its
start. A run killed mid-epoch and resumed from ``last.pt`` (written at every epoch end) therefore repeats
that epoch exactly and, in ``--deterministic`` CPU mode, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medhpm.config import Config, compile_mode
from medhpm.runtime.console import echo
from medhpm.runtime.device import autocast, autocast_dtype, configure_cpu_memory, configure_threads, pick_device
from medhpm.runtime.distributed import all_reduce_mean, barrier, cleanup, init_distributed, unwrap
from medhpm.runtime.errors import NonFiniteLossError, RunInterrupted, TrainingError
from medhpm.runtime.files import check_writable, remove_stale_temps, run_folder_lock, save_config
from medhpm.runtime.logging import MetricLogger
from medhpm.runtime.run_checkpoints import RunCheckpoints
from medhpm.runtime.schedules import cosine_lr, scaled_lr, set_lr, warmup_steps
from medhpm.runtime.seed import seed_everything


class Trainer(RunCheckpoints):
    """Base class: subclasses set ``stage`` and implement the model/data steps (and, for what they add to a
    checkpoint, the hooks of :class:`~medhpm.runtime.run_checkpoints.RunCheckpoints`)."""

    stage = "train"

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(out_dir)
        self.resume = resume
        self.sec = getattr(cfg, self.stage)  # the stage's own config section (pretrain / finetune)
        self.start_epoch = 0
        self.global_step = 0
        self.best_metric = -math.inf
        self.skipped_steps = 0
        self.history: list[dict] = []
        self._last_saved: int | None = None  # the epoch of the last.pt this process wrote
        self._first_step_done = False  # under runtime.compile: this process's first optimizer step, which compiles

    # ------------------------------------------------------------------ steps a stage implements
    def build_data(self):  # -> training DataLoader (medhpm.data.dataset.training_loader)
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, model, lr: float) -> list[dict]:
        raise NotImplementedError

    def train_step(self, batch, epoch_f: float) -> tuple[torch.Tensor, dict]:
        """Forward one micro-batch; returns the loss to back-propagate and scalars to log (Python numbers,
        or 0-dim device tensors, which are read back only at the log interval: no ``float(tensor)`` here)."""
        raise NotImplementedError

    def after_optimizer_step(self, epoch_f: float, applied: torch.Tensor) -> dict:
        """Runs after every optimizer step (the EMA teacher update lives here); ``applied`` is the 0-dim
        bool device tensor that says whether the step was taken (false: a non-finite loss or gradient
        masked it). Must not read device values. Returns scalars (Python numbers or 0-dim tensors) to log."""
        return {}

    def end_of_epoch(self, epoch: int, stats: dict) -> dict:
        """Validation, figures. Returns scalars to log; may set ``self.is_best``."""
        return {}

    def check_batch_size(self) -> None:
        """Each volume gives ``data.num_samples`` crops per step: the stage's batch must be a multiple."""
        d, b = self.cfg.data, self.sec.batch_size
        if b % d.num_samples:
            raise ValueError(
                f"config key '{self.stage}.batch_size' ({b}) must be a multiple of 'data.num_samples' "
                f"({d.num_samples}): each volume gives num_samples crops per step"
            )

    def compiled(self, fn):
        """``fn`` (a stage's step up to the loss) through ``torch.compile`` in ``runtime.compile``'s mode,
        or ``fn`` itself for ``none``. ``reduce-overhead`` captures CUDA graphs on CUDA (on the CPU it is
        the default mode). Shapes are static, so one graph serves the whole run (two for hpm: with and
        without the teacher pass)."""
        if self.compile_mode == "none":
            return fn
        return torch.compile(fn, mode=None if self.compile_mode == "default" else self.compile_mode)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.runtime.device)
        self.device = pick_device(cfg.runtime.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device(f"cuda:{self.dist.local_rank}")
        self.amp_dtype = autocast_dtype(self.device, cfg.runtime.precision)
        self.threads_capped = configure_threads(cfg.runtime.threads)
        self.cpu_memory = configure_cpu_memory(cfg.runtime.cpu_memory, self.device)
        if self.dist.is_main:
            check_writable(self.run_dir)  # full disk / read-only folder: fail now, not after an epoch
            if not self.resume and (self.run_dir / "last.pt").exists():
                raise TrainingError(
                    f"{self.run_dir} already holds a run (last.pt). Use --resume {self.run_dir} to continue "
                    "it, or choose another --out folder."
                )
            # half-written checkpoints of a killed run (.last.pt.PID.XXXXXXXX.tmp): as large as a checkpoint
            for folder in (self.run_dir, self.run_dir / "figures"):
                remove_stale_temps(folder, keep_own=False)
        seed_everything(cfg.seed, cfg.runtime.deterministic)
        self.loader = self.build_data()
        model = self.build_model().to(self.device)
        self.model = model
        self.effective_batch = self.sec.batch_size * self.sec.accum_steps * self.dist.world_size
        self.base_lr = scaled_lr(self.sec.lr, self.effective_batch, self.sec.lr_ref_batch)
        # the fused kernel: about a quarter off a CPU pre-training step (docs/PERFORMANCE.md)
        self.fused = _fused_adamw_ok(self.device)
        self.optimizer = torch.optim.AdamW(
            self.param_groups(model, self.base_lr), lr=self.base_lr, betas=tuple(self.sec.betas), fused=self.fused
        )
        if self.dist.is_main:  # room for what the run will write, known now that the model is built
            self._check_disk()
        if self.resume:
            self._restore()
            for group in self.optimizer.param_groups:  # a checkpoint carries the writer's choice
                group["fused"] = self.fused
        if self.dist.is_main:  # records of epochs about to be (re)done: a killed attempt's, a torn last line
            self._trim_metrics()
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.ddp = model
        self.compile_mode = compile_mode(cfg.runtime.compile)
        self.steps_per_epoch = self.sec.steps_per_epoch or max(len(self.loader) // self.sec.accum_steps, 1)
        self.logger = MetricLogger(self.run_dir, enabled=self.dist.is_main)
        if self.dist.is_main:
            save_config(cfg, self.run_dir / f"config_{self.stage}.yaml")
        n_params = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
        n = torch.get_num_threads()
        capped = f": {self.threads_capped}" if self.threads_capped else ""
        threads = f" ({n} thread{'s' if n != 1 else ''}{capped})" if self.device.type == "cpu" else ""
        echo(
            f"[{self.stage}] device {self.device}{threads}, precision {self.amp_dtype or torch.float32}, world size "
            f"{self.dist.world_size}; {n_params / 1e6:.2f} M trainable parameters\n"
            f"[{self.stage}] effective batch {self.effective_batch} = {self.sec.batch_size} per step x "
            f"{self.sec.accum_steps} accumulation x {self.dist.world_size} processes; lr {self.sec.lr:g} x "
            f"{self.effective_batch}/{self.sec.lr_ref_batch} = {self.base_lr:.3g}; {self.steps_per_epoch} "
            f"optimizer steps per epoch, {self.sec.epochs} epochs; warm-up {self.sec.warmup_epochs:g} epochs = "
            f"{warmup_steps(self.sec.warmup_epochs, self.steps_per_epoch)} optimizer steps"
            + (f"; step compiled ({self.compile_mode})" if self.compile_mode != "none" else "")
            + (
                "; freed memory kept for the next step (runtime.cpu_memory)"
                if self.cpu_memory["applied"] and self.device.type == "cpu"
                else ""
            ),
            self.dist,
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        # one run per folder, for the whole run; under torchrun rank 0 holds the lock (set-up starts the group)
        try:
            with run_folder_lock(self.run_dir, enabled=os.environ.get("RANK", "0") == "0", what=f"{self.stage} run"):
                return self._run()
        except KeyboardInterrupt as e:  # Ctrl-C: say where the run stands and how to go on
            if isinstance(e, RunInterrupted):
                raise
            raise RunInterrupted(self.interrupted_message()) from None

    def interrupted_message(self) -> str:
        """What a user needs after Ctrl-C: where the last checkpoint is (or that none was written yet) and
        the command that resumes the run."""
        import shlex

        last = self.run_dir / "last.pt"
        run = shlex.quote(str(self.run_dir))
        if not last.exists():
            return (
                f"interrupted: the {self.stage} run in {self.run_dir} stopped before its first checkpoint, so "
                f"there is nothing to resume; start it again (the same command, same --out {run})"
            )
        done = self._last_saved if self._last_saved is not None else self.start_epoch - 1
        at = f" (after epoch {done + 1} of {self.sec.epochs})" if done >= 0 else ""
        return (
            f"interrupted: the {self.stage} run in {self.run_dir} stopped; its last checkpoint is {last}{at}. "
            f"Resume it with: medhpm {self.stage} --resume {run}"
        )

    def _run(self) -> Path:
        self.setup()
        try:
            if self.start_epoch >= self.sec.epochs:
                echo(f"[{self.stage}] nothing to do: all {self.sec.epochs} epochs are done", self.dist)
            for epoch in range(self.start_epoch, self.sec.epochs):
                self._seed_epoch(epoch)
                t0 = time.time()
                stats = self.train_one_epoch(epoch)
                stats["epoch_time"] = time.time() - t0
                self.is_best = False
                stats.update(self.end_of_epoch(epoch, stats))
                stats["epoch"] = epoch
                self.history.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
                self.logger.log({"kind": "epoch", **stats}, step=epoch, prefix=f"{self.stage}/epoch/")
                last = epoch == self.sec.epochs - 1
                if self.is_best:  # before last.pt: a kill between the two must not leave best.pt stale
                    self.save("best", epoch)
                if last or (epoch + 1) % max(self.sec.checkpoint_every, 1) == 0:
                    self.save("last", epoch)
            # also when a kill came between the last epoch's last.pt and final.pt: the resumed run has no
            # epoch left to train but must still write final.pt (the state restored from last.pt)
            if self.sec.epochs > 0 and (self.start_epoch < self.sec.epochs or not (self.run_dir / "final.pt").exists()):
                self.save("final", self.sec.epochs - 1)
            self.on_finish()
        finally:
            if hasattr(self, "logger"):
                self.logger.close()
            cleanup(self.dist)
        return self.run_dir

    def on_finish(self) -> None:
        pass

    def _seed_epoch(self, epoch: int) -> None:
        s = (self.cfg.seed * 100003 + epoch * 7919 + 17) % 2**31
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s + self.dist.rank)
        ds = getattr(self.loader, "dataset", None)
        tr = getattr(ds, "transform", None)
        if tr is not None and hasattr(tr, "set_random_state"):
            tr.set_random_state(seed=(s + 1000 * self.dist.rank) % 2**31)
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        gen = getattr(self.loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(s)

    def _batches(self):
        """Yield micro-batches for one epoch: ``steps_per_epoch * accum_steps`` of them."""
        need = self.steps_per_epoch * self.sec.accum_steps
        n = 0
        while n < need:
            t_data = time.time()
            for batch in self.loader:
                yield batch, time.time() - t_data
                n += 1
                if n >= need:
                    return
                t_data = time.time()

    def train_one_epoch(self, epoch: int) -> dict:
        """One epoch of optimizer steps, with no host sync inside a log interval.

        Every value a step logs (losses, gradient norm, whether they are finite) stays a device tensor
        until the log interval (``runtime.log_every`` optimizer steps) or the epoch's end, where
        :meth:`_flush` reads them all back at once. The non-finite check is made on the device: a step
        whose loss or gradient norm is not finite is masked in the fused AdamW kernel (its ``found_inf``
        input: weights, moments and step count stay as they were) and in the EMA update; with
        ``nonfinite=stop`` every later step of the interval is masked too, so the weights the flush saves
        are those before the failing step. See docs/PERFORMANCE.md, "Host syncs".
        """
        model, opt, sec = self.ddp, self.optimizer, self.sec
        model.train()
        accum = sec.accum_steps
        log_every = max(self.cfg.runtime.log_every, 1)
        self._pending: list[dict] = []
        self._epoch_sums: dict[str, float] = {}
        self._epoch_count = 0
        self._halted = torch.zeros((), dtype=torch.bool, device=self.device)  # nonfinite=stop: mask the rest
        micro: dict[str, torch.Tensor] = {}  # loss sums over the micro-batches of the optimizer step
        n_micro = 0
        data_time = compute_time = 0.0
        first_step_time = None
        bar = self._progress(epoch)
        opt.zero_grad(set_to_none=True)
        for i, (batch, dt) in enumerate(self._batches()):
            data_time += dt
            t0 = time.time()
            epoch_f = epoch + (i // accum) / self.steps_per_epoch
            lr = cosine_lr(epoch_f, self.base_lr, sec.min_lr, sec.warmup_epochs, sec.epochs)
            set_lr(opt, lr)
            sync = (i + 1) % accum == 0
            ctx = model.no_sync() if (self.dist.enabled and not sync and hasattr(model, "no_sync")) else _null()  # type: ignore[operator]  # DDP's
            with ctx:
                with autocast(self.device, self.amp_dtype):
                    loss, logs = self.train_step(batch, epoch_f)
                loss = loss.float()
                # the global batch's loss: every rank logs it and takes the same skip/stop decision
                loss_mean = self._reduce_losses(loss.detach(), logs)
                (loss / accum).backward()  # a non-finite loss gives non-finite gradients: masked below
            n_micro += 1
            for k, v in [("loss", loss_mean), *logs.items()]:
                if k.startswith("loss") and torch.is_tensor(v):
                    micro[k] = micro.get(k, 0.0) + v.float()  # a new tensor: safe from CUDA-graph reuse
            if not sync:
                compute_time += time.time() - t0
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), sec.clip_grad or float("inf"))
            dev = {k: v / n_micro for k, v in micro.items()}  # the step's losses: means over its micro-batches
            micro, n_micro = {}, 0
            ok_loss = torch.isfinite(dev["loss"])
            ok_grad = torch.isfinite(grad_norm)  # a finite loss with inf/NaN gradients would poison the weights
            ok = ok_loss & ok_grad & ~self._halted
            if sec.nonfinite == "stop":
                self._halted = self._halted | ~ok
            self._optimizer_step(ok)
            opt.zero_grad(set_to_none=True)
            self.global_step += 1  # counted as taken; _flush takes skipped steps back out
            host = {k: v for k, v in logs.items() if not torch.is_tensor(v)}
            dev.update({k: v for k, v in logs.items() if torch.is_tensor(v) and not k.startswith("loss")})
            host.update(self.after_optimizer_step(epoch_f, ok))
            dev.update(grad_norm=grad_norm.float(), _ok_loss=ok_loss, _ok_grad=ok_grad)
            step_time = time.time() - t0
            self._pending.append(
                {"epoch": epoch, "lr": lr, "host": host, "dev": dev, "data_time": dt, "compute_time": step_time}
            )
            compute_time += step_time
            if not self._first_step_done and self.compile_mode != "none":  # the step that compiles
                self._first_step_done = True
                first_step_time = step_time
            if self.global_step % log_every == 0:
                self._flush(bar)
            if bar is not None:
                bar.update(1)
        self._flush(bar)
        if bar is not None:
            bar.close()
        stats = {k: v / max(self._epoch_count, 1) for k, v in self._epoch_sums.items()}
        stats.update(
            data_time=data_time, compute_time=compute_time, steps=self._epoch_count, skipped_steps=self.skipped_steps
        )
        if first_step_time is not None:
            stats["first_step_time"] = first_step_time
        return stats

    def compile_note(self, stats: dict) -> str:
        """For the epoch line: under ``runtime.compile``, how long the epoch that compiled the step spent in
        its first step, so that compiling is not read as the epoch's pace; '' for every other epoch."""
        if "first_step_time" not in stats:  # set only under runtime.compile, by the epoch that compiled
            return ""
        return f"first step {stats['first_step_time']:.1f}s, compiling it (runtime.compile={self.compile_mode})"

    def _optimizer_step(self, ok: torch.Tensor) -> None:
        """``optimizer.step()`` where ``ok`` (a 0-dim bool tensor) is true, decided on the device: fused
        AdamW's ``found_inf`` input skips the whole update (the same mechanism ``GradScaler`` uses). An
        unfused AdamW (torch < 2.4 on CPU) has no such input: there the flag is read, one sync a step."""
        if self.fused:
            self.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]  # read by fused AdamW's step
            self.optimizer.step()
        elif bool(ok):
            self.optimizer.step()

    def _flush(self, bar=None) -> None:
        """Read the pending steps' device values back (one transfer), then for each step in order: count
        and log it, or skip it / stop the run on a non-finite loss or gradient (``<stage>.nonfinite``)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat = torch.stack([v.detach().float().reshape(()) for p in pending for v in p["dev"].values()])
        values = iter(flat.cpu().tolist())  # the one host sync of the interval
        log_every = max(self.cfg.runtime.log_every, 1)
        self.global_step -= len(pending)  # the steps taken before the interval; counted again below
        for p in pending:
            vals = {k: next(values) for k in p["dev"]}
            ok_loss, ok_grad = vals.pop("_ok_loss") > 0.5, vals.pop("_ok_grad") > 0.5
            logs = {**p["host"], **vals}
            if not (ok_loss and ok_grad):
                # stop: raises (the later steps of the interval were masked); skip: logged and counted
                self._nonfinite(p["epoch"], logs, what="loss" if not ok_loss else "gradient")
                continue
            self.global_step += 1
            logs.update(self.step_done(logs))
            logs["lr"] = p["lr"]
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + float(v)
            self._epoch_count += 1
            if self.global_step % log_every == 0:
                self.logger.log(
                    {
                        "kind": "step",
                        "epoch": p["epoch"],
                        "step": self.global_step,
                        **logs,
                        "data_time": p["data_time"],
                        "compute_time": p["compute_time"],
                    },
                    step=self.global_step,
                    prefix=f"{self.stage}/",
                )
            if bar is not None:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{p['lr']:.2e}")

    def step_done(self, logs: dict) -> dict:
        """Runs at the flush for every optimizer step that was applied (not skipped), in order, with its
        logged values as Python numbers. Returns scalars to add to its log record."""
        return {}

    def _progress(self, epoch: int):
        if not (self.cfg.runtime.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            desc=f"{self.stage} {epoch + 1}/{self.sec.epochs}",
            leave=False,
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )

    def _reduce_losses(self, loss: torch.Tensor, logs: dict) -> torch.Tensor:
        """Mean over the processes of the loss and of the ``loss*`` tensors in ``logs`` (updated in place),
        on the device; returns the loss. A ``loss*`` key must be logged by every rank or by none."""
        if not self.dist.enabled:
            return loss
        keys = sorted(k for k, v in logs.items() if k.startswith("loss") and torch.is_tensor(v))
        t = torch.stack([loss.float()] + [logs[k].float().reshape(()) for k in keys]).double()
        t = all_reduce_mean(t, self.dist)
        for j, k in enumerate(keys):
            logs[k] = t[j + 1]
        return t[0]

    def _nonfinite(self, epoch: int, logs: dict, what: str = "loss") -> bool:
        """Skip the step (returns True) or write a checkpoint and stop, naming the step."""
        if self.sec.nonfinite == "skip":
            self.skipped_steps += 1
            self.logger.log(
                {
                    "kind": "skip",
                    "epoch": epoch,
                    "step": self.global_step,
                    "skipped_steps": self.skipped_steps,
                    "what": what,
                    **logs,
                }
            )
            return True
        path = self.save("nonfinite", epoch - 1) if self.dist.is_main else None
        barrier(self.dist)  # the other ranks stop only once the checkpoint is written
        raise NonFiniteLossError(
            f"non-finite {what} at epoch {epoch + 1}, optimizer step {self.global_step + 1} "
            f"({', '.join(f'{k}={v}' for k, v in logs.items() if isinstance(v, float))}). The weights "
            f"before this step were saved to {path}. Lower the lr, check the data "
            f"(medhpm data check), or set {self.stage}.nonfinite=skip."
        )


def _fused_adamw_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
