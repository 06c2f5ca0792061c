"""selfMedHPM self-pre-training: one trainer for every method of the paper's Tables 1 and 3.

| method             | masking                       | L_pred | EMA teacher |
|--------------------|-------------------------------|--------|-------------|
| mae                | random                        | off    | none        |
| no_lpred           | random (= mae, Table 3 row 1) | off    | none        |
| no_learn_to_mask   | random                        | on     | none        |
| hpm                | hard patches, alpha_0->alpha_T| on     | EMA         |

One iteration (docs/method.md, "One iteration"; the step itself is ``medhpm.pretrain.step``): the teacher scores
the patches (from the full volume or from complementary masked views, ``pretrain.teacher_view``; skipped
while the curriculum asks for no hard patch) -> mask -> student reconstructs the masked patches and
predicts their losses -> L = L_rec + lambda_pred * L_pred -> AdamW step -> EMA update.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

import matplotlib.image as mpimg
import torch

from medhpm import __version__
from medhpm.config import METHODS, Config, check_resume
from medhpm.data.headers import check_headers
from medhpm.data.datalist import load_datalist
from medhpm.data.dataset import training_loader
from medhpm.data.sources import resolve_dataset
from medhpm.data.transforms import pretrain_transforms, transforms_spec
from medhpm.models import build_encoder
from medhpm.pretrain.model import HPMPretrainModel
from medhpm.pretrain.diagnostics import organ_shares, pairwise_order_accuracy, patches_with_organ, rank_correlation
from medhpm.pretrain.ema import EMATeacher, momentum_at
from medhpm.pretrain.export import export_encoder  # noqa: F401  (re-exported)
from medhpm.pretrain.figure import figure_crop, reconstruction_figure
from medhpm.pretrain.masking import curriculum_alpha, num_hard, num_masked
from medhpm.pretrain.snapshots import SnapshotTrainer
from medhpm.pretrain.step import (
    mined_patch_stats,
    mined_patches,
    pretrain_iteration,
    step_core,
    teacher_scores,
    teacher_views_used,
)
from medhpm.runtime.device import peak_memory
from medhpm.runtime.files import write_run_summary
from medhpm.runtime.loop import echo
from medhpm.runtime.param_groups import param_groups_weight_decay

METHOD_SWITCHES = {
    # method (one of config.METHODS): (loss predictor + L_pred, hard-patch masking from an EMA teacher)
    "mae": (False, False),
    "no_lpred": (False, False),
    "no_learn_to_mask": (True, False),
    "hpm": (True, True),
}
if set(METHOD_SWITCHES) != set(METHODS):  # config owns the method names; each needs its switches here
    raise ImportError(f"METHOD_SWITCHES {sorted(METHOD_SWITCHES)} do not match config.METHODS {sorted(METHODS)}")


def build_pretrain_model(cfg: Config) -> HPMPretrainModel:
    use_pred, _ = METHOD_SWITCHES[cfg.pretrain.method]
    encoder = build_encoder(
        cfg.model.preset,
        img_size=tuple(cfg.data.roi),
        patch_size=cfg.model.patch_size,
        in_chans=cfg.model.in_chans,
        pos_embed=cfg.model.pos_embed,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )
    return HPMPretrainModel(
        encoder,
        decoder_dim=cfg.model.decoder_dim,
        decoder_depth=cfg.model.decoder_depth,
        decoder_heads=cfg.model.decoder_heads,
        predictor=use_pred,
        norm_pix_loss=cfg.pretrain.norm_pix_loss,
        prediction_loss=cfg.pretrain.prediction_loss,
    )


def make_teacher(student: HPMPretrainModel) -> EMATeacher:
    """The EMA teacher. Only its encoder, projection and loss predictor are ever run, so it carries no
    reconstructor: the masks it yields are unchanged, and each EMA update and checkpoint is lighter."""
    return EMATeacher(student, drop=TEACHER_UNUSED)


TEACHER_UNUSED = ("decoder_blocks", "decoder_norm", "decoder_pred")


class PretrainTrainer(SnapshotTrainer):
    stage = "pretrain"

    def __init__(self, cfg: Config, out_dir, resume: bool = False):
        super().__init__(cfg, out_dir, resume)
        p = cfg.pretrain
        self.use_pred, self.use_teacher = METHOD_SWITCHES[p.method]
        self.teacher: EMATeacher | None = None
        # how the teacher is queried (medhpm.pretrain.step): "full" (1 view) or "masked" (views per sample)
        self.teacher_view = p.teacher_view
        self.teacher_views = teacher_views_used(p.teacher_view, p.teacher_views, p.mask_ratio)
        self.teacher_init_share = 1.0  # product of the EMA momenta applied so far (diagnostics module)
        self.ema_momentum: float | None = None
        self.diagnostics: dict = {}
        self._diagnosed_epoch = -1
        self._diagnosis_inputs: dict | None = None
        # the masks' random ranks: a generator re-seeded each micro-step from (seed, step, micro-step)
        self._micro = 0
        self._noise_gen: torch.Generator | None = None
        self._noise_rows: dict[int, torch.Tensor] = {}  # local batch -> this process's rows of the global batch
        self._n_hard_cache: dict[int, torch.Tensor] = {}
        self._fig_x: torch.Tensor | None = None
        # pretrain.snapshot_steps still to write (main process only), and a device count of the optimizer
        # steps applied so far (kept only while a snapshot is due; see _snapshot_step)
        self._snapshot_todo: list[int] = []
        self._applied_steps: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    def build_data(self):
        d = self.cfg.data
        self.check_batch_size()
        src = resolve_dataset(d, self.run_dir)
        dl = load_datalist(src, format=d.format, split=d.split)
        # self-pre-training uses the TRAINING scans only (paper section 1), plus any extra label-free scans
        entries = list(dl["training"])
        n_extra = 0
        for extra in d.extra_unlabelled:
            more = load_datalist(extra, format="folder")["training"]
            entries += [{"image": e["image"], "case": e["case"]} for e in more]
            n_extra += len(more)
        held = [f"{len(dl[k])} {k}" for k in ("validation", "test") if dl.get(k)]
        echo(
            f"[pretrain] {len(dl['training'])} training scans of {src}"
            + (f" and {n_extra} label-free scans (data.extra_unlabelled)" if n_extra else "")
            + (f"; its {' and '.join(held)} cases are not read" if held else ""),
            self.dist,
        )
        check_headers(entries)  # unreadable, 2D/4D, a label off its image's grid: before any training work
        labelled = all("label" in e for e in entries)
        self.entries = entries
        self.labelled = labelled
        transform = pretrain_transforms(d, labelled=labelled)
        return training_loader(
            entries,
            transform,
            d,
            self.sec.batch_size,
            self.cfg.seed,
            self.run_dir,
            self.dist.world_size,
            self.dist.rank,
            device=getattr(self, "device", None),
        )

    def transforms_spec(self) -> dict:
        return transforms_spec(self.cfg.data)

    # ------------------------------------------------------------------ model
    def build_model(self):
        model = build_pretrain_model(self.cfg)
        if self.use_teacher:
            # starts as a copy of the randomly initialised student (docs/method.md, "Parts")
            self.teacher = make_teacher(model)
        self.num_patches = model.encoder.num_patches
        self.num_masked = num_masked(self.num_patches, self.cfg.pretrain.mask_ratio)
        return model

    def setup(self):
        super().setup()
        if self.teacher is not None:
            self.teacher.to(self.device)
        self._core = self.compiled(step_core)  # runtime.compile: teacher pass, mask, student, losses
        if self.teacher is not None:
            views = (
                "the full volume"
                if self.teacher_view == "full"
                else f"{self.teacher_views} complementary masked views a crop"
            )
            echo(
                f"[pretrain] the EMA teacher scores patches from {views} (pretrain.teacher_view={self.teacher_view})",
                self.dist,
            )
        try:
            self.plan_snapshots()
        except Exception:  # the loop closes the logger only once set-up is done
            self.logger.close()
            raise

    def param_groups(self, model, lr):
        return param_groups_weight_decay(model, lr, self.cfg.pretrain.weight_decay)

    def model_args(self) -> dict:
        return {
            "pretrain_model": self.student().config(),
            "encoder": self.student().encoder.config(),
            "method": self.cfg.pretrain.method,
        }

    # ------------------------------------------------------------------ one iteration
    def alpha(self, epoch_f: float) -> float:
        p = self.cfg.pretrain
        if not self.use_teacher:
            return 0.0
        return curriculum_alpha(int(epoch_f), p.epochs, p.alpha_0, p.alpha_T)

    def train_step(self, batch, epoch_f):
        x = batch["image"].to(self.device, non_blocking=True).as_subclass(torch.Tensor)  # (B, 1, H, W, D)
        p = self.cfg.pretrain
        alpha = self.alpha(epoch_f)
        n_hard = num_hard(alpha, self.num_masked) if self.teacher is not None else 0
        noise, view_noise = self.step_noise(x.shape[0])
        loss, logs = pretrain_iteration(
            self.ddp,
            self.teacher,
            x,
            alpha=alpha,
            mask_ratio=p.mask_ratio,
            lambda_pred=p.lambda_pred,
            use_pred=self.use_pred,
            noise=noise,
            core=self._core,
            n_hard_tensor=self._n_hard_tensor(n_hard),
            view=self.teacher_view,
            views=self.teacher_views,
            view_noise=view_noise,
        )
        # only for the step that will be logged (it becomes step global_step + 1)
        if n_hard > 0 and (self.global_step + 1) % max(self.cfg.runtime.log_every, 1) == 0:
            logs.update(
                mined_patch_stats(
                    x, logs["_scores"], logs["_mask"], n_hard, self.cfg.model.patch_size, self.cfg.data, self.num_masked
                )
            )
        if int(epoch_f) != self._diagnosed_epoch:  # the first micro-batch of each epoch
            self._diagnosed_epoch = int(epoch_f)
            self._diagnosis_inputs = self.diagnosis_inputs(x, batch.get("label"), logs, view_noise)
        for key in ("_scores", "_mask", "_out"):
            logs.pop(key, None)
        return loss, logs

    def _n_hard_tensor(self, n_hard: int) -> torch.Tensor | None:
        """The hard-patch count as a 0-dim device tensor, made once per value (no copy each step)."""
        if not n_hard:
            return None
        if n_hard not in self._n_hard_cache:
            self._n_hard_cache[n_hard] = torch.tensor(n_hard, device=self.device)
        return self._n_hard_cache[n_hard]

    @torch.no_grad()
    def diagnosis_inputs(self, x: torch.Tensor, label, logs: dict, view_noise: torch.Tensor | None) -> dict:
        """Copies of what :meth:`mining_diagnostics` needs from this step (device tensors, nothing read
        back): the measures are computed at the epoch's end, outside the hot loop."""
        out = logs["_out"]
        keep = {
            "per_patch": out["per_patch_loss"].detach().clone(),
            "ids_masked": out["ids_masked"].clone(),
            "lp": None if out["lp"] is None else out["lp"].detach().clone(),
            "n_hard": logs.get("n_hard", 0),
        }
        if self.teacher is not None:
            scores = logs.get("_scores")
            if scores is None:  # no patch was mined this step: the teacher pass is made for the diagnostics
                scores = teacher_scores(self.teacher, x, self.teacher_view, self.teacher_views, view_noise)
            keep["scores"] = scores.clone()
            if label is not None and keep["n_hard"] > 0:
                keep["has_organ"] = patches_with_organ(
                    label.to(x.device).as_subclass(torch.Tensor), self.cfg.model.patch_size
                )
                keep["mask"] = logs["_mask"].clone()
        return keep

    @torch.no_grad()
    def mining_diagnostics(self, keep: dict) -> dict:
        """How well the teacher's scores and the student's predicted losses order the student's measured
        losses of the masked patches of the epoch's first step (pair accuracy and Spearman rank
        correlation), and (with labels) how often mined patches hold organ voxels compared with randomly
        masked ones. See :mod:`medhpm.pretrain.diagnostics`."""
        per_patch, ids_masked = keep["per_patch"], keep["ids_masked"]
        diag = {}
        if keep["lp"] is not None:
            diag["student_rank_acc"] = pairwise_order_accuracy(keep["lp"], per_patch)
            diag["student_spearman"] = rank_correlation(keep["lp"], per_patch)
        if "scores" not in keep:
            return diag
        scores = keep["scores"]
        teacher_masked = torch.gather(scores, 1, ids_masked)
        diag["teacher_rank_acc"] = pairwise_order_accuracy(teacher_masked, per_patch)
        diag["teacher_spearman"] = rank_correlation(teacher_masked, per_patch)
        if "has_organ" in keep:
            diag.update(organ_shares(keep["has_organ"], mined_patches(scores, keep["n_hard"]), keep["mask"]))
        return diag

    def step_noise(self, local_batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Uniform ranks ``(B, N)`` for this micro-batch's mask and, when the teacher is queried from masked
        views, for its view partition (else None). Drawn for the GLOBAL batch from (seed, micro-step) and
        sliced to this process's samples: the masks and partitions, and so the run, do not depend on the
        number of processes (a 2-process run equals a 1-process run with the same global batch), and a
        resumed run draws the same ones.

        Drawn on the training device by a generator of that device, re-seeded each micro-step (host-side,
        no sync): nothing crosses from the host. The mask's ranks come first, so they are the same whatever
        the teacher view. On the CPU it is the same stream as a CPU generator's; on CUDA the stream is
        CUDA's Philox, so a CUDA run's masks differ from a CPU run's (each is reproducible, and independent
        of the number of processes)."""
        self._micro += 1
        w, r, ns = self.dist.world_size, self.dist.rank, self.cfg.data.num_samples
        if self._noise_gen is None:
            self._noise_gen = torch.Generator(device=self.device)
        g = self._noise_gen
        g.manual_seed((self.cfg.seed * 1_000_003 + self.global_step * 9_973 + self._micro) % 2**63)
        shape = (local_batch * w, self.num_patches)  # (B_global, N)
        noise = torch.rand(shape, generator=g, device=self.device)
        view_noise = None
        if self.teacher is not None and self.teacher_view == "masked":
            view_noise = torch.rand(shape, generator=g, device=self.device)
        if w == 1:
            return noise, view_noise
        # DistributedSampler gives rank r the volumes r, r+w, r+2w, ... of the global batch order
        idx = self._noise_rows.get(local_batch)
        if idx is None:
            vols = local_batch // ns
            idx = ((w * torch.arange(vols)[:, None] + r) * ns + torch.arange(ns)[None, :]).flatten().to(self.device)
            self._noise_rows[local_batch] = idx
        return noise[idx], None if view_noise is None else view_noise[idx]

    def after_optimizer_step(self, epoch_f, applied):
        self._micro = 0
        logs = {}
        if self.teacher is not None:
            p = self.cfg.pretrain
            m = momentum_at(
                self.global_step,
                self.sec.epochs * self.steps_per_epoch,
                p.ema_horizon_start,
                p.ema_horizon_end,
                p.ema_ramp,
            )
            self.teacher.update(self.model, m, applied=applied)  # after the optimizer step, buffers included
            logs["ema_momentum"] = m
        if self._snapshot_todo:
            step = self._snapshot_step(applied)
            if step is not None:
                self.write_snapshot(step)
        return logs

    def step_done(self, logs):
        if "ema_momentum" not in logs:
            return {}
        self.teacher_init_share *= logs["ema_momentum"]  # only the EMA updates that were applied
        self.ema_momentum = logs["ema_momentum"]
        return {"teacher_init_share": self.teacher_init_share}

    # ------------------------------------------------------------------ epochs, figures, checkpoints
    def end_of_epoch(self, epoch, stats):
        every = self.cfg.pretrain.figure_every
        last = epoch == self.cfg.pretrain.epochs - 1
        if self.dist.is_main and (epoch == 0 or last or (every and (epoch + 1) % every == 0)):
            try:
                self.write_figure(epoch)
            except Exception as e:  # a figure must never cost the run
                echo(f"[pretrain] figure skipped: {e}")
        keep, self._diagnosis_inputs = self._diagnosis_inputs, None
        if keep is not None:
            self.diagnostics = self.mining_diagnostics(keep)
        diag = dict(self.diagnostics)
        if self.teacher is not None:
            diag.update(teacher_init_share=self.teacher_init_share, ema_momentum=self.ema_momentum)
        note = self.compile_note(stats)
        echo(
            f"[pretrain] epoch {epoch + 1}/{self.cfg.pretrain.epochs}: loss_rec {stats.get('loss_rec', float('nan')):.4f}"
            + (f", loss_pred {stats['loss_pred']:.4f}" if "loss_pred" in stats else "")
            + f", alpha {self.alpha(epoch):.3f}, {stats['epoch_time']:.1f}s "
            f"(data {stats['data_time']:.1f}s, compute {stats['compute_time']:.1f}s"
            + (f"; {note})" if note else ")")
            + _diagnostics_text(diag),
            self.dist,
        )
        return {"alpha": self.alpha(epoch), **{k: v for k, v in diag.items() if v is not None}}

    def figure_input(self) -> torch.Tensor:
        """A fixed crop of the first training scan (deterministic chain, centre crop), cached."""
        if self._fig_x is None:
            self._fig_x = figure_crop(self.cfg.data, self.entries[0]["image"])
        return self._fig_x.to(self.device)

    def write_figure(self, epoch: int) -> Path:
        path = self.run_dir / "figures" / f"reconstruction_epoch{epoch + 1:04d}.png"
        teacher = self.teacher.model if self.teacher is not None else None
        reconstruction_figure(
            self.student(),
            cast(HPMPretrainModel | None, teacher),
            self.figure_input(),
            self.cfg.pretrain.mask_ratio,
            self.alpha(epoch),
            path,
            title=f"{self.cfg.pretrain.method} epoch {epoch + 1}",
            seed=1234,
            view=self.teacher_view,
            views=self.teacher_views,
        )
        shutil.copyfile(path, self.run_dir / "figures" / "reconstruction_latest.png")
        self.logger.image("pretrain/reconstruction", mpimg.imread(str(path))[..., :3], epoch)
        return path

    def extra_state(self) -> dict:
        return {
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "teacher_init_share": self.teacher_init_share,
        }

    def load_extra_state(self, state):
        if self.teacher is not None:
            if state.get("teacher") is None:
                raise ValueError("cannot resume an hpm run from a checkpoint without an EMA teacher")
            self.teacher.load_state_dict(state["teacher"])
            self.teacher_init_share = float(state.get("teacher_init_share", float("nan")))

    def on_finish(self):
        if self.dist.is_main:
            write_run_summary(
                self.run_dir,
                {
                    **peak_memory(self.device),
                    "stage": "pretrain",
                    "method": self.cfg.pretrain.method,
                    "epochs": self.cfg.pretrain.epochs,
                    "steps": self.global_step,
                    "history": self.history,
                    "version": __version__,
                },
            )


def _diagnostics_text(diag: dict) -> str:
    """The epoch line's part on mining: '; teacher: init share 0.26, rank acc 0.550, spearman 0.31, student
    rank acc 0.710, student spearman 0.62, organ share mined 0.65 vs random 0.42' (the parts a method has;
    '' for mae)."""
    parts = []
    if "teacher_init_share" in diag:
        parts.append(f"init share {diag['teacher_init_share']:.3g}")
    if "teacher_rank_acc" in diag:
        parts.append(f"rank acc {diag['teacher_rank_acc']:.3f}")
    if "teacher_spearman" in diag:
        parts.append(f"spearman {diag['teacher_spearman']:.2f}")
    if "student_rank_acc" in diag:
        parts.append(f"student rank acc {diag['student_rank_acc']:.3f}")
    if "student_spearman" in diag:
        parts.append(f"student spearman {diag['student_spearman']:.2f}")
    if "organ_share_hard" in diag:
        parts.append(
            f"organ share mined {diag['organ_share_hard']:.2f} vs random {diag.get('organ_share_random', float('nan')):.2f}"
        )
    if not parts:
        return ""
    return ("; teacher: " if "teacher_init_share" in diag else "; ") + ", ".join(parts)


def pretrain(cfg: Config, out_dir, resume: bool = False) -> Path:
    """Self-pre-train as configured; returns the run folder (checkpoints, logs, figures).

    ``resume``: continue the run in ``out_dir`` from ``last.pt``; ``cfg`` may extend its config (more epochs)
    but not change what its checkpoint depends on (``config.check_resume``; ``config.resume_config`` gives
    the run's own config with overrides).
    """
    if resume:
        check_resume(cfg, out_dir, "pretrain")
    return PretrainTrainer(cfg, out_dir, resume=resume).run()
