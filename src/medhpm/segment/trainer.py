"""UNETR fine-tuning from a pre-trained encoder (paper section 2; docs/method.md, "Transfer to UNETR").

Validation uses the datalist's labelled ``validation`` split when it has one, else ``data.val_cases``
cases drawn from the training split; test cases are never seen.

Initialisation (``init``): a pre-training checkpoint (student encoder, or the teacher's with
``finetune.use_teacher``), an exported ``encoder.safetensors``, a MONAI UNETR / SelfMedMAE / 2D ViT
checkpoint (see ``medhpm.models.transfer``), or ``none`` (UNETR from scratch). AdamW with layer-wise lr
decay, DiceCE over all classes, validation by sliding window every ``val_every`` epochs on a subset of the
TRAINING cases (never the test cases); the best checkpoint is kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import cast

import torch

from medhpm import __version__
from medhpm.config import Config, check_resume
from medhpm.data.datalist import finetune_cases, load_datalist
from medhpm.data.headers import check_headers
from medhpm.data.dataset import training_loader
from medhpm.data.sources import resolve_dataset
from medhpm.data.transforms import train_transforms, transforms_spec, val_transforms
from medhpm.evaluate.classes import parse_classes
from medhpm.models import build_encoder
from medhpm.models.dynunet import build_dynunet
from medhpm.models.unetr import build_unetr
from medhpm.runtime.device import autocast, peak_memory
from medhpm.runtime.distributed import unwrap
from medhpm.runtime.files import write_run_summary
from medhpm.runtime.loop import Trainer, echo
from medhpm.runtime.param_groups import param_groups_layer_decay, param_groups_weight_decay
from medhpm.runtime.weights import load_encoder_weights


def segmentation_loss(cfg: Config):
    """The fine-tuning loss: DiceCE over all classes with the recipe's Dice settings (``finetune.batch_dice``,
    ``dice_squared_pred``, ``dice_smooth_nr``, ``dice_smooth_dr``; docs/method.md, the recipe table)."""
    from monai.losses import DiceCELoss

    f = cfg.finetune
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        batch=f.batch_dice,
        squared_pred=f.dice_squared_pred,
        smooth_nr=f.dice_smooth_nr,
        smooth_dr=f.dice_smooth_dr,
    )


def forward_loss(model, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The segmentation network's forward (under the caller's autocast) and its loss in float32: one
    micro-batch of fine-tuning (the trainer's step; the benchmarks time this same function)."""
    logits = model(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return loss_fn(logits.float(), y.float())


def build_segmentation_model(cfg: Config, encoder_args: dict | None = None):
    """UNETR around the configured encoder (preset, patch size, ROI from the config), or DynUNet."""
    if cfg.finetune.architecture == "dynunet":
        return build_dynunet(cfg.model.in_chans, cfg.finetune.num_classes, tuple(cfg.data.roi))
    if encoder_args is None:
        encoder_args = build_encoder(
            cfg.model.preset, img_size=tuple(cfg.data.roi), patch_size=cfg.model.patch_size, in_chans=cfg.model.in_chans
        ).config()
    return build_unetr(
        encoder_args,
        out_channels=cfg.finetune.num_classes,
        feature_size=cfg.model.feature_size,
        drop_path=cfg.finetune.drop_path,
        skip_blocks=tuple(cfg.model.skip_blocks) if cfg.model.skip_blocks else None,
        norm_name=cfg.model.norm_name,
        img_size=tuple(cfg.data.roi),
    )


class FinetuneTrainer(Trainer):
    stage = "finetune"
    checkpoint_names = ("last", "best", "final")  # best.pt: the best validation Dice

    def __init__(self, cfg: Config, out_dir, init: str | None = None, resume: bool = False):
        super().__init__(cfg, out_dir, resume)
        self.init = None if (init in (None, "", "none")) else str(init)
        self.load_report = None

    # ------------------------------------------------------------------ data
    def build_data(self):
        d = self.cfg.data
        self.check_batch_size()
        src = resolve_dataset(d, self.run_dir)
        dl = load_datalist(src, format=d.format, split=d.split)
        missing = [e.get("image") for e in dl["training"] if "label" not in e]
        if missing:
            raise ValueError(
                f"fine-tuning needs labels; {len(missing)} training scans of {src} have none (e.g. {missing[0]})"
            )
        # validation: the datalist's own labelled "validation" split, else data.val_cases drawn from the
        # training cases; label efficiency: learn from finetune.labelled_cases of the rest (pre-training
        # still used them all)
        k = self.cfg.finetune.labelled_cases
        train, val, n = finetune_cases(dl, d.val_cases, k, seed=self.cfg.seed)
        echo(f"[finetune] {_split_sentence(dl, val, n, d.val_cases)}", self.dist)
        mismatch = _classes_mismatch(dl.get("labels") or {}, self.cfg.finetune.num_classes, self.cfg.finetune.reported)
        if mismatch:
            echo(f"[finetune] warning: {mismatch}", self.dist)
        if k:
            echo(
                f"[finetune] learning from the labels of {len(train)} of {n} training cases "
                f"(finetune.labelled_cases={k}): {', '.join(e.get('case') or str(e['image']) for e in train)}",
                self.dist,
            )
        self.datalist, self.train_entries, self.val_entries = dl, train, val
        self.dataset_path = str(src)
        # unreadable, 2D/4D, a label off its image's grid: every case of the run, before any training work
        check_headers(train + val, what="training and validation")
        transform = train_transforms(d, self.cfg.finetune.num_classes)
        return training_loader(
            train,
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
        model = build_segmentation_model(self.cfg)
        if self.cfg.finetune.architecture != "unetr" and self.init:
            raise ValueError(
                f"finetune.architecture={self.cfg.finetune.architecture} has no ViT encoder to "
                f"initialise; use --init none"
            )
        if self.init and not self.resume:
            self.load_report = load_encoder_weights(
                model,
                self.init,
                use_teacher=self.cfg.finetune.use_teacher,
                allow_partial=self.cfg.finetune.allow_partial_init,
            )
            echo(f"[finetune] initialised from {self.init}: {self.load_report.message()}", self.dist)
        elif not self.init and not self.resume:
            echo("[finetune] no pre-trained weights (--init none): UNETR from scratch", self.dist)
        self.loss_fn = segmentation_loss(self.cfg)
        return model

    def param_groups(self, model, lr):
        if self.cfg.finetune.architecture != "unetr":
            return param_groups_weight_decay(model, lr, self.cfg.finetune.weight_decay)
        return param_groups_layer_decay(model, lr, self.cfg.finetune.weight_decay, self.cfg.finetune.layer_decay)

    def load_extra_state(self, state):
        # a resumed run keeps the provenance of its initial weights (--init is not part of the config)
        init = (state.get("model_args") or {}).get("init")
        self.init = None if init in (None, "", "none") else str(init)

    def model_args(self) -> dict:
        m = unwrap(self.model)
        c = self.cfg
        skips = getattr(m, "skip_blocks", None)  # a DynUNet has none (model.skip_blocks may be unset too)
        return {
            "architecture": c.finetune.architecture,
            # a UNETR's ViTEncoder (nn.Module types its attributes as Tensor | Module)
            "encoder": m.encoder.config() if hasattr(m, "encoder") else None,  # type: ignore[union-attr, operator]
            "unetr": {
                "out_channels": c.finetune.num_classes,
                "feature_size": c.model.feature_size,
                "skip_blocks": list(skips) if skips is not None else None,
                "norm_name": c.model.norm_name,
            },
            "num_classes": c.finetune.num_classes,
            "classes": {str(k): v for k, v in self.class_names().items()},
            "reported": {str(k): v for k, v in parse_classes(c.finetune.reported).items()},
            "init": self.init or "none",
        }

    def class_names(self) -> dict[int, str]:
        labels = getattr(self, "datalist", {}).get("labels") or {}
        names = {int(k): str(v) for k, v in labels.items() if int(k) > 0}
        return {k: names.get(k, f"class_{k}") for k in range(1, self.cfg.finetune.num_classes)}

    # ------------------------------------------------------------------ one iteration
    def train_step(self, batch, epoch_f):
        x = batch["image"].to(self.device, non_blocking=True).as_subclass(torch.Tensor)
        y = batch["label"].to(self.device, non_blocking=True).as_subclass(torch.Tensor)
        # label values were checked against finetune.num_classes when the case was loaded (LoadCTd)
        if not hasattr(self, "_core"):  # runtime.compile: the forward and the loss
            self._core = self.compiled(self.forward_loss)
        loss = self._core(x, y)
        return loss, {"loss_dice_ce": loss.detach()}  # a device tensor: read back at the log interval

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """UNETR forward and DiceCE loss (in float32) of one micro-batch (:func:`forward_loss`)."""
        return forward_loss(self.ddp, self.loss_fn, x, y)

    # ------------------------------------------------------------------ validation
    def end_of_epoch(self, epoch, stats):
        out = {}
        f = self.cfg.finetune
        last = epoch == f.epochs - 1
        if self.val_entries and ((epoch + 1) % max(f.val_every, 1) == 0 or last):
            dice = self.validate()
            out.update(dice)
            metric = dice["val_dice"]
            if metric > self.best_metric:
                self.best_metric = metric
                self.is_best = True
            out["best_val_dice"] = self.best_metric
        msg = f"[finetune] epoch {epoch + 1}/{f.epochs}: loss {stats.get('loss', float('nan')):.4f}"
        if "val_dice" in out:
            msg += f", val Dice {out['val_dice']:.3f} (best {self.best_metric:.3f})"
        note = self.compile_note(stats)
        echo(msg + f", {stats['epoch_time']:.1f}s" + (f" ({note})" if note else ""), self.dist)
        return out

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean Dice over the reported organs on the validation subset (preprocessed space)."""
        from monai.inferers import sliding_window_inference
        from monai.metrics import DiceMetric
        from monai.networks.utils import one_hot

        model = unwrap(self.model)
        model.eval()
        if not hasattr(self, "_val_items"):
            tr = val_transforms(self.cfg.data, self.cfg.finetune.num_classes)
            self._val_items = [tr(dict(e)) for e in self.val_entries]
        reported = [k for k in parse_classes(self.cfg.finetune.reported) if k < self.cfg.finetune.num_classes]
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        per_case = []
        for item in self._val_items:
            x = torch.as_tensor(item["image"]).as_subclass(torch.Tensor)[None].to(self.device)
            y = torch.as_tensor(item["label"]).as_subclass(torch.Tensor)[None].long()
            with autocast(self.device, self.amp_dtype):
                logits = sliding_window_inference(
                    x,
                    tuple(self.cfg.data.roi),
                    self.cfg.inference.sw_batch_size,
                    model,
                    overlap=self.cfg.finetune.val_overlap,
                    mode="gaussian",
                )
            # the network returns one tensor (MONAI types the result as a tensor, tuple or dict)
            pred = logits.float().argmax(1, keepdim=True).cpu()  # type: ignore[union-attr]
            nc = self.cfg.finetune.num_classes
            # (1, nc-1), NaN where the organ is absent
            d = cast(torch.Tensor, metric(one_hot(pred, nc), one_hot(y, nc)))
            per_case.append(d[0])
        model.train()
        allc = torch.stack(per_case)  # (cases, nc-1)
        cols = [k - 1 for k in reported]
        sub = allc[:, cols]
        mean = float(torch.nanmean(sub)) if torch.isfinite(sub).any() else 0.0
        out = {"val_dice": mean}
        for k in reported:
            col = allc[:, k - 1]
            if torch.isfinite(col).any():
                out[f"val_dice_{k}"] = float(torch.nanmean(col))
        return out

    def on_finish(self):
        if self.dist.is_main:
            write_run_summary(
                self.run_dir,
                {
                    **peak_memory(self.device),
                    "stage": "finetune",
                    "init": self.init or "none",
                    "epochs": self.cfg.finetune.epochs,
                    "steps": self.global_step,
                    "best_val_dice": self.best_metric,
                    "history": self.history,
                    "validation_cases": [e.get("case") for e in self.val_entries],
                    "training_cases": [e.get("case") for e in self.train_entries],
                    "dataset": self.dataset_path,
                    "version": __version__,
                    "load_report": None
                    if self.load_report is None
                    else json.loads(
                        json.dumps(
                            {
                                "loaded": len(self.load_report.loaded),
                                "missing": list(self.load_report.missing),
                                "unexpected": list(self.load_report.unexpected),
                            }
                        )
                    ),
                },
            )


def finetune(cfg: Config, out_dir, init: str | None = None, resume: bool = False) -> Path:
    """Fine-tune UNETR as configured; returns the run folder.

    ``resume``: continue the run in ``out_dir`` from ``last.pt``; ``cfg`` may extend its config (more epochs)
    but not change what its checkpoint depends on (``config.check_resume``; ``config.resume_config`` gives
    the run's own config with overrides).
    """
    if resume:
        check_resume(cfg, out_dir, "finetune")
    return FinetuneTrainer(cfg, out_dir, init=init, resume=resume).run()


def _split_sentence(datalist: dict, val: list[dict], n: int, val_cases: int) -> str:
    """Which cases fine-tuning validates on and where they came from, as the run's second line says it
    (nnU-Net prints its fold's split too): the held-out names are what a user needs to keep them out of a
    later test."""
    names = ", ".join(e.get("case") or str(e["image"]) for e in val)
    if not val:
        return f"{n} training cases, no validation (data.val_cases=0): no best.pt, final.pt is the model"
    given = any("label" in e for e in datalist.get("validation", []))
    source = (
        "the datalist's validation split"
        if given
        else f"drawn from the training cases by seed (data.val_cases={val_cases})"
    )
    return f"{n} training cases; {len(val)} validation, {source}: {names}"


def _classes_mismatch(labels: dict, num_classes: int, reported: str) -> str | None:
    """What is off when the datalist's own classes are not the config's (the demo and paper configs are
    set for BTCV's 14): a model with outputs no label uses, a BTCV preset reporting other organs under
    BTCV's names; with the settings that fit. None when the datalist names no classes or they agree."""
    if not labels:
        return None
    declared = max(int(v) for v in labels) + 1
    if declared == num_classes:
        return None
    names = {int(v): str(n) for v, n in labels.items() if int(v) > 0}
    fit = ",".join(f"{_spec_name(n, v)}={v}" for v, n in sorted(names.items()))
    text = (
        f"the datalist names {declared} classes (background and {', '.join(names[v] for v in sorted(names))}) "
        f"but finetune.num_classes is {num_classes}"
    )
    if num_classes > declared:
        text += f": the model gets {num_classes - declared} outputs that no label uses"
    if str(reported).strip().lower() in ("btcv8", "btcv13"):
        text += f", and finetune.reported={reported} reports label values under BTCV's organ names"
    return text + f". For these classes: finetune.num_classes={declared} finetune.reported={fit}"


def _spec_name(name: str, value: int) -> str:
    """An organ name as finetune.reported's NAME=VALUE syntax takes it ('left kidney' -> 'left_kidney')."""
    out = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_")
    return out if out[:1].isalpha() else f"label{value}" + (f"_{out}" if out else "")
