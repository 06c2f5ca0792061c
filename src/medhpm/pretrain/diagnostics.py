"""Does the teacher mine what the paper claims? Measures logged once an epoch by the pre-training trainer.

* the teacher's random-initialisation share - the weight of its initial copy in ``t_s = m_s t_{s-1} +
  (1 - m_s) s_s`` unrolled: the product of the momenta applied so far (kept by the trainer, step by step).
* :func:`pairwise_order_accuracy` - how well predicted difficulties order the measured per-patch losses:
  the share of correctly ordered pairs of patches of the same sample, pairs tied in either excluded
  (0.5 = chance, 1 = the same order). Used for the teacher's scores and for the student's own predicted
  losses ``lp``, both against the student's measured reconstruction loss of the masked patches.
* :func:`rank_correlation` - the same question as Spearman's rank correlation, per sample, averaged over
  the samples (0 = chance, 1 = the same order).
* :func:`patches_with_organ` and :func:`organ_shares` - the paper's premise is that hard patches are the
  discriminative parts (organs): with labels, the share of mined patches that hold organ voxels against
  the share among the randomly masked ones.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from medhpm.models.vit import patchify

__all__ = ["pairwise_order_accuracy", "rank_correlation", "patches_with_organ", "organ_shares"]


def pairwise_order_accuracy(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Share of pairs ``(i, j)``, ``i < j``, of the same sample that ``scores`` order as ``target`` does.

    Args:
        scores: ``(B, M)`` predicted difficulty of M patches.
        target: ``(B, M)`` measured per-patch losses of the same patches, same order.
    Returns:
        correctly ordered pairs / pairs with ``target_i != target_j`` and ``scores_i != scores_j``, over
        the whole batch; NaN when there is no such pair.
    """
    if scores.dim() != 2 or scores.shape != target.shape:
        raise ValueError(f"scores and target must both be (B, M), got {tuple(scores.shape)} and {tuple(target.shape)}.")
    s = scores.detach().double()
    t = target.detach().double()
    ds = torch.sign(s.unsqueeze(2) - s.unsqueeze(1))  # (B, M, M)
    dt = torch.sign(t.unsqueeze(2) - t.unsqueeze(1))
    agree = ds * dt  # +1 same order, -1 reversed, 0 a tie in either (and the diagonal)
    upper = torch.ones(s.shape[1], s.shape[1], dtype=torch.bool, device=s.device).triu(1)
    agree = agree[:, upper]  # (B, M(M-1)/2)
    valid = int((agree != 0).sum())
    if valid == 0:
        return float("nan")
    return int((agree > 0).sum()) / valid


def rank_correlation(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Spearman's rank correlation of ``scores`` with ``target`` in each sample, averaged over samples.

    Args:
        scores, target: ``(B, M)``, the same patches in the same order.
    Returns:
        the mean over samples of the Pearson correlation of the two samples' ranks (tied values share
        their mean rank); a sample whose scores or targets are all equal is left out; NaN if all are.
    """
    if scores.dim() != 2 or scores.shape != target.shape:
        raise ValueError(f"scores and target must both be (B, M), got {tuple(scores.shape)} and {tuple(target.shape)}.")
    s = scores.detach().double().cpu().numpy()
    t = target.detach().double().cpu().numpy()
    rhos = []
    for a, b in zip(s, t):
        ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2  # centred ranks
        den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
        if den > 0:
            rhos.append(float((ra * rb).sum()) / den)
    return float(np.mean(rhos)) if rhos else float("nan")


def patches_with_organ(label: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``label`` ``(B, 1, H, W, D)`` -> bool ``(B, N)`` in token order: the patch holds an organ voxel
    (label value above 0)."""
    return patchify((label > 0).float(), patch_size).amax(dim=-1) > 0


def organ_shares(has_organ: torch.Tensor, hard: torch.Tensor, masked: torch.Tensor) -> dict[str, float]:
    """Share of the mined (hard) patches, and of the randomly masked ones (``masked & ~hard``), that hold
    organ voxels; all bool ``(B, N)``. A group with no patch is left out of the result."""
    out = {}
    for name, group in (("organ_share_hard", hard), ("organ_share_random", masked & ~hard)):
        n = int(group.sum())
        if n:
            out[name] = int((has_organ & group).sum()) / n
    return out


def organ_lift(scores: torch.Tensor, has_organ: torch.Tensor, masked: torch.Tensor) -> dict[str, float]:
    """Does the teacher point at the organs? Over all samples: the share of the top-scored half of each
    sample's masked patches that hold organ voxels (``organ_share_top``), the share of all patches that do
    (``organ_share_all``) and their ratio (``organ_lift``; 1 = no better than any patch; NaN without organ).

    ``scores`` (B, N) teacher scores; ``has_organ`` and ``masked`` bool (B, N)."""
    top_hits = top_count = 0
    for s, org, msk in zip(scores, has_organ, masked):
        ids = msk.nonzero().flatten()
        top = ids[torch.topk(s[ids], len(ids) // 2).indices]
        top_hits += int(org[top].sum())
        top_count += len(top)
    share_top = top_hits / top_count if top_count else float("nan")
    share_all = float(has_organ.float().mean())
    return {
        "organ_share_top": share_top,
        "organ_share_all": share_all,
        "organ_lift": share_top / share_all if share_all > 0 else float("nan"),
    }


def position_baseline(ids_masked: torch.Tensor, truth: torch.Tensor, num_patches: int) -> torch.Tensor:
    """A yardstick that knows only WHERE a patch is: for each crop, the mean of the measured losses at the
    same token position in the OTHER crops (leave one crop out), ``(B, M)`` like ``truth``. A position no
    other crop masked gets the other crops' overall mean. If this ranks a crop's losses as well as a
    predictor does, the predictor has learned little beyond the position of a patch in the crop.

    ``ids_masked`` (B, M) token indices of ``truth`` (B, M) measured losses; B >= 2."""
    if ids_masked.shape != truth.shape or ids_masked.dim() != 2 or truth.shape[0] < 2:
        raise ValueError(
            f"need (B, M) ids and losses of at least 2 crops, got {tuple(ids_masked.shape)} and {tuple(truth.shape)}"
        )
    b = truth.shape[0]
    t = truth.detach().double()
    tot = torch.zeros(b, num_patches, dtype=torch.float64).scatter_add_(1, ids_masked, t)
    cnt = torch.zeros(b, num_patches, dtype=torch.float64).scatter_add_(1, ids_masked, torch.ones_like(t))
    other_tot, other_cnt = tot.sum(0, keepdim=True) - tot, cnt.sum(0, keepdim=True) - cnt  # (B, N)
    fallback = other_tot.sum(1, keepdim=True) / other_cnt.sum(1, keepdim=True)  # (B, 1)
    mean = torch.where(other_cnt > 0, other_tot / other_cnt.clamp(min=1), fallback)
    return torch.gather(mean, 1, ids_masked)
