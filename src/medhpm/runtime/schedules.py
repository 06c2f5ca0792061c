"""Learning-rate and momentum schedules, evaluated per iteration (as in MAE's engine)."""

from __future__ import annotations

import math


def cosine_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_epochs``, then half-cosine to ``min_lr``.

    ``epoch`` is fractional (``epoch_index + step / steps_per_epoch``) so the lr changes every step.
    """
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_scale']`` (layer-wise decay keeps its scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lr(lr: float, effective_batch: int, ref_batch: int) -> float:
    """Linear scaling rule: the configured lr holds at ``ref_batch``, scaled for the effective batch."""
    return lr * effective_batch / ref_batch


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of the linear warm-up: those with ``step / steps_per_epoch < warmup_epochs``, i.e.
    ``ceil(warmup_epochs * steps_per_epoch)``. The warm-up is set in epochs, so at a larger batch (fewer
    steps per epoch over the same volumes) it has fewer steps."""
    return math.ceil(warmup_epochs * steps_per_epoch - 1e-9)
