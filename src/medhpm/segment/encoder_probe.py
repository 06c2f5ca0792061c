"""The frozen-encoder probe of one run: what the encoder fine-tuning starts from knows before fine-tuning.

The encoder is exactly the one UNETR fine-tuning starts from (:func:`probe_encoder`): the config's seed,
the segmentation model built as the fine-tuning trainer builds it (so ``scratch`` probes the seeded random
initialisation of the same ViT), then the pre-trained weights loaded as fine-tuning loads them. The scans
go through the validation/inference preprocessing (``data.transforms.val_transforms``), are tiled by ROI
windows, and every token is labelled with its patch's majority class (``evaluate.token_probes.volume_tokens``).
The probes are fitted on the tokens of the cases fine-tuning learns from (``data.datalist.finetune_cases``:
the labelled training cases, never a validation or test case) and scored by balanced accuracy on the
labelled test cases (``evaluate.token_probes.probe_tokens``): a class-balanced linear probe at a fixed L2 strength
(the probe of old, which can memorise its tokens), the same probe with its strength chosen by case-wise
cross-validation on the training cases, and a class-balanced k-nearest-neighbour probe with k chosen the
same way. :func:`run_noise_floor` probes several seeded random initialisations of the same encoder on the
same cases: the spread a pre-trained encoder's probe is read against.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from medhpm.config import Config
from medhpm.data.datalist import finetune_cases, load_datalist
from medhpm.data.transforms import val_transforms
from medhpm.evaluate.token_probes import (
    DEFAULT_FOLDS,
    DEFAULT_KS,
    DEFAULT_STRENGTHS,
    noise_floor,
    probe_tokens,
    volume_tokens,
)
from medhpm.runtime.device import configure_cpu_memory, configure_threads, pick_device
from medhpm.runtime.files import atomic_write_text
from medhpm.runtime.seed import seed_everything
from medhpm.runtime.weights import load_encoder_weights
from medhpm.segment.trainer import build_segmentation_model

__all__ = ["probe_encoder", "run_probe", "run_noise_floor"]


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
        load_encoder_weights(
            model, str(init), use_teacher=cfg.finetune.use_teacher, allow_partial=cfg.finetune.allow_partial_init
        )
    return model.encoder.eval()


PROBE_VERSION = 2  # 2: the case-wise cross-validated linear probe and the kNN probe beside the fixed fit

_METRIC = (
    "balanced accuracy of a class-balanced linear probe on the frozen encoder's tokens, each "
    "labelled with its patch's majority class (background included)"
)


def _volumes(entries: list[dict], cfg: Config):
    """Each case through the validation/inference preprocessing, one at a time: ``(image, label)``, each
    ``(1, H, W, D)``."""
    tr = val_transforms(cfg.data, cfg.finetune.num_classes)
    for e in entries:
        item = tr(dict(e))
        yield (
            torch.as_tensor(item["image"]).as_subclass(torch.Tensor),
            torch.as_tensor(item["label"]).as_subclass(torch.Tensor),
        )


def _encode(encoder, volumes, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``(M, D)``, their classes ``(M,)`` and case numbers ``(M,)`` (the volume's index)."""
    feats, classes, groups = [], [], []
    for i, (image, label) in enumerate(volumes):
        f, c = volume_tokens(encoder, image.to(device), label.to(device), cfg.data.roi, cfg.model.patch_size)
        feats.append(f.float().cpu())
        classes.append(c.cpu())
        groups.append(torch.full((c.numel(),), i, dtype=torch.long))
    return torch.cat(feats), torch.cat(classes), torch.cat(groups)


def _cases(cfg: Config, dataset: str | Path, labelled_cases: int | None) -> tuple[list[dict], list[dict], int, int]:
    """The probe's training cases (fine-tuning's labelled ones with ``cfg.seed``), the labelled test cases,
    the number of labelled cases asked for and the number available."""
    k = cfg.finetune.labelled_cases if labelled_cases is None else int(labelled_cases)
    dl = load_datalist(Path(dataset), format=cfg.data.format, split=cfg.data.split)
    train, _, n = finetune_cases(dl, cfg.data.val_cases, k, seed=cfg.seed)
    test = [e for e in dl.get("test", []) if "label" in e]
    if not test or any("label" not in e for e in train):
        raise ValueError(
            f"the probe needs labelled training and test cases; {dataset} has "
            f"{sum('label' in e for e in train)} of {len(train)} training and {len(test)} test cases labelled"
        )
    return train, test, k, n


