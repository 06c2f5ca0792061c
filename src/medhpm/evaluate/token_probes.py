"""A frozen-encoder probe: a cheap, low-noise measure of what pre-training put into the tokens.

Each token of the frozen encoder is labelled with its patch's majority class (background included); probes
are fitted on the tokens of the labelled (training) cases and scored on the test cases by balanced
accuracy: the mean over the classes present in the test patches of the share of their patches predicted
right (chance is 1 / number of classes present).

Two probes, each with its one knob chosen by cross-validation over the training CASES (never tokens of one
case on both sides of a fold, :func:`case_folds`), so that a probe cannot win by memorising its training
tokens:

* :func:`cv_linear_probe`: a class-balanced multinomial logistic regression (:func:`fit_linear_probe`)
  whose L2 strength is the one of a small log-spaced grid with the best mean held-out balanced accuracy,
  refitted on every training case;
* :func:`cv_knn_probe`: k nearest neighbours on the standardised tokens (cosine or Euclidean), each
  neighbour's vote weighted by the inverse frequency of its class, k chosen the same way.

:func:`probe_tokens` runs both (and the fixed-strength fit of old) on one encoder's tokens;
:func:`noise_floor` probes several random initialisations of an encoder and reports the spread of their
scores, the yardstick a pre-trained encoder's probe is read against. Functions are pure and batched.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from medhpm.models.vit import patchify

__all__ = [
    "patch_majority_labels",
    "LinearProbe",
    "fit_linear_probe",
    "balanced_accuracy",
    "class_recall",
    "volume_tokens",
    "case_folds",
    "cv_linear_probe",
    "KnnProbe",
    "fit_knn_probe",
    "cv_knn_probe",
    "probe_tokens",
    "noise_floor",
    "DEFAULT_STRENGTHS",
    "DEFAULT_STRENGTH",
    "DEFAULT_KS",
    "DEFAULT_K",
    "DEFAULT_FOLDS",
    "CV_TOLERANCE",
]

DEFAULT_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the L2 grid of the linear probe's CV
DEFAULT_STRENGTH = 1e-3  # the fixed fit's strength, and the linear probe's with a single training case
DEFAULT_KS = (5, 10, 20)  # the k of the kNN probe's CV
DEFAULT_K = 10  # the kNN probe's k with a single training case
DEFAULT_FOLDS = 5  # case-wise folds (fewer cases: leave-one-case-out)
CV_TOLERANCE = 1e-6  # L-BFGS's tolerance in the cross-validated fits and their refit (the loss barely moves
#                      below it; the weak penalties' fits stop about a third sooner than at torch's 1e-9)
_ABSENT = -1e9  # the bias of a class absent from a linear probe's fit: its logit never wins
_SINGLE_CASE = "default: a single training case, no case-wise cross-validation possible"


def patch_majority_labels(label: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``label`` ``(B, 1, H, W, D)`` of class numbers -> ``(B, N)`` long, each patch's most frequent class in
    token order (ties go to the smaller class number)."""
    values = patchify(label.float().round(), patch_size).long()  # (B, N, P^3)
    return torch.mode(values, dim=-1).values


@dataclass
class LinearProbe:
    """Standardisation of the features and a linear map to class logits."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(M, D)`` -> ``(M,)`` predicted classes."""
        return self.logits(x).argmax(dim=-1)


def _check_xy(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x must be (M, D) and y (M,) with M > 0, got {tuple(x.shape)} and {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"classes must lie in [0, {num_classes}), got {int(y.min())} to {int(y.max())}")


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)


