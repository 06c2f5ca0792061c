"""The frozen-encoder probe: majority labels against a slow loop, balanced accuracy against a loop, and the
probe itself on a planted separable feature (near perfect) and on shuffled classes (near chance); the
case-wise cross-validation (folds never split a case, the chosen strength is the argmax of its curve, the
curve against a loop of fits, a planted case-identity feature stays at chance), the kNN probe against a
slow loop, and a planted class feature ranked above the noise floor of random encoders."""

import itertools
import math
import statistics

import pytest
import torch

from medhpm.evaluate.token_probes import (
    CV_TOLERANCE,
    DEFAULT_K,
    DEFAULT_STRENGTH,
    balanced_accuracy,
    case_folds,
    cv_knn_probe,
    cv_linear_probe,
    fit_knn_probe,
    fit_linear_probe,
    noise_floor,
    patch_majority_labels,
    probe_tokens,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny fits: one thread is several times faster than two (and does not fight a parallel test run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_patch_majority_labels_against_a_loop():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 1, 8, 8, 4), generator=g)
    label[0, 0, :4, :4, :4] = 3  # one patch all organ 3
    out = patch_majority_labels(label, 4)
    assert out.shape == (2, 4)  # grid (2, 2, 1)
    for b, (ih, iw, idd) in itertools.product(range(2), itertools.product(range(2), range(2), range(1))):
        block = label[b, 0, ih * 4 : (ih + 1) * 4, iw * 4 : (iw + 1) * 4, idd * 4 : (idd + 1) * 4].flatten().tolist()
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
    from medhpm.evaluate.token_probes import volume_tokens
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


# ----------------------------------------------------------------------------------------------------------
# case-wise cross-validation


def test_case_folds_hold_out_whole_cases():
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 7, (300,), generator=g)  # 7 cases, tokens interleaved
    groups[:7] = torch.arange(7)  # every case present
    masks = case_folds(groups, folds=5, seed=0)
    assert len(masks) == 5
    assert torch.equal(torch.stack(masks).sum(0), torch.ones(300, dtype=torch.long))  # each token held out once
    for m in masks:
        assert m.any() and not set(groups[m].tolist()) & set(groups[~m].tolist())  # no case on both sides
    assert all(torch.equal(a, b) for a, b in zip(masks, case_folds(groups, folds=5, seed=0)))  # seeded
    # fewer cases than folds: leave-one-case-out; one case: nothing to hold out
    loco = case_folds(groups % 3, folds=5, seed=1)
    assert sorted(tuple(set((groups % 3)[m].tolist())) for m in loco) == [(0,), (1,), (2,)]
    assert case_folds(torch.zeros(10, dtype=torch.long)) == []


