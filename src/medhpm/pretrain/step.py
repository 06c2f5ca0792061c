"""The HPM step, in one place: the teacher scores the patches, the curriculum masks the hardest, the
student reconstructs the masked patches and predicts their losses (docs/method.md, "One iteration", steps 1 to 7).

Everything that runs a pre-training step calls this module: the trainer (eagerly or through
``torch.compile``, ``runtime.compile``), the figures, ``medhpm visualize pretrain`` and the benchmarks.

How the teacher is queried (``pretrain.teacher_view``, docs/method.md "How the teacher is queried"):

* ``full``: the paper's and HPM's way. One pass over the whole, unmasked volume. The predictor is then
  asked about an input it never sees in training (every position carries its own patch's feature
  instead of a mask token), and ranks patches little better than chance.
* ``masked``: the N tokens of each sample are split at random into V groups of ``N // V``
  (:func:`view_partition`); view g keeps group g visible and masks the rest, like the student's
  ``1 - mask_ratio`` visible share; the predictor scores the masked positions of every view, and a token's
  score is the mean over the views that mask it (V - 1 of them; the ``N mod V`` tokens left out of
  every group are masked in all V). The V views of a batch run as one batched pass of ``B * V`` sequences.
  The partition is drawn from uniform ranks ``view_noise`` (B, N) that the trainer draws with the mask's
  ranks from the run's seed and step, so a resumed run draws the same partitions.
"""

from __future__ import annotations

import torch

from medhpm.models import patchify
from medhpm.pretrain.masking import hard_patch_mask, num_hard, num_masked, random_mask
from medhpm.runtime.distributed import unwrap

__all__ = [
    "TEACHER_VIEWS",
    "default_teacher_views",
    "teacher_views_used",
    "view_partition",
    "teacher_scores",
    "step_core",
    "pretrain_iteration",
    "mined_patches",
    "mined_patch_stats",
]

TEACHER_VIEWS = ("full", "masked")


def default_teacher_views(mask_ratio: float) -> int:
    """The number of complementary views whose visible share ``1 / V`` is closest to the student's
    ``1 - mask_ratio`` (4 at 0.75, 10 at 0.9), at least 2 (each token must be masked in some view)."""
    return max(2, round(1.0 / (1.0 - float(mask_ratio))))


def teacher_views_used(view: str, views: int, mask_ratio: float) -> int:
    """Views per sample of a teacher query: 1 for ``full``; ``views`` (0: :func:`default_teacher_views`)
    for ``masked``."""
    if view not in TEACHER_VIEWS:
        raise ValueError(f"teacher view must be one of {', '.join(TEACHER_VIEWS)}, got {view!r}.")
    if view == "full":
        return 1
    return int(views) if views else default_teacher_views(mask_ratio)


def view_partition(view_noise: torch.Tensor, views: int) -> torch.Tensor:
    """Disjoint groups of tokens, one per view: ``view_noise`` (B, N) uniform ranks -> ``(B, V, N // V)``
    long token indices, ascending within each group. Tokens are ordered by their rank and dealt out in
    consecutive runs of ``N // V``; the last ``N mod V`` are in no group (visible in no view)."""
    b, n = view_noise.shape
    if not 2 <= views <= n:
        raise ValueError(f"the teacher needs 2 to N={n} views, got {views}.")
    per_view = n // views
    order = torch.argsort(view_noise, dim=1)[:, : views * per_view]  # (B, V*K)
    return torch.sort(order.reshape(b, views, per_view), dim=-1).values  # (B, V, K)


