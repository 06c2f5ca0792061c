"""Random and hard-patch masks, and the easy-to-hard curriculum."""

import pytest
import torch

from medhpm.pretrain import curriculum_alpha, hard_patch_mask, num_masked, num_visible, random_mask


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_counts():
    assert num_visible(216, 0.75) == 54 and num_masked(216, 0.75) == 162
    assert num_visible(10, 0.9) == 1  # 10 * (1 - 0.9) is 0.99999... in floating point
    with pytest.raises(ValueError, match="visible"):
        num_visible(4, 0.9)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            num_visible(216, bad)


def test_random_mask_counts_and_determinism():
    m = random_mask(5, 216, 0.75, generator=gen(0))
    assert m.dtype == torch.bool and m.shape == (5, 216)
    assert (m.sum(1) == 162).all()
    assert torch.equal(m, random_mask(5, 216, 0.75, generator=gen(0)))
    assert not torch.equal(m, random_mask(5, 216, 0.75, generator=gen(1)))


def reference_hard(scores, n_hard):
    """Slow reference: the n_hard highest scores of each row (scores are distinct)."""
    return [set(sorted(range(len(row)), key=lambda i: -row[i])[:n_hard]) for row in scores.tolist()]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_hard_mask_properties(alpha):
    b, n, ratio = 8, 64, 0.75
    scores = torch.randn(b, n, generator=gen(2))
    before = scores.clone()
    mask = hard_patch_mask(scores, ratio, alpha, generator=gen(3))
    assert torch.equal(scores, before)  # not modified
    m = num_masked(n, ratio)
    assert mask.shape == (b, n) and (mask.sum(1) == m).all()
    n_hard = int(alpha * m)
    for row, hard in zip(mask, reference_hard(scores, n_hard), strict=True):
        masked = set(row.nonzero().flatten().tolist())
        assert hard <= masked  # hard patches always masked, so visible ones come from the rest
    if alpha == 1.0:  # every masked patch is a hard one: the top-M, no randomness
        assert torch.equal(mask, hard_patch_mask(scores, ratio, alpha, generator=gen(99)))
    assert torch.equal(mask, hard_patch_mask(scores, ratio, alpha, generator=gen(3)))


def test_hard_mask_uniform_when_alpha_zero():
    b, n = 4000, 16
    scores = torch.arange(n, dtype=torch.float32).expand(b, n)  # strongly ordered, must be ignored
    mask = hard_patch_mask(scores, 0.5, 0.0, generator=gen(4))
    freq = mask.sum(0).float()  # each position masked b * 8/16 times in expectation
    expected = b * 0.5
    chi2 = ((freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 37.7  # 99.9% quantile of chi-square with 15 degrees of freedom


def test_hard_mask_random_part_uniform_over_the_rest():
    b, n, ratio, alpha = 4000, 16, 0.5, 0.5  # M = 8, n_hard = 4: hard = tokens 12..15
    scores = torch.arange(n, dtype=torch.float32).expand(b, n)
    mask = hard_patch_mask(scores, ratio, alpha, generator=gen(5))
    assert mask[:, 12:].all()
    freq = mask[:, :12].sum(0).float()  # 4 of the other 12 per row
    expected = b * 4 / 12
    chi2 = ((freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 31.3  # 99.9% quantile, 11 degrees of freedom


def test_hard_mask_validation():
    s = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="alpha"):
        hard_patch_mask(s, 0.75, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        hard_patch_mask(s, 0.75, -0.1)
    with pytest.raises(ValueError, match="mask_ratio"):
        hard_patch_mask(s, 1.0, 0.5)
    with pytest.raises(ValueError, match="scores"):
        hard_patch_mask(torch.zeros(16), 0.75, 0.5)


def test_curriculum_alpha_by_hand():
    # HPM's (t + 1) / T: T = 10, alpha 0 -> 0.5
    assert curriculum_alpha(0, 10, 0.0, 0.5) == pytest.approx(0.05)
    assert curriculum_alpha(4, 10, 0.0, 0.5) == pytest.approx(0.25)
    assert curriculum_alpha(9, 10, 0.0, 0.5) == pytest.approx(0.5)
    assert curriculum_alpha(25, 10, 0.0, 0.5) == pytest.approx(0.5)  # resumed past T
    assert curriculum_alpha(1, 4, 0.2, 0.6) == pytest.approx(0.2 + 0.5 * 0.4)
    assert curriculum_alpha(0, 1, 0.3, 0.3) == pytest.approx(0.3)
    assert curriculum_alpha(2, 4, 0.8, 0.2) == pytest.approx(0.8 - 0.75 * 0.6)  # decreasing also works
    with pytest.raises(ValueError, match="total_epochs"):
        curriculum_alpha(0, 0, 0.0, 0.5)
    with pytest.raises(ValueError, match="alpha_T"):
        curriculum_alpha(0, 10, 0.0, 1.5)