def _cases_with_planted_class(seed, cases=6, per=40, d=8, c=4, signal=2.0):
    """Tokens of ``cases`` cases, the class written (plus noise) into the first ``c`` features; most are background."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(cases).repeat_interleave(per)
    y = torch.multinomial(torch.tensor([0.55, 0.15, 0.15, 0.15]), cases * per, replacement=True, generator=g)
    x = torch.randn(cases * per, d, generator=g)
    x[:, :c] += signal * F_onehot(y, c)
    return x, y, groups


def test_cv_linear_probe_curve_against_a_loop_of_fits_and_its_argmax():
    x, y, groups = _cases_with_planted_class(4, signal=1.0)
    strengths = (10.0, 1e-3, 0.1)  # unsorted on purpose
    probe, rec = cv_linear_probe(x, y, groups, 5, strengths=strengths, folds=4, steps=50, seed=2)
    cv = rec["cv"]
    assert cv["weight_decay"] == [1e-3, 0.1, 10.0] and cv["folds"] == 4 and len(cv["fold_groups"]) == 4
    assert sorted(g for fold in cv["fold_groups"] for g in fold) == list(range(6))  # every case held out once
    # the curve, recomputed by a plain loop over the reported folds and strengths
    for j, wd in enumerate(cv["weight_decay"]):
        scores = []
        for fold in cv["fold_groups"]:
            held = torch.tensor([int(g) in fold for g in groups])
            fit = fit_linear_probe(x[~held], y[~held], 5, steps=50, weight_decay=wd, seed=2, tolerance=CV_TOLERANCE)
            scores.append(balanced_accuracy(fit.predict(x[held]), y[held]))
        assert cv["fold_balanced_accuracy"][j] == pytest.approx(scores, abs=1e-6)
        assert cv["balanced_accuracy"][j] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    # the chosen strength is the argmax of the reported curve (ties: the stronger penalty)
    curve = cv["balanced_accuracy"]
    best = max(i for i, v in enumerate(curve) if v == max(curve))
    assert rec["weight_decay"] == cv["weight_decay"][best] and "cross-validation" in rec["chosen_by"]
    assert len(set(curve)) > 1  # the grid matters here: 10 is too strong to see the weak feature
    # then refitted on every token with it
    refit = fit_linear_probe(x, y, 5, steps=50, weight_decay=rec["weight_decay"], seed=2, tolerance=CV_TOLERANCE)
    torch.testing.assert_close(probe.weight, refit.weight)
    assert rec["train_balanced_accuracy"] == pytest.approx(balanced_accuracy(refit.predict(x), y))
    assert not (probe.predict(torch.randn(200, 8) * 3) == 4).any()  # class 4 never seen: never predicted


def test_a_single_training_case_falls_back_to_fixed_defaults():
    x, y, _ = _cases_with_planted_class(5, cases=1, per=80)
    groups = torch.zeros(80, dtype=torch.long)
    _, lin = cv_linear_probe(x, y, groups, 4, steps=30)
    _, knn = cv_knn_probe(x, y, groups, 4)
    assert lin["weight_decay"] == DEFAULT_STRENGTH and lin["cv"] is None and "single training case" in lin["chosen_by"]
    assert knn["k"] == DEFAULT_K and knn["cv"] is None and "single training case" in knn["chosen_by"]


def test_case_wise_cv_does_not_see_a_planted_case_identity():
    """Every case has its own random centre and all its tokens one class (balanced over the cases): the
    feature identifies the CASE, and through it the class of tokens of a case seen before, but carries
    nothing about the class of an unseen case. Folds over tokens leak it; folds over cases must not."""
    g = torch.Generator().manual_seed(0)
    cases, per, d, c = 80, 8, 48, 4
    case_class = (torch.arange(cases) % c)[torch.randperm(cases, generator=g)]
    groups = torch.arange(cases).repeat_interleave(per)
    x = torch.randn(cases, d, generator=g)[groups] + 0.3 * torch.randn(cases * per, d, generator=g)
    y = case_class[groups]
    strengths = (1e-3, 1e-1, 10.0)
    by_token = torch.arange(cases * per)  # each token its own "case": tokens of one case on both sides
    _, leaky = cv_linear_probe(x, y, by_token, c, strengths=strengths, steps=50)
    _, leaky_knn = cv_knn_probe(x, y, by_token, c)
    assert max(leaky["cv"]["balanced_accuracy"]) > 0.7 and max(leaky_knn["cv"]["balanced_accuracy"]) > 0.95
    _, lin = cv_linear_probe(x, y, groups, c, strengths=strengths, steps=50)
    _, knn = cv_knn_probe(x, y, groups, c)
    for rec, key in ((lin, "weight_decay"), (knn, "k")):
        chosen = rec["cv"]["balanced_accuracy"][rec["cv"][key].index(rec[key])]
        assert abs(chosen - 1 / c) < 0.15, rec["cv"]  # near chance 0.25, although it is the best of the grid
        held = [set(f) for f in rec["cv"]["fold_groups"]]
        assert all(not a & b for a, b in itertools.combinations(held, 2)) and set().union(*held) == set(range(cases))


# ----------------------------------------------------------------------------------------------------------
# k nearest neighbours


def _knn_loop(x_fit, y_fit, x_query, k, metric, num_classes):
    """The class-balanced kNN by hand: standardise with the fit tokens' mean and (population) std, then for
    every query sort all fit tokens by distance and let the k nearest vote with 1 / their class's count."""
    n, d = x_fit.shape
    mean = [sum(float(x_fit[i, j]) for i in range(n)) / n for j in range(d)]
    std = [max(math.sqrt(sum((float(x_fit[i, j]) - mean[j]) ** 2 for i in range(n)) / n), 1e-6) for j in range(d)]

    def z(v):
        return [(float(v[j]) - mean[j]) / std[j] for j in range(d)]

    bank = [z(x_fit[i]) for i in range(n)]
    counts = [y_fit.tolist().count(c) for c in range(num_classes)]
    out = []
    for q in x_query:
        q = z(q)
        dist = []
        for i, b in enumerate(bank):
            if metric == "cosine":
                dot = sum(u * v for u, v in zip(q, b))
                dist.append((1 - dot / (math.sqrt(sum(u * u for u in q)) * math.sqrt(sum(v * v for v in b))), i))
            else:
                dist.append((sum((u - v) ** 2 for u, v in zip(q, b)), i))
        votes = [0.0] * num_classes
        for _, i in sorted(dist)[:k]:
            votes[int(y_fit[i])] += 1.0 / counts[int(y_fit[i])]
        out.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_against_a_slow_loop(metric):
    g = torch.Generator().manual_seed(7)
    # class counts 11, 13, 17, 19 (and class 4 absent): primes above k, so no two classes' votes can tie
    y = torch.cat([torch.full((n,), c) for c, n in enumerate((11, 13, 17, 19))])
    y = y[torch.randperm(len(y), generator=g)]
    x = torch.randn(len(y), 5, generator=g) + 0.8 * F_onehot(y, 5) * torch.tensor([3.0, 2, 1, 1, 1])
    x = x * torch.tensor([1.0, 10, 0.1, 1, 5])  # standardisation matters
    q = torch.randn(30, 5, generator=g) * torch.tensor([1.0, 10, 0.1, 1, 5])
    for k in (1, 3, 7):
        probe = fit_knn_probe(x, y, 5, k=k, metric=metric)
        assert torch.equal(probe.predict(q), _knn_loop(x, y, q, k, metric, 5)), k
    # batched over queries: the same with a tiny chunk
    import medhpm.evaluate.token_probes as P

    old, P._CHUNK_ELEMENTS = P._CHUNK_ELEMENTS, 3 * len(y)
    try:
        assert torch.equal(fit_knn_probe(x, y, 5, k=7, metric=metric).predict(q), _knn_loop(x, y, q, 7, metric, 5))
    finally:
        P._CHUNK_ELEMENTS = old
    # the case-wise CV curve of k (one neighbour search per fold for the largest k) against the loop
    groups = torch.arange(len(y)) % 4
    _, rec = cv_knn_probe(x, y, groups, 5, ks=(7, 1, 3), folds=4, metric=metric, seed=1)
    assert rec["cv"]["k"] == [1, 3, 7]
    for j, k in enumerate(rec["cv"]["k"]):
        scores = []
        for fold in rec["cv"]["fold_groups"]:
            held = torch.tensor([int(gr) in fold for gr in groups])
            scores.append(balanced_accuracy(_knn_loop(x[~held], y[~held], x[held], k, metric, 5), y[held]))
        assert rec["cv"]["fold_balanced_accuracy"][j] == pytest.approx(scores)
    curve = rec["cv"]["balanced_accuracy"]
    assert rec["k"] == rec["cv"]["k"][max(i for i, v in enumerate(curve) if v == max(curve))]