def _inverse_frequency(y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class counts of ``y`` and weights that make every class present weigh as much (mean weight 1
    over the items; absent classes 0)."""
    counts = torch.bincount(y, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros(()))
    return counts, w


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    steps: int = 200,
    weight_decay: float = DEFAULT_STRENGTH,
    seed: int = 0,
    tolerance: float = 1e-9,
) -> LinearProbe:
    """Fit a class-balanced multinomial logistic regression on standardised features by full-batch L-BFGS.

    Args:
        x: ``(M, D)`` features (e.g. frozen encoder tokens); y: ``(M,)`` classes in ``[0, num_classes)``.
        steps: L-BFGS iterations; weight_decay: L2 penalty on the weights (not the bias), added to the
        class-weighted mean cross-entropy; tolerance: L-BFGS stops once the loss or the step changes by less.
    Each class present weighs in as much as any other (the loss is weighted by inverse class frequency), so
    the many background patches do not decide the fit. With a fixed small ``weight_decay`` the fit can
    memorise its tokens; :func:`cv_linear_probe` chooses it by case-wise cross-validation instead.
    """
    _check_xy(x, y, num_classes)
    x = x.detach().float()
    y = y.detach().long()
    mean, std = _standardiser(x)
    z = (x - mean) / std
    counts, class_w = _inverse_frequency(y, num_classes)
    g = torch.Generator().manual_seed(seed)
    init = 0.01 * torch.randn(num_classes, x.shape[1], generator=g)
    # only the classes present are fitted: an absent class's bias would chase -inf and keep L-BFGS busy
    present = torch.nonzero(counts > 0).flatten()
    index = torch.full((num_classes,), -1, dtype=torch.long)
    index[present] = torch.arange(len(present))
    yp, wp = index[y], class_w[present]
    weight = init[present].clone().requires_grad_(True)
    bias = torch.zeros(len(present), requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=steps,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_change=tolerance,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, yp, weight=wp) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    full_w = torch.zeros(num_classes, x.shape[1])
    full_b = torch.full((num_classes,), _ABSENT)  # never predicted
    full_w[present], full_b[present] = weight.detach(), bias.detach()
    return LinearProbe(mean, std, full_w, full_b)


def balanced_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over the classes present in ``true`` of the share of their items that ``pred`` gets right."""
    pred, true = pred.reshape(-1).long(), true.reshape(-1).long()
    if pred.shape != true.shape or true.numel() == 0:
        raise ValueError(
            f"pred and true must have the same, non-zero size, got {tuple(pred.shape)} and {tuple(true.shape)}"
        )
    classes = torch.unique(true)
    return float(torch.stack([(pred[true == c] == c).float().mean() for c in classes]).mean())


def class_recall(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Per class present in ``true`` (as a string), the share of its items that ``pred`` gets right."""
    pred, true = pred.reshape(-1).long(), true.reshape(-1).long()
    return {str(int(c)): float((pred[true == c] == c).float().mean()) for c in torch.unique(true)}


# ----------------------------------------------------------------------------------------------------------
# case-wise cross-validation


def case_folds(groups: torch.Tensor, folds: int = DEFAULT_FOLDS, seed: int = 0) -> list[torch.Tensor]:
    """Held-out masks of a K-fold split BY CASE: ``groups`` ``(M,)`` holds each token's case number.

    The cases (not the tokens) are shuffled with ``seed`` and dealt round-robin into ``min(folds, cases)``
    folds, so every case is held out exactly once and all of its tokens together; with fewer than ``folds``
    cases that is leave-one-case-out. Returns one ``(M,)`` bool mask per fold (True: held out); an empty
    list with a single case (nothing to hold out).
    """
    groups = groups.reshape(-1).long()
    cases = torch.unique(groups)
    n = len(cases)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if n < 2:
        return []
    k = min(int(folds), n)
    order = cases[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return [torch.isin(groups, order[i::k]) for i in range(k)]


def _fold_groups(groups: torch.Tensor, masks: list[torch.Tensor]) -> list[list[int]]:
    return [sorted(int(g) for g in torch.unique(groups.reshape(-1)[m])) for m in masks]


def _best(curve: Sequence[float]) -> int:
    """Index of the best mean score; ties go to the last candidate (the strongest penalty, the largest k)."""
    best = max(curve)
    return max(i for i, v in enumerate(curve) if v == best)


def cv_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    num_classes: int,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    folds: int = DEFAULT_FOLDS,
    steps: int = 200,
    seed: int = 0,
    tolerance: float = CV_TOLERANCE,
) -> tuple[LinearProbe, dict]:
    """:func:`fit_linear_probe` with its L2 strength chosen by case-wise cross-validation, refitted on all.

    For each strength of ``strengths`` (sorted ascending) a probe is fitted on the tokens of the cases
    outside each :func:`case_folds` fold and scored by balanced accuracy on the held-out cases' tokens; the
    strength with the best mean over the folds wins (ties: the stronger), and the probe is refitted with it on
    every token (all fits with L-BFGS ``tolerance``). With a single case there is nothing to hold out:
    :data:`DEFAULT_STRENGTH`, said in ``chosen_by``. Returns the refitted probe and a JSON-able record:
    ``weight_decay`` (chosen), ``chosen_by``, ``train_balanced_accuracy`` (the refit on its own tokens),
    ``cv`` (``weight_decay``: the grid, ``balanced_accuracy``: the mean held-out score per strength,
    ``fold_balanced_accuracy``: per strength, per fold; ``folds``, ``fold_groups``: the case numbers held
    out in each fold), or ``cv`` None.
    """
    _check_xy(x, y, num_classes)
    grid = sorted(float(s) for s in strengths)
    if not grid or any(s < 0 for s in grid):
        raise ValueError(f"strengths must be a non-empty list of non-negative numbers, got {list(strengths)}")
    masks = case_folds(groups, folds, seed)
    if masks:
        per_fold = [
            [
                balanced_accuracy(
                    fit_linear_probe(x[~m], y[~m], num_classes, steps, s, seed, tolerance).predict(x[m]), y[m]
                )
                for m in masks
            ]
            for s in grid
        ]
        curve = [sum(v) / len(v) for v in per_fold]
        wd, chosen_by = grid[_best(curve)], f"case-wise {len(masks)}-fold cross-validation"
        cv = {
            "weight_decay": grid,
            "balanced_accuracy": curve,
            "fold_balanced_accuracy": per_fold,
            "folds": len(masks),
            "fold_groups": _fold_groups(groups, masks),
        }
    else:
        wd, chosen_by, cv = DEFAULT_STRENGTH, _SINGLE_CASE, None
    probe = fit_linear_probe(x, y, num_classes, steps, wd, seed, tolerance)
    record = {
        "weight_decay": wd,
        "chosen_by": chosen_by,
        "train_balanced_accuracy": balanced_accuracy(probe.predict(x), y),
        "cv": cv,
    }
    return probe, record


# ----------------------------------------------------------------------------------------------------------
# k nearest neighbours

_CHUNK_ELEMENTS = 1 << 23  # query x bank distances held at once (32 MB of float32)


@dataclass
class KnnProbe:
    """The standardised (for cosine: also unit-length) fit tokens, their classes and vote weights."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    bank: torch.Tensor  # (M, D) the fit tokens, standardised
    classes: torch.Tensor  # (M,)
    class_weight: torch.Tensor  # (C,) float64, 1 / the class's count among the fit tokens (0 when absent)
    k: int
    metric: str  # "cosine" or "euclidean"

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / self.std
        return F.normalize(z, dim=-1) if self.metric == "cosine" else z

    def neighbours(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """``(Q, D)`` -> ``(Q, k)`` indices into the bank, nearest first, in chunks of queries so that at most
        about 8M distances are held at once."""
        k = min(int(self.k if k is None else k), self.bank.shape[0])
        q = self._embed(x)
        sq_bank = self.bank.pow(2).sum(dim=-1) if self.metric == "euclidean" else None
        step = max(1, _CHUNK_ELEMENTS // max(1, self.bank.shape[0]))
        out = []
        for i in range(0, q.shape[0], step):
            qi = q[i : i + step]
            sim = qi @ self.bank.T  # cosine: similarity of unit vectors
            if sq_bank is not None:  # euclidean: minus the squared distance, up to the query's own norm
                sim = 2 * sim - sq_bank
            out.append(sim.topk(k, dim=-1).indices)
        return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)

    def vote(self, idx: torch.Tensor) -> torch.Tensor:
        """Neighbour indices ``(Q, k)`` -> ``(Q,)`` classes: each neighbour votes with its class's weight; the
        heaviest class wins (ties: the smaller class number)."""
        num_classes = self.class_weight.shape[0]
        cls = self.classes[idx]  # (Q, k)
        votes = torch.zeros(idx.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, cls, self.class_weight[cls])
        return votes.argmax(dim=-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(Q, D)`` -> ``(Q,)`` predicted classes."""
        return self.vote(self.neighbours(x))


def fit_knn_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, k: int = DEFAULT_K, metric: str = "cosine"
) -> KnnProbe:
    """A class-balanced k-nearest-neighbour probe: the tokens ``x`` standardised with their own mean and std
    (and, for ``metric="cosine"``, scaled to unit length), ``k`` neighbours (at most the number of tokens),
    each voting with 1 / the number of fit tokens of its class, so the many background patches do not
    outvote the organs."""
    _check_xy(x, y, num_classes)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    x = x.detach().float()
    y = y.detach().long()
    mean, std = _standardiser(x)
    counts, _ = _inverse_frequency(y, num_classes)
    class_weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1).double(), torch.zeros((), dtype=torch.float64))
    probe = KnnProbe(mean, std, x, y, class_weight, int(k), metric)
    probe.bank = probe._embed(x)  # the bank in the space the queries are compared in
    return probe


def cv_knn_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    folds: int = DEFAULT_FOLDS,
    metric: str = "cosine",
    seed: int = 0,
) -> tuple[KnnProbe, dict]:
    """:func:`fit_knn_probe` with ``k`` chosen by the same case-wise cross-validation as
    :func:`cv_linear_probe` (ties: the larger k; a single case: :data:`DEFAULT_K`). The neighbours of each
    fold are searched once for the largest k. Returns the probe on every token and a record like
    :func:`cv_linear_probe`'s, with ``k`` and ``distance`` (``metric``) instead of ``weight_decay``."""
    _check_xy(x, y, num_classes)
    grid = sorted(int(k) for k in ks)
    if not grid or grid[0] < 1:
        raise ValueError(f"ks must be a non-empty list of positive numbers, got {list(ks)}")
    masks = case_folds(groups, folds, seed)
    if masks:
        per_fold: list[list[float]] = [[] for _ in grid]
        for m in masks:
            fold = fit_knn_probe(x[~m], y[~m], num_classes, grid[-1], metric)
            idx = fold.neighbours(x[m])
            for j, k in enumerate(grid):
                per_fold[j].append(balanced_accuracy(fold.vote(idx[:, :k]), y[m]))
        curve = [sum(v) / len(v) for v in per_fold]
        k, chosen_by = grid[_best(curve)], f"case-wise {len(masks)}-fold cross-validation"
        cv = {
            "k": grid,
            "balanced_accuracy": curve,
            "fold_balanced_accuracy": per_fold,
            "folds": len(masks),
            "fold_groups": _fold_groups(groups, masks),
        }
    else:
        k, chosen_by, cv = DEFAULT_K, _SINGLE_CASE, None
    probe = fit_knn_probe(x, y, num_classes, k, metric)
    return probe, {"k": k, "distance": metric, "chosen_by": chosen_by, "cv": cv}


# ----------------------------------------------------------------------------------------------------------
# all probes of one encoder, and the noise floor of random ones


def probe_tokens(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    groups: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    ks: Sequence[int] = DEFAULT_KS,
    folds: int = DEFAULT_FOLDS,
    metric: str = "cosine",
    steps: int = 200,
    seed: int = 0,
    fixed_strength: float | None = DEFAULT_STRENGTH,
) -> dict:
    """Every probe of one encoder's tokens: fitted on the training tokens (``groups``: their case numbers,
    for the case-wise CV), scored on the test tokens. Returns a JSON-able dict:

    * ``linear_cv``: :func:`cv_linear_probe`'s record plus its test ``balanced_accuracy`` and ``test_recall``;
    * ``knn``: :func:`cv_knn_probe`'s record, the same;
    * ``linear_fixed`` (unless ``fixed_strength`` is None): the fit at that fixed strength, its test and
      training balanced accuracy and test recall (the probe as it was before the CV);
    * ``chance``: 1 / the number of classes present in the test tokens.
    ``seed`` draws the folds and the linear fits' initialisation: keep it fixed to compare encoders.
    """
    out: dict[str, Any] = {}
    if fixed_strength is not None:
        fixed = fit_linear_probe(x_train, y_train, num_classes, steps, fixed_strength, seed)
        pred = fixed.predict(x_test)
        out["linear_fixed"] = {
            "weight_decay": float(fixed_strength),
            "balanced_accuracy": balanced_accuracy(pred, y_test),
            "train_balanced_accuracy": balanced_accuracy(fixed.predict(x_train), y_train),
            "test_recall": class_recall(pred, y_test),
        }
    lin, rec = cv_linear_probe(x_train, y_train, groups, num_classes, strengths, folds, steps, seed)
    pred = lin.predict(x_test)
    out["linear_cv"] = {
        "balanced_accuracy": balanced_accuracy(pred, y_test),
        **rec,
        "test_recall": class_recall(pred, y_test),
    }
    knn, rec = cv_knn_probe(x_train, y_train, groups, num_classes, ks, folds, metric, seed)
    pred = knn.predict(x_test)
    out["knn"] = {
        "balanced_accuracy": balanced_accuracy(pred, y_test),
        **rec,
        "test_recall": class_recall(pred, y_test),
    }
    out["chance"] = 1.0 / len(torch.unique(y_test))
    return out


def _scores(result: dict) -> dict[str, float]:
    """The named balanced accuracies of a probe result: every entry that is a dict with a numeric
    ``balanced_accuracy``, and every numeric entry of a flat dict of scores."""
    out = {}
    for name, v in result.items():
        if isinstance(v, dict) and isinstance(v.get("balanced_accuracy"), (int, float)):
            out[name] = float(v["balanced_accuracy"])
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and name != "chance":
            out[name] = float(v)
    return out


def noise_floor(build_encoder: Callable[[int], Any], seeds: Sequence[int], probe: Callable[[Any], dict]) -> dict:
    """The probe scores of random encoders: ``probe(build_encoder(seed))`` for every seed, summarised.

    ``build_encoder(seed)``: an encoder as its seeded random initialisation (or anything ``probe`` takes);
    ``probe(encoder)``: a dict of results, e.g. :func:`probe_tokens` on its tokens, always on the same
    cases and with the same CV seed, so that only the initialisation varies. Every probe in it (an entry
    with a ``balanced_accuracy``, or a plain number) is summarised over the seeds: ``values`` (per seed),
    ``mean``, ``std`` (sample, n - 1; 0 with one seed), ``min``, ``max``, ``n``. Returns ``{"seeds": [...],
    "per_seed": {seed: result}, "summary": {probe name: {...}}}``; a pre-trained encoder's score above
    ``max`` (or ``mean`` + a few ``std``) is one random initialisations do not reach.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    per_seed = {s: probe(build_encoder(s)) for s in seeds}
    names = list(_scores(per_seed[seeds[0]]))
    summary = {}
    for name in names:
        vals = [_scores(per_seed[s])[name] for s in seeds]
        summary[name] = {
            "values": vals,
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
        }
    return {"seeds": seeds, "per_seed": per_seed, "summary": summary}


@torch.no_grad()
def volume_tokens(
    encoder, image: torch.Tensor, label: torch.Tensor, roi, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen ``encoder``'s tokens of a whole preprocessed volume and their patches' majority classes.

    ``image``, ``label``: ``(1, H, W, D)`` on the encoder's grid (the validation chain's output). The volume
    is padded with its minimum (air) and background up to whole ROI windows and tiled by them without
    overlap; each window goes through the encoder with nothing masked. Returns ``(M, D)`` tokens and
    ``(M,)`` classes, windows in C order, tokens in token order.
    """
    roi = tuple(int(r) for r in roi)
    img, lab = image.float(), label.float()
    pads = [(-s) % r for s, r in zip(img.shape[1:], roi)]
    pad = [p for axis in reversed(pads) for p in (0, axis)]  # F.pad wants the last axis first
    img = F.pad(img, pad, value=float(img.min()))
    lab = F.pad(lab, pad, value=0.0)
    feats, classes = [], []
    grid = [s // r for s, r in zip(img.shape[1:], roi)]
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                win = (
                    slice(None),
                    slice(i * roi[0], (i + 1) * roi[0]),
                    slice(j * roi[1], (j + 1) * roi[1]),
                    slice(k * roi[2], (k + 1) * roi[2]),
                )
                tokens, _ = encoder(img[win][None])  # (1, N, D)
                feats.append(tokens[0])
                classes.append(patch_majority_labels(lab[win][None], patch_size)[0])
    return torch.cat(feats), torch.cat(classes)
