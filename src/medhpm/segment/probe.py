"""The frozen-encoder probe of one run: what the encoder fine-tuning starts from knows before fine-tuning.

The encoder is exactly the one UNETR fine-tuning starts from (:func:`probe_encoder`): the config's seed,
the segmentation model built as the fine-tuning trainer builds it (so ``scratch`` probes the seeded random
initialisation of the same ViT), then the pre-trained weights loaded as fine-tuning loads them. The scans
go through the validation/inference preprocessing (``data.transforms.val_transforms``), are tiled by ROI
windows, and every token is labelled with its patch's majority class (``evaluate.probe.volume_tokens``).
A class-balanced linear probe is fitted on the tokens of the cases fine-tuning learns from
(``data.datalist.finetune_cases``: the labelled training cases, never a validation or test case) and
scored by balanced accuracy on the labelled test cases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from medhpm.config import Config
from medhpm.data.datalist import finetune_cases, load_datalist
from medhpm.data.transforms import val_transforms
from medhpm.evaluate.probe import balanced_accuracy, fit_linear_probe, volume_tokens
from medhpm.runtime.device import configure_cpu_memory, configure_threads, pick_device
from medhpm.runtime.files import atomic_write_text
from medhpm.runtime.seed import seed_everything
from medhpm.runtime.weights import load_encoder_weights
from medhpm.segment.trainer import build_segmentation_model

__all__ = ["probe_encoder", "run_probe"]


def probe_encoder(cfg: Config, init: str | Path | None = None):
    """The ViT encoder UNETR fine-tuning with ``cfg`` starts from, in eval mode.

    Seeded and built like :class:`~medhpm.segment.trainer.FinetuneTrainer` (``seed_everything(cfg.seed)``,
    then :func:`build_segmentation_model`), so without ``init`` it is fine-tuning-from-scratch's random
    initialisation; with ``init`` (an exported encoder, a pre-training checkpoint, ...) its weights are
    loaded as fine-tuning loads them (``finetune.use_teacher``, ``finetune.allow_partial_init``).
    """
    if cfg.finetune.architecture != "unetr":
        raise ValueError(f"the probe needs a ViT encoder; finetune.architecture={cfg.finetune.architecture} has none")
    seed_everything(cfg.seed, cfg.runtime.deterministic)
    model = build_segmentation_model(cfg)
    if init not in (None, "", "none"):
        load_encoder_weights(model, str(init), use_teacher=cfg.finetune.use_teacher,
                             allow_partial=cfg.finetune.allow_partial_init)
    return model.encoder.eval()


def _tokens(encoder, entries: list[dict], cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tr = val_transforms(cfg.data, cfg.finetune.num_classes)
    feats, classes = [], []
    for e in entries:
        item = tr(dict(e))
        image = torch.as_tensor(item["image"]).as_subclass(torch.Tensor).to(device)
        label = torch.as_tensor(item["label"]).as_subclass(torch.Tensor).to(device)
        f, c = volume_tokens(encoder, image, label, cfg.data.roi, cfg.model.patch_size)
        feats.append(f.float().cpu())
        classes.append(c.cpu())
    return torch.cat(feats), torch.cat(classes)


def _recall(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    return {str(int(c)): float((pred[true == c] == c).float().mean()) for c in torch.unique(true)}


def run_probe(cfg: Config, dataset: str | Path, out_json: str | Path, init: str | Path | None = None,
              labelled_cases: int | None = None, steps: int = 200) -> dict:
    """Fit and score the probe of the encoder ``init`` (None: scratch) on ``dataset``; writes ``out_json``.

    ``labelled_cases``: how many training cases the probe learns from (default ``finetune.labelled_cases``;
    0: all training cases left after the validation split), drawn as fine-tuning draws them with
    ``cfg.seed``. A finished ``out_json`` is read back, not recomputed. Returns its content:
    ``balanced_accuracy`` on the test tokens (mean over the classes present there, background included,
    of the share predicted right; ``chance`` is 1 / their number), ``train_balanced_accuracy``,
    ``test_recall`` per class, the cases and token counts.
    """
    out_json = Path(out_json)
    if out_json.exists():
        return json.loads(out_json.read_text())
    t0 = time.time()
    k = cfg.finetune.labelled_cases if labelled_cases is None else int(labelled_cases)
    dl = load_datalist(Path(dataset), format=cfg.data.format, split=cfg.data.split)
    train, _, n = finetune_cases(dl, cfg.data.val_cases, k, seed=cfg.seed)
    test = [e for e in dl.get("test", []) if "label" in e]
    if not test or any("label" not in e for e in train):
        raise ValueError(f"the probe needs labelled training and test cases; {dataset} has "
                         f"{sum('label' in e for e in train)} of {len(train)} training and {len(test)} test cases labelled")
    configure_threads(cfg.runtime.threads)
    device = pick_device(cfg.runtime.device)
    configure_cpu_memory(cfg.runtime.cpu_memory, device)
    encoder = probe_encoder(cfg, init).to(device)
    x_tr, y_tr = _tokens(encoder, train, cfg, device)
    x_te, y_te = _tokens(encoder, test, cfg, device)
    probe = fit_linear_probe(x_tr, y_tr, cfg.finetune.num_classes, steps=steps, seed=cfg.seed)
    pred = probe.predict(x_te)
    result = {
        "balanced_accuracy": balanced_accuracy(pred, y_te),
        "train_balanced_accuracy": balanced_accuracy(probe.predict(x_tr), y_tr),
        "chance": 1.0 / len(torch.unique(y_te)),
        "test_recall": _recall(pred, y_te),
        "encoder": str(init) if init not in (None, "", "none") else "none (the seeded random init, as from scratch)",
        "seed": cfg.seed,
        "labelled_cases": k,
        "training_cases": [e.get("case") for e in train],
        "training_cases_available": n,
        "test_cases": [e.get("case") for e in test],
        "train_tokens": int(y_tr.numel()),
        "test_tokens": int(y_te.numel()),
        "token_dim": int(x_tr.shape[1]),
        "steps": steps,
        "seconds": round(time.time() - t0, 2),
        "metric": "balanced accuracy of a class-balanced linear probe on the frozen encoder's tokens, each "
                  "labelled with its patch's majority class (background included)",
    }
    atomic_write_text(out_json, json.dumps(result, indent=2))
    return result
