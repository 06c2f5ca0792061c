"""Masks for masked-image pre-training: random (MAE) and easy-to-hard hard-patch mining (HPM).

A mask is a bool tensor ``(B, N)`` in the package's token order, ``True`` = masked (hidden from the
encoder, reconstructed by the decoder). Every sample of a batch has the same number of masked tokens,
``M = num_masked(N, mask_ratio)``, so the masked tokens stack into ``(B, M, ...)`` tensors.
"""

from __future__ import annotations

import torch

__all__ = ["num_visible", "num_masked", "num_hard", "random_mask", "hard_patch_mask", "curriculum_alpha"]

# int(N * (1 - r)) as in MAE/HPM, but a ratio like 0.9 gives N * 0.09999999999999998: the tiny slack
# makes the count what the user meant instead of one fewer visible token.
_EPS = 1e-9


def _check_ratio(mask_ratio: float) -> float:
    mask_ratio = float(mask_ratio)
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be strictly between 0 and 1, got {mask_ratio}.")
    return mask_ratio


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible tokens per sample: ``K = int(N * (1 - mask_ratio))`` (must be 1 .. N-1)."""
    mask_ratio = _check_ratio(mask_ratio)
    k = int(num_patches * (1.0 - mask_ratio) + _EPS)
    if not 1 <= k <= num_patches - 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} with {num_patches} patches leaves {k} visible; at least one patch "
            "must stay visible and at least one must be masked."
        )
    return k


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Masked tokens per sample: ``M = N - K``."""
    return num_patches - num_visible(num_patches, mask_ratio)


def num_hard(alpha: float, num_masked: int) -> int:
    """Hard (mined) patches per sample at curriculum share ``alpha``: ``int(alpha * M)``, as HPM rounds it.
    The one place this count is made: the step, the mask, the figure and the diagnostics read it here."""
    return int(float(alpha) * int(num_masked))


def _mask_from_visible(visible: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=visible.device)
    return mask.scatter_(1, visible, False)  # (B, N), True = masked


def random_mask(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniformly random mask (MAE): each sample hides ``M`` of its ``N`` tokens.

    ``noise``: optional pre-drawn uniform ``(B, N)`` ranks (the trainer draws them for the GLOBAL batch
    so that masks do not depend on the number of processes).

    ``generator`` (optional) must live on ``device``. Returns bool ``(B, N)``, True = masked.
    """
    k = num_visible(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, N)
    visible = torch.argsort(noise, dim=1)[:, :k]  # (B, K)
    return _mask_from_visible(visible, batch, num_patches)


def hard_patch_mask(
    scores: torch.Tensor,
    mask_ratio: float,
    alpha: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    n_hard: torch.Tensor | None = None,
) -> torch.Tensor:
    """HPM's easy-to-hard mask from predicted per-patch difficulty.

    With ``M = num_masked(N, mask_ratio)`` and ``n_hard = int(alpha * M)``: the ``n_hard`` patches with
    the highest ``scores`` are always masked; the other ``M - n_hard`` masked patches are drawn uniformly
    at random from the rest, so visible patches only ever come from the non-hard ones. ``alpha = 0`` is
    the random MAE mask.

    Args:
        scores: ``(B, N)`` predicted difficulty (e.g. the teacher's predicted loss); not modified.
        mask_ratio: in (0, 1).
        alpha: share of the masked patches chosen by difficulty, in [0, 1].
        generator: optional ``torch.Generator`` on ``scores.device`` for reproducible draws.
        n_hard: optional 0-dim long tensor that replaces ``int(alpha * M)``: the same mask (up to the
            order of exactly tied scores) from a computation whose shapes do not depend on alpha, so that
            one compiled step (``runtime.compile``) serves the whole curriculum.
    Returns:
        bool ``(B, N)``, True = masked; exactly M per sample.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}.")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    batch, n = scores.shape
    k = num_visible(n, mask_ratio)
    m = n - k
    if n_hard is not None:
        hard_from_tensor = True
    else:
        hard_from_tensor = False
        n_hard = num_hard(alpha, m)  # type: ignore[assignment]  # an int in this case, a tensor in the other

    # rand in [0, 1) ranks the ordinary patches at random; a hard patch gets 2.0 so it sorts last and
    # can never be among the K lowest (visible) ones.
    if noise is None:
        rank = torch.rand(batch, n, device=scores.device, generator=generator)  # (B, N)
    else:  # pre-drawn uniform ranks (B, N); cloned because the hard patches are written into them
        rank = noise.to(scores.device).clone()
    if hard_from_tensor:  # the n_hard highest scores by their place in the descending order
        order = torch.argsort(scores.detach().float(), dim=1, descending=True)  # (B, N)
        first = torch.arange(n, device=scores.device).expand(batch, n) < n_hard.to(scores.device)  # type: ignore[union-attr]
        hard = torch.zeros(batch, n, dtype=torch.bool, device=scores.device).scatter(1, order, first)
        rank = torch.where(hard, torch.full_like(rank, 2.0), rank)
    elif n_hard > 0:  # type: ignore[operator]  # the int of num_hard (hard_from_tensor is False)
        hard = torch.topk(scores.detach().float(), n_hard, dim=1).indices  # type: ignore[arg-type]  # (B, n_hard)
        rank.scatter_(1, hard, 2.0)
    visible = torch.argsort(rank, dim=1)[:, :k]  # (B, K)
    return _mask_from_visible(visible, batch, n)


def curriculum_alpha(epoch: float, total_epochs: int, alpha_0: float, alpha_T: float) -> float:  # noqa: N803
    """Share of hard patches at epoch ``epoch`` (0-based) of ``total_epochs``, rising linearly.

    The paper writes ``alpha_t = alpha_0 + (t / T)(alpha_T - alpha_0)``; HPM's code uses ``(t + 1) / T``,
    which is followed here: epoch 0 gives ``alpha_0 + (alpha_T - alpha_0) / T`` and the last epoch
    (``T - 1``) gives ``alpha_T``. The progress ``(t + 1) / T`` is clamped to [0, 1] (a run resumed past T
    keeps ``alpha_T``) and the result to [0, 1]. ``epoch`` may be fractional.
    """
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}.")
    for name, value in (("alpha_0", alpha_0), ("alpha_T", alpha_T)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    progress = min(max((float(epoch) + 1.0) / float(total_epochs), 0.0), 1.0)
    alpha = float(alpha_0) + progress * (float(alpha_T) - float(alpha_0))
    return min(max(alpha, 0.0), 1.0)
