"""Mining diagnostics against plain, slow references written here."""

import itertools

import numpy as np
import pytest
import torch

from medhpm.pretrain.diagnostics import organ_shares, pairwise_order_accuracy, patches_with_organ


def slow_order_accuracy(scores, target):
    right = valid = 0
    for s, t in zip(scores.tolist(), target.tolist()):
        for i, j in itertools.combinations(range(len(s)), 2):
            if s[i] == s[j] or t[i] == t[j]:
                continue
            valid += 1
            right += (s[i] > s[j]) == (t[i] > t[j])
    return right / valid if valid else float("nan")


def test_order_accuracy_against_a_double_loop():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 40, generator=g)
    noisy = target + 0.3 * torch.rand(3, 40, generator=g)
    tied = torch.round(noisy * 4) / 4  # many ties in the scores, which are left out
    target_tied = torch.round(target * 5) / 5
    for s, t in ((noisy, target), (tied, target), (noisy, target_tied), (tied, target_tied)):
        assert pairwise_order_accuracy(s, t) == pytest.approx(slow_order_accuracy(s, t), abs=1e-12)
    assert pairwise_order_accuracy(target, target) == 1.0
    assert pairwise_order_accuracy(-target, target) == 0.0
    assert np.isnan(pairwise_order_accuracy(torch.ones(2, 5), target[:2, :5]))
    chance = pairwise_order_accuracy(torch.rand(8, 200, generator=g), torch.rand(8, 200, generator=g))
    assert abs(chance - 0.5) < 0.05  # pairs share patches, so the spread is wider than 1/sqrt(pairs)
    with pytest.raises(ValueError, match="both be"):
        pairwise_order_accuracy(target, target[:, :5])


def test_organ_shares_against_a_slow_reference_on_a_planted_mask():
    p = 4
    label = torch.zeros(2, 1, 16, 12, 8)
    label[0, 0, 5, 2, 7] = 3  # one voxel: patch (1, 0, 1)
    label[0, 0, 12:16, 8:12, 0:4] = 1  # a whole patch: (3, 2, 0)
    label[1, 0, 0:6, 0:1, 0:1] = 2  # a bar across patches (0, 0, 0) and (1, 0, 0)
    grid = (4, 3, 2)
    has = patches_with_organ(label, p)
    assert has.shape == (2, 24)
    ref = torch.zeros(2, 24, dtype=torch.bool)
    for b in range(2):
        for ih, iw, idd in itertools.product(range(4), range(3), range(2)):
            block = label[b, 0, ih * p : (ih + 1) * p, iw * p : (iw + 1) * p, idd * p : (idd + 1) * p]
            ref[b, (ih * grid[1] + iw) * grid[2] + idd] = bool((block > 0).any())
    assert torch.equal(has, ref)
    assert int(has.sum()) == 4
    g = torch.Generator().manual_seed(3)
    masked = torch.rand(2, 24, generator=g) < 0.75
    hard = masked & (torch.rand(2, 24, generator=g) < 0.4)
    hard[0, 7] = hard[0, 22] = masked[0, 7] = masked[0, 22] = True  # organ patches mined
    out = organ_shares(has, hard, masked)
    rand = masked & ~hard
    assert out["organ_share_hard"] == pytest.approx(float(ref[hard].float().mean()))
    assert out["organ_share_random"] == pytest.approx(float(ref[rand].float().mean()) if rand.any() else 0.0)
    assert "organ_share_hard" not in organ_shares(has, torch.zeros_like(hard), masked)


def _spearman_numpy(a, b):
    """Plain reference: average ranks by counting, then the Pearson correlation of the ranks."""

    def avg_ranks(v):
        v = np.asarray(v, dtype=float)
        return np.array([(v < x).sum() + ((v == x).sum() + 1) / 2.0 for x in v])

    ra, rb = avg_ranks(a), avg_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def test_rank_correlation_against_a_plain_numpy_spearman():
    from medhpm.pretrain.diagnostics import rank_correlation

    g = np.random.default_rng(0)
    truth = g.normal(size=(3, 40))
    planted = truth + g.normal(scale=0.7, size=truth.shape)  # scores that partly know the truth
    planted[1, :10] = planted[1, 0]  # ties in the scores
    want = np.mean([_spearman_numpy(planted[i], truth[i]) for i in range(3)])
    got = rank_correlation(torch.tensor(planted), torch.tensor(truth))
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.3 < got < 0.95
    assert rank_correlation(torch.tensor(truth), torch.tensor(truth)) == pytest.approx(1.0)
    assert rank_correlation(torch.tensor(-truth), torch.tensor(truth)) == pytest.approx(-1.0)
    # a constant sample says nothing and is left out; all constant is NaN
    flat = torch.tensor(planted).clone()
    flat[0] = 1.0
    assert rank_correlation(flat, torch.tensor(truth)) == pytest.approx(
        np.mean([_spearman_numpy(planted[i], truth[i]) for i in (1, 2)]), abs=1e-12
    )
    assert np.isnan(rank_correlation(torch.ones(2, 5), torch.rand(2, 5)))


def test_position_baseline_is_the_mean_at_each_position_over_the_other_crops():
    from medhpm.pretrain.diagnostics import position_baseline

    g = torch.Generator().manual_seed(0)
    n_tok, b, m = 12, 4, 7
    ids = torch.stack([torch.sort(torch.randperm(n_tok, generator=g)[:m]).values for _ in range(b)])
    truth = torch.rand(b, m, generator=g, dtype=torch.float64)
    got = position_baseline(ids, truth, n_tok)
    for i in range(b):
        for j in range(m):
            others = [float(truth[k, jj]) for k in range(b) if k != i for jj in range(m) if ids[k, jj] == ids[i, j]]
            if others:
                want = sum(others) / len(others)
            else:  # no other crop masked this position: the other crops' overall mean
                want = float(truth[[k for k in range(b) if k != i]].mean())
            assert float(got[i, j]) == pytest.approx(want, rel=1e-9)
    # losses that depend on position only are ranked perfectly by it
    pos_loss = torch.rand(n_tok, generator=g)
    from medhpm.pretrain.diagnostics import rank_correlation

    full = torch.arange(n_tok).expand(b, n_tok)
    assert rank_correlation(position_baseline(full, pos_loss[full], n_tok), pos_loss[full]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 crops"):
        position_baseline(ids[:1], truth[:1], n_tok)
