"""Pre-training losses against slow, plain references."""

import math

import pytest
import torch

from medhpm.pretrain import absolute_loss, normalize_patches, ranking_loss, reconstruction_loss


def ranking_reference(pred, target):
    """Eq. 1 by a double loop over ordered pairs of the same sample; ties and diagonal skipped."""
    total, pairs = 0.0, 0
    for p_row, t_row in zip(pred.tolist(), target.tolist(), strict=True):
        for i in range(len(p_row)):
            for j in range(len(p_row)):
                if i == j or t_row[i] == t_row[j]:
                    continue
                s = 1.0 / (1.0 + math.exp(-(p_row[i] - p_row[j])))
                total += -math.log(s) if t_row[i] > t_row[j] else -math.log(1.0 - s)
                pairs += 1
    return total / pairs


def test_ranking_loss_matches_double_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (3, 7), generator=g).double()  # many ties
    got = ranking_loss(pred, target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ranking_reference(pred, target), rel=1e-5)


def test_ranking_loss_gradient_matches_autograd_reference():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, generator=g, requires_grad=True)
    target = torch.tensor([[1.0, 2.0, 2.0, 0.5, 3.0], [0.0, 0.0, 1.0, 4.0, 1.0]])
    ranking_loss(pred, target).backward()
    ref_pred = pred.detach().clone().requires_grad_(True)
    terms = []
    for b in range(2):
        for i in range(5):
            for j in range(5):
                if target[b, i] > target[b, j]:
                    terms.append(-torch.log(torch.sigmoid(ref_pred[b, i] - ref_pred[b, j])))
                elif target[b, i] < target[b, j]:
                    terms.append(-torch.log(1 - torch.sigmoid(ref_pred[b, i] - ref_pred[b, j])))
    (sum(terms) / len(terms)).backward()
    torch.testing.assert_close(pred.grad, ref_pred.grad)


def test_ranking_loss_detaches_target_and_is_stable():
    pred = torch.tensor([[1000.0, -1000.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    loss = ranking_loss(pred, target)
    assert torch.isfinite(loss) and loss.item() > 100
    loss.backward()
    assert target.grad is None and torch.isfinite(pred.grad).all()


def test_ranking_loss_without_valid_pairs_keeps_graph():
    pred = torch.randn(2, 4, requires_grad=True)
    loss = ranking_loss(pred, torch.ones(2, 4))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2, 4))


def test_ranking_loss_bfloat16_input_gives_float32():
    pred = torch.randn(2, 6).bfloat16()
    assert ranking_loss(pred, torch.randn(2, 6)).dtype == torch.float32
    with pytest.raises(ValueError):
        ranking_loss(torch.randn(2, 6), torch.randn(2, 5))


def test_absolute_loss_matches_manual():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 9, generator=g), torch.rand(3, 9, generator=g)
    t = target.clone()
    for b in range(3):
        t[b] = (t[b] - t[b].mean()) / math.sqrt(t[b].var().item() + 1e-6)
    expected = ((pred - t) ** 2).mean()
    torch.testing.assert_close(absolute_loss(pred, target), expected)


def test_reconstruction_loss_matches_manual():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 3, 64, generator=g), torch.rand(2, 3, 64, generator=g) * 5
    loss, per_patch = reconstruction_loss(pred, target, norm_pix_loss=True)
    manual = torch.empty(2, 3)
    for b in range(2):
        for m in range(3):
            t = target[b, m]
            mean, var = t.sum() / 64, ((t - t.sum() / 64) ** 2).sum() / 63
            manual[b, m] = ((pred[b, m] - (t - mean) / torch.sqrt(var + 1e-6)) ** 2).mean()
    torch.testing.assert_close(per_patch, manual)
    torch.testing.assert_close(loss, manual.mean())
    raw, raw_pp = reconstruction_loss(pred, target, norm_pix_loss=False)
    torch.testing.assert_close(raw_pp, ((pred - target) ** 2).mean(-1))
    assert raw.dtype == torch.float32


def test_normalize_patches_keeps_stats_for_display():
    x = torch.rand(2, 5, 27) * 3 + 1
    z, mean, var = normalize_patches(x)
    torch.testing.assert_close(z * torch.sqrt(var + 1e-6) + mean, x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
