"""A frozen-encoder linear probe: a cheap, low-noise measure of what pre-training put into the tokens.

Each token of the frozen encoder is labelled with its patch's majority class (background included), a
multinomial logistic regression is fitted on the tokens of the labelled (training) cases and scored on
the test cases by balanced accuracy: the mean over the classes present in the test patches of the share of
their patches predicted right (chance is 1 / number of classes present).

Functions are pure and batched: :func:`patch_majority_labels` (label map -> per-token class),
:func:`fit_linear_probe` (features, classes -> a fitted probe), :func:`balanced_accuracy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medhpm.models.vit import patchify

__all__ = ["patch_majority_labels", "LinearProbe", "fit_linear_probe", "balanced_accuracy"]


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


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 200,
                     weight_decay: float = 1e-3, seed: int = 0) -> LinearProbe:
    """Fit a class-balanced multinomial logistic regression on standardised features by full-batch L-BFGS.

    Args:
        x: ``(M, D)`` features (e.g. frozen encoder tokens); y: ``(M,)`` classes in ``[0, num_classes)``.
        steps: L-BFGS iterations; weight_decay: L2 penalty on the weights (not the bias).
    Each class present weighs in as much as any other (the loss is weighted by inverse class frequency), so
    the many background patches do not decide the fit.
    """
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x must be (M, D) and y (M,) with M > 0, got {tuple(x.shape)} and {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"classes must lie in [0, {num_classes}), got {int(y.min())} to {int(y.max())}")
    x = x.detach().float()
    y = y.detach().long()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=num_classes).float()
    class_w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros(()))
    g = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, x.shape[1], generator=g)).requires_grad_(True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y, weight=class_w) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def balanced_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over the classes present in ``true`` of the share of their items that ``pred`` gets right."""
    pred, true = pred.reshape(-1).long(), true.reshape(-1).long()
    if pred.shape != true.shape or true.numel() == 0:
        raise ValueError(f"pred and true must have the same, non-zero size, got {tuple(pred.shape)} and {tuple(true.shape)}")
    classes = torch.unique(true)
    return float(torch.stack([(pred[true == c] == c).float().mean() for c in classes]).mean())


@torch.no_grad()
def volume_tokens(encoder, image: torch.Tensor, label: torch.Tensor, roi, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
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
                win = (slice(None), slice(i * roi[0], (i + 1) * roi[0]), slice(j * roi[1], (j + 1) * roi[1]),
                       slice(k * roi[2], (k + 1) * roi[2]))
                tokens, _ = encoder(img[win][None])  # (1, N, D)
                feats.append(tokens[0])
                classes.append(patch_majority_labels(lab[win][None], patch_size)[0])
    return torch.cat(feats), torch.cat(classes)