def teacher_scores(
    teacher,
    x: torch.Tensor,
    view: str = "full",
    views: int = 1,
    view_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The teacher's predicted difficulty of every patch, ``(B, N)`` float32 in token order.

    ``teacher``: the teacher's :class:`~medhpm.pretrain.model.HPMPretrainModel` (or an EMATeacher);
    ``view``/``views``: as :func:`teacher_views_used` returns them; ``view_noise`` (B, N) the ranks of the
    partition (drawn here from ``generator`` when not given)."""
    model = getattr(teacher, "model", teacher)
    if view == "full":
        return model.predict_difficulty(x)
    if view_noise is None:
        view_noise = torch.rand(x.shape[0], model.encoder.num_patches, device=x.device, generator=generator)
    return model.predict_difficulty_views(x, view_partition(view_noise, views))


def step_core(
    student,
    teacher,
    x: torch.Tensor,
    noise: torch.Tensor | None,
    n_hard: torch.Tensor | None,
    mask_ratio: float,
    lambda_pred: float,
    use_pred: bool,
    view: str = "full",
    views: int = 1,
    view_noise: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
):
    """The part of a step that runs on the device, with static shapes: teacher scores (when ``teacher``
    is given, or ``scores`` already made), mask, student, losses. Nothing is read back to the host, so it
    compiles whole (``runtime.compile``; ``fullgraph=True`` holds for both views)."""
    # the student is an HPMPretrainModel (typed nn.Module); a comment, not a cast, in code that is compiled
    n_tokens: int = unwrap(student).encoder.num_patches  # type: ignore[union-attr, assignment]
    m = num_masked(n_tokens, mask_ratio)
    parts: dict = {}
    if teacher is None and scores is None:  # no teacher pass while the curriculum asks for no hard patch
        mask = random_mask(x.shape[0], n_tokens, mask_ratio, device=x.device, noise=noise)
    else:
        if scores is None:
            with torch.no_grad():  # the teacher never needs a graph
                scores = teacher_scores(teacher, x, view, views, view_noise)  # (B, N)
        mask = hard_patch_mask(scores, mask_ratio, 0.0, noise=noise, n_hard=n_hard)
        parts["scores"], parts["mask"] = scores, mask
    out = student(x, mask, m)
    parts["out"] = out
    loss = out["loss_rec"]
    parts["loss_rec"] = out["loss_rec"].detach()
    if use_pred and out["loss_pred"] is not None:
        loss = loss + lambda_pred * out["loss_pred"]
        parts["loss_pred"] = out["loss_pred"].detach()
    return loss, parts


def pretrain_iteration(
    student,
    teacher,
    x: torch.Tensor,
    alpha: float,
    mask_ratio: float,
    lambda_pred: float,
    use_pred: bool,
    noise: torch.Tensor | None = None,
    core=None,
    n_hard_tensor: torch.Tensor | None = None,
    view: str = "full",
    views: int = 1,
    view_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """One selfMedHPM iteration up to the loss.

    ``student`` is the (possibly DDP-wrapped) :class:`HPMPretrainModel`; ``teacher`` its EMA copy or
    None. ``x`` (B, C, H, W, D); ``noise`` optional uniform (B, N) ranks for the random part of the mask;
    ``view``/``views``/``view_noise`` how the teacher is queried (module docstring). ``core``:
    :func:`step_core` or its ``torch.compile``d form; ``n_hard_tensor`` the hard-patch count as a 0-dim
    tensor on ``x``'s device (one compiled graph for every alpha).
    Returns the loss to back-propagate and what to log: ``alpha``, ``n_hard`` (Python numbers) and
    ``loss_rec``/``loss_pred`` as detached 0-dim tensors, nothing read back from the device (plus the
    student's output under ``_out`` and, when patches were mined, the teacher's scores and the mask under
    ``_scores``/``_mask``).
    """
    # the student is an HPMPretrainModel (typed nn.Module)
    n_tokens: int = unwrap(student).encoder.num_patches  # type: ignore[union-attr, assignment]
    n_hard = num_hard(alpha, num_masked(n_tokens, mask_ratio)) if teacher is not None else 0
    if n_hard and n_hard_tensor is None:
        n_hard_tensor = torch.tensor(n_hard, device=x.device)
    core = core or step_core
    loss, parts = core(
        student,
        teacher if n_hard else None,
        x,
        noise,
        n_hard_tensor if n_hard else None,
        mask_ratio,
        lambda_pred,
        use_pred,
        view,
        views,
        view_noise if n_hard else None,
    )
    logs: dict = {"alpha": alpha, "n_hard": n_hard, "_out": parts["out"], "loss_rec": parts["loss_rec"]}
    if "loss_pred" in parts:
        logs["loss_pred"] = parts["loss_pred"]
    if n_hard:
        logs["_scores"], logs["_mask"] = parts["scores"], parts["mask"]
    return loss, logs


def mined_patches(scores: torch.Tensor, n_hard: int) -> torch.Tensor:
    """bool ``(B, N)``: the ``n_hard`` patches with the highest teacher scores (the ones HPM always masks)."""
    hard = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return hard.scatter_(1, torch.topk(scores, n_hard, dim=1).indices, True)


def mined_patch_stats(x, scores, mask, n_hard, patch_size, data_cfg, num_masked: int | None = None) -> dict:
    """HU statistics of the mined (hard) patches vs the randomly masked ones (docs/method.md, "Traps we guard against"), as
    0-dim device tensors (read back with the step's other logs, at the log interval). ``num_masked``: M
    of the masks, if known; without it whether any patch was masked at random is read from the device."""
    d = data_cfg
    with torch.no_grad():
        mean_int = patchify(x.float(), patch_size).mean(-1)  # (B, N) in [b_min, b_max]
        hu = d.a_min + (mean_int - d.b_min) / (d.b_max - d.b_min) * (d.a_max - d.a_min)
        hard = mined_patches(scores, n_hard)
        rand = mask & ~hard
        out = {"hu_hard_mean": (hu * hard).sum() / hard.sum()}
        if (n_hard < num_masked) if num_masked is not None else bool(rand.any()):
            out["hu_random_mean"] = (hu * rand).sum() / rand.sum()
    return out