def _device(cfg: Config) -> torch.device:
    configure_threads(cfg.runtime.threads)
    device = pick_device(cfg.runtime.device)
    configure_cpu_memory(cfg.runtime.cpu_memory, device)
    return device


def _case_name(e: dict) -> str:
    return str(e.get("case") or e.get("image"))


def _named_folds(res: dict, train: list[dict]) -> dict:
    """``probe_tokens``'s result with each CV's held-out case numbers also named (``fold_cases``)."""
    for key in ("linear_cv", "knn"):
        cv = res[key].get("cv")
        if cv:
            cv["fold_cases"] = [[_case_name(train[g]) for g in fold] for fold in cv["fold_groups"]]
    return res


def _probe(encoder, vol_tr, vol_te, train: list, cfg: Config, device, settings: dict) -> tuple[dict, dict]:
    """The probes of ``encoder`` (:func:`probe_tokens` with ``settings``, seeded with ``cfg.seed``) on the
    tokens of the training and test volumes, their folds named by case; and the token counts."""
    x_tr, y_tr, g_tr = _encode(encoder, vol_tr, cfg, device)
    x_te, y_te, _ = _encode(encoder, vol_te, cfg, device)
    res = probe_tokens(x_tr, y_tr, g_tr, x_te, y_te, cfg.finetune.num_classes, seed=cfg.seed, **settings)
    counts = {"train_tokens": int(y_tr.numel()), "test_tokens": int(y_te.numel()), "token_dim": int(x_tr.shape[1])}
    return _named_folds(res, train), counts


def run_probe(
    cfg: Config,
    dataset: str | Path,
    out_json: str | Path,
    init: str | Path | None = None,
    labelled_cases: int | None = None,
    steps: int = 200,
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    ks: Sequence[int] = DEFAULT_KS,
    folds: int = DEFAULT_FOLDS,
    metric: str = "cosine",
) -> dict:
    """Fit and score the probes of the encoder ``init`` (None: scratch) on ``dataset``; writes ``out_json``.

    ``labelled_cases``: how many training cases the probes learn from (default ``finetune.labelled_cases``;
    0: all training cases left after the validation split), drawn as fine-tuning draws them with
    ``cfg.seed``. A finished ``out_json`` is read back, not recomputed (one written before the
    cross-validated probes existed has no ``linear_cv``, ``knn`` nor ``probe_version``). Returns its content:

    * as before, the probe at the fixed L2 strength ``weight_decay`` (1e-3): ``balanced_accuracy`` on the
      test tokens (mean over the classes present there, background included, of the share predicted
      right; ``chance`` is 1 / their number), ``train_balanced_accuracy``, ``test_recall`` per class;
    * ``linear_cv``: the linear probe with its L2 strength chosen from ``strengths`` by case-wise
      ``folds``-fold cross-validation on the training cases (leave-one-case-out with fewer cases; a fixed
      default with one): its test ``balanced_accuracy``, the chosen ``weight_decay``, ``chosen_by``,
      ``train_balanced_accuracy`` of the chosen fit, ``test_recall`` and the ``cv`` curve (mean held-out
      balanced accuracy per strength, per fold, the cases held out in each fold);
    * ``knn``: the class-balanced k-nearest-neighbour probe (``metric``: cosine or euclidean, on the
      standardised tokens), k chosen from ``ks`` the same way, the same fields with ``k``;
    * the cases and token counts, ``seconds``. The folds and fits are seeded with ``cfg.seed``.
    """
    out_json = Path(out_json)
    if out_json.exists():
        return json.loads(out_json.read_text())
    t0 = time.time()
    train, test, k, n = _cases(cfg, dataset, labelled_cases)
    device = _device(cfg)
    encoder = probe_encoder(cfg, init).to(device)
    settings = dict(strengths=strengths, ks=ks, folds=folds, metric=metric, steps=steps)
    res, counts = _probe(encoder, _volumes(train, cfg), _volumes(test, cfg), train, cfg, device, settings)
    fixed = res["linear_fixed"]
    result = {
        "balanced_accuracy": fixed["balanced_accuracy"],
        "train_balanced_accuracy": fixed["train_balanced_accuracy"],
        "chance": res["chance"],
        "test_recall": fixed["test_recall"],
        "weight_decay": fixed["weight_decay"],
        "linear_cv": {
            **res["linear_cv"],
            "metric": "balanced accuracy of the class-balanced linear probe, its L2 "
            "strength chosen by case-wise cross-validation on the training cases, then refitted on all",
        },
        "knn": {
            **res["knn"],
            "metric": "balanced accuracy of the class-balanced k-nearest-neighbour probe on the "
            "standardised tokens, k chosen by case-wise cross-validation on the training cases",
        },
        "encoder": str(init) if init not in (None, "", "none") else "none (the seeded random init, as from scratch)",
        "seed": cfg.seed,
        "labelled_cases": k,
        "training_cases": [e.get("case") for e in train],
        "training_cases_available": n,
        "test_cases": [e.get("case") for e in test],
        **counts,
        "steps": steps,
        "probe_version": PROBE_VERSION,
        "seconds": round(time.time() - t0, 2),
        "metric": _METRIC,
    }
    atomic_write_text(out_json, json.dumps(result, indent=2))
    return result


