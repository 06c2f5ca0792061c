"""The frozen-encoder probe: majority labels against a slow loop, balanced accuracy against a loop, and the
probe itself on a planted separable feature (near perfect) and on shuffled classes (near chance)."""

import itertools

import pytest
import torch

from medhpm.evaluate.probe import balanced_accuracy, fit_linear_probe, patch_majority_labels


def test_patch_majority_labels_against_a_loop():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 1, 8, 8, 4), generator=g)
    label[0, 0, :4, :4, :4] = 3  # one patch all organ 3
    out = patch_majority_labels(label, 4)
    assert out.shape == (2, 4)  # grid (2, 2, 1)
    for b, (ih, iw, idd) in itertools.product(range(2), itertools.product(range(2), range(2), range(1))):
        block = label[b, 0, ih * 4:(ih + 1) * 4, iw * 4:(iw + 1) * 4, idd * 4:(idd + 1) * 4].flatten().tolist()
        best = max(range(4), key=lambda c: (block.count(c), -c))  # most frequent, ties to the smaller
        assert out[b, (ih * 2 + iw) * 1 + idd] == best  # token (ih*Gw + iw)*Gd + id
    assert out[0, 0] == 3


def test_balanced_accuracy_against_a_loop():
    true = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2, 0, 0])
    recalls = []
    for c in sorted(set(true.tolist())):
        idx = [i for i, t in enumerate(true.tolist()) if t == c]
        recalls.append(sum(pred[i] == c for i in idx) / len(idx))
    assert balanced_accuracy(pred, true) == pytest.approx(float(sum(recalls) / len(recalls)))
    assert balanced_accuracy(true, true) == 1.0


def test_probe_finds_a_planted_feature_and_not_shuffled_classes():
    g = torch.Generator().manual_seed(1)
    n, d, c = 1200, 16, 4
    # unbalanced classes, as patches are: most of them background
    y = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), n, replacement=True, generator=g)
    x = torch.randn(n, d, generator=g)
    x[:, :c] += 4.0 * F_onehot(y, c)  # the class written into 4 of the 16 features (Bayes accuracy ~0.99)
    train, test = slice(0, 800), slice(800, None)
    probe = fit_linear_probe(x[train], y[train], c)
    assert balanced_accuracy(probe.predict(x[test]), y[test]) > 0.95
    shuffled = y[train][torch.randperm(800, generator=g)]
    probe = fit_linear_probe(x[train], shuffled, c)
    assert abs(balanced_accuracy(probe.predict(x[test]), y[test]) - 1 / c) < 0.1
    with pytest.raises(ValueError, match="classes"):
        fit_linear_probe(x[:5], torch.tensor([0, 1, 2, 3, 9]), c)


def F_onehot(y, c):
    return torch.nn.functional.one_hot(y, c).float()


def test_volume_tokens_tile_the_volume_with_roi_windows():
    from medhpm.evaluate.probe import volume_tokens
    from medhpm.models import ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(img_size=(16, 16, 8), patch_size=8, embed_dim=24, depth=1, num_heads=2).eval()
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 30, 16, 8, generator=g)  # 30 voxels: two windows along x, the second padded
    label = torch.randint(0, 3, (1, 30, 16, 8), generator=g)
    feats, classes = volume_tokens(enc, image, label, (16, 16, 8), 8)
    assert feats.shape == (2 * 4, 24) and classes.shape == (8,)
    with torch.no_grad():
        first, _ = enc(image[:, :16][None])
    torch.testing.assert_close(feats[:4], first[0])
    padded = torch.cat([image[:, 16:], image.min().expand(1, 2, 16, 8)], dim=1)
    with torch.no_grad():
        second, _ = enc(padded[None])
    torch.testing.assert_close(feats[4:], second[0])
    torch.testing.assert_close(classes[:4], patch_majority_labels(label[:, :16][None], 8)[0])