# ----------------------------------------------------------------------------------------------------------
# a planted feature against the noise floor of random encoders


def test_a_planted_class_feature_ranks_above_the_noise_floor_of_random_encoders():
    """A "good encoder" writes the class (plus noise) into its features; a "random encoder" gives features of
    the same size, independent of the class. Both probes must put the good one above every random one and
    above their mean by more than three of their standard deviations."""
    x, y, groups = _cases_with_planted_class(11, cases=10, per=48, d=16, signal=1.5)
    train, test = groups < 7, groups >= 7

    def random_encoder(seed):  # its "tokens" of the same cases: same shape, nothing about the class
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + seed))

    def probe(feats):
        return probe_tokens(
            feats[train],
            y[train],
            groups[train],
            feats[test],
            y[test],
            4,
            strengths=(1e-3, 0.1, 10.0),
            ks=(5, 20),
            folds=3,
            steps=50,
        )

    seeds = [0, 1, 2, 3, 4]
    floor = noise_floor(random_encoder, seeds, probe)
    good = probe(x)
    assert floor["seeds"] == seeds and set(floor["summary"]) == {"linear_fixed", "linear_cv", "knn"}
    for name in ("linear_cv", "knn"):
        s = floor["summary"][name]
        vals = [floor["per_seed"][sd][name]["balanced_accuracy"] for sd in seeds]
        assert s["values"] == vals and s["n"] == 5 and s["max"] == max(vals) and s["min"] == min(vals)
        assert s["mean"] == pytest.approx(statistics.mean(vals)) and s["std"] == pytest.approx(statistics.stdev(vals))
        assert abs(s["mean"] - good["chance"]) < 0.1  # random encoders: near chance
        assert good[name]["balanced_accuracy"] > s["max"], (name, s)
        assert good[name]["balanced_accuracy"] - s["mean"] > 3 * s["std"], (name, s)
    with pytest.raises(ValueError, match="distinct"):
        noise_floor(random_encoder, [1, 1], probe)
