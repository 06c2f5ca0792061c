"""Pre-training losses, all computed in float32 (also under autocast).

* :func:`reconstruction_loss` - L_rec (paper 2.1, as SelfMedMAE): MSE to per-patch normalised voxels.
* :func:`ranking_loss` - L_pred (paper eq. 1): pairwise ranking of predicted per-patch losses.
* :func:`absolute_loss` - HPM's ``relative=False`` variant of L_pred: MSE to standardised losses.

All tensors over masked patches must share one token order (the caller's); these functions never
reorder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["normalize_patches", "reconstruction_loss", "ranking_loss", "absolute_loss"]


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise each patch by its own mean and variance: ``(T - mean) / sqrt(var + eps)``.

    The variance is the unbiased one over the patch's voxels, as in MAE's ``norm_pix_loss``.

    Args:
        patches: ``(..., P^3 * C)``.
    Returns:
        ``(normalised, mean, var)``, float32; mean and var ``(..., 1)`` (keep them to de-normalise a
        prediction for display: ``pred * sqrt(var + eps) + mean``).
    """
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps), mean, var


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, norm_pix_loss: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_rec over masked patches.

    Args:
        pred: ``(B, M, P^3 * C)`` reconstructor output for the masked patches.
        target: ``(B, M, P^3 * C)`` raw voxels of the same patches, same token order.
        norm_pix_loss: normalise each target patch by its own mean and variance first.
    Returns:
        ``(loss, per_patch)``: scalar mean of ``per_patch``; ``per_patch`` ``(B, M)`` is the mean squared
        error over the voxels of each patch (keeps its graph; detach it to use it as a ranking target).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
    target = target.detach().float()
    if norm_pix_loss:
        target = normalize_patches(target, eps)[0]
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, M)
    return per_patch.mean(), per_patch


def ranking_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_pred of paper eq. 1: learn the order of per-patch losses from all ordered pairs.

    For every ordered pair ``(i, j)``, ``i != j``, of the same sample: with ``d = pred_i - pred_j``,
    a pair with ``target_i > target_j`` adds ``-log sigmoid(d)``, a pair with ``target_i < target_j`` adds
    ``-log(1 - sigmoid(d)) = -log sigmoid(-d)``; ties (and the diagonal) add nothing. The sum is divided
    by the number of such (non-tied) pairs in the whole batch. O(M^2) memory per sample, fully batched.

    Args:
        pred: ``(B, M)`` predicted losses (the loss predictor's output); receives the gradient.
        target: ``(B, M)`` measured per-patch losses, same token order; detached here.
    Returns:
        float32 scalar. With no valid pair it is ``0 * pred.sum()``, so it still has a graph.
    """
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, M), got {tuple(pred.shape)} and {tuple(target.shape)}.")
    pred = pred.float()
    target = target.detach().float()
    d = pred.unsqueeze(2) - pred.unsqueeze(1)  # (B, M, M): d[b, i, j] = pred_i - pred_j
    pos = target.unsqueeze(2) > target.unsqueeze(1)  # (B, M, M): target_i > target_j
    neg = target.unsqueeze(2) < target.unsqueeze(1)  # diagonal and ties are neither
    # -log sigmoid(s * d) with s = +1 for pos, -1 for neg; logsigmoid is stable for large |d|
    sign = pos.float() - neg.float()  # (B, M, M) in {-1, 0, 1}
    valid = pos | neg
    n_pairs = valid.sum()
    per_pair = -F.logsigmoid(sign * d) * valid  # zero where invalid
    # keep the graph when there is no valid pair (e.g. all targets equal) so backward still works
    return torch.where(n_pairs > 0, per_pair.sum() / n_pairs.clamp(min=1), pred.sum() * 0.0)


def absolute_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HPM's ``relative=False`` L_pred: regress the standardised per-patch losses.

    The target is standardised per sample over its M patches (``(t - mean) / sqrt(var + eps)``, unbiased
    variance) and compared with ``pred`` by mean squared error.

    Args:
        pred, target: ``(B, M)``; target detached here.
    Returns:
        float32 scalar.
    """
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, M), got {tuple(pred.shape)} and {tuple(target.shape)}.")
    target = target.detach().float()
    target = normalize_patches(target, eps)[0]  # per row: the same standardisation as the pixel targets
    return F.mse_loss(pred.float(), target)