def run_noise_floor(
    cfg: Config,
    dataset: str | Path,
    out_json: str | Path,
    seeds: Sequence[int],
    labelled_cases: int | None = None,
    steps: int = 200,
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    ks: Sequence[int] = DEFAULT_KS,
    folds: int = DEFAULT_FOLDS,
    metric: str = "cosine",
) -> dict:
    """The probes of the encoder's random initialisations, one per seed of ``seeds``; writes ``out_json``.

    Each encoder is :func:`probe_encoder` with ``cfg.seed`` replaced by one of ``seeds`` and nothing loaded
    (what fine-tuning from scratch with that seed starts from); all are probed exactly as :func:`run_probe`
    probes (same arguments) on the SAME cases and folds, those of ``cfg.seed``, so only the initialisation
    varies. Read a pre-trained encoder's :func:`run_probe` with ``cfg.seed`` against it: a score above the
    random ones' ``max`` (or ``mean`` + a few ``std``) is one random initialisations do not reach. The
    preprocessed volumes are held in memory while the seeds' encoders run. A finished ``out_json`` with the
    same seeds and labelled cases is read back. Returns ``summary`` (per probe: ``linear_fixed``,
    ``linear_cv``, ``knn``: ``values`` per seed, ``mean``, ``std`` (n - 1), ``min``, ``max``, ``n``),
    ``per_seed`` (each seed's probe results), the seeds, cases, token counts and ``seconds``.
    """
    seeds = [int(s) for s in seeds]
    out_json = Path(out_json)
    k = cfg.finetune.labelled_cases if labelled_cases is None else int(labelled_cases)
    if out_json.exists():
        done = json.loads(out_json.read_text())
        if done.get("seeds") == seeds and done.get("labelled_cases") == k and done.get("cases_seed") == cfg.seed:
            return done
    t0 = time.time()
    train, test, k, n = _cases(cfg, dataset, labelled_cases)
    device = _device(cfg)
    vol_tr, vol_te = list(_volumes(train, cfg)), list(_volumes(test, cfg))
    counts: dict[str, int] = {}

    def build(seed: int):
        return probe_encoder(replace(cfg, seed=seed)).to(device)

    settings = dict(strengths=strengths, ks=ks, folds=folds, metric=metric, steps=steps)

    def probe(encoder) -> dict:
        res, tokens = _probe(encoder, vol_tr, vol_te, train, cfg, device, settings)
        counts.update(tokens)
        return res

    floor = noise_floor(build, seeds, probe)
    result = {
        "summary": floor["summary"],
        "seeds": seeds,
        "per_seed": {str(s): r for s, r in floor["per_seed"].items()},
        "encoder": "the seeded random initialisation of the fine-tuning ViT, one per seed (as from scratch)",
        "cases_seed": cfg.seed,
        "labelled_cases": k,
        "training_cases": [e.get("case") for e in train],
        "training_cases_available": n,
        "test_cases": [e.get("case") for e in test],
        **counts,
        "steps": steps,
        "probe_version": PROBE_VERSION,
        "seconds": round(time.time() - t0, 2),
        "metric": "balanced accuracy of each probe (linear_fixed: L2 1e-3; linear_cv; knn) over random "
        "initialisations of the encoder, all on the same cases and folds",
    }
    atomic_write_text(out_json, json.dumps(result, indent=2))
    return result
