"""data.cache=device (medhpm.data.device_sampler) against the MONAI chain it follows, on small phantoms.

Statistical comparisons use fixed seeds on both sides, so they are deterministic; their thresholds (a
p-value of 1e-4, 5 standard errors) fail only for a real difference in distribution. The MONAI side runs
the chain's random tail on the cached head output, exactly as a CacheDataset does."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandGaussianNoised, apply_transform
from scipy import stats

from medhpm.config import ConfigError, DataConfig, load_config
from medhpm.data.dataset import make_dataset, training_loader
from medhpm.data.transforms import deterministic_head, flat_transforms
from medhpm.data.device_sampler import DeviceCropSampler, DeviceSamplerError
from medhpm.data.transforms import pretrain_transforms, train_transforms
from medhpm.runtime.distributed import DistInfo
from medhpm.runtime.loop import Trainer

NC = 14  # the phantoms' BTCV labels


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    from medhpm.data.phantom import write_phantom_dataset

    js = write_phantom_dataset(tmp_path_factory.mktemp("ph"), cases=2, seed=0, size=(48, 48, 32))
    meta = json.loads(Path(js).read_text())
    root = Path(js).parent
    return [
        {k: str(root / v) for k, v in e.items()} for s in ("training", "validation", "test") for e in meta.get(s, [])
    ]


def cfg_with(**kw) -> DataConfig:
    base = dict(
        spacing=(4.0, 4.0, 4.0),
        roi=(16, 16, 16),
        num_samples=8,
        flip_prob=0.0,
        rot90_prob=0.0,
        intensity_scale_prob=0.0,
        intensity_shift_prob=0.0,
    )
    base.update(kw)
    return DataConfig(**base)


def chain(cfg: DataConfig, kind: str = "train"):
    return train_transforms(cfg, NC) if kind == "train" else pretrain_transforms(cfg, labelled=False)


def heads(transform, entries) -> list[dict]:
    """The preprocessed volumes, by MONAI's own head transforms."""
    out = []
    for e in entries:
        item = dict(e)
        for t in deterministic_head(transform):
            item = apply_transform(t, item)
        out.append(item)
    return out


def monai_crops(transform, pre: dict, calls: int, seed: int, crop_only: bool = False) -> list[dict]:
    """``calls * num_samples`` crops of one preprocessed item by the chain's own random tail (``crop_only``:
    its crop transform alone, for a chain whose other random transforms have probability 0)."""
    tail = flat_transforms(transform)[len(deterministic_head(transform)) :]
    tail = Compose(tail[:1] if crop_only else tail)
    tail.set_random_state(seed)
    out = []
    for _ in range(calls):
        out += tail(dict(pre))
    return out


def monai_info(crop: dict) -> dict:
    """Start, flips and rotation of a MONAI crop, from its MetaTensor's applied operations."""
    info = {"flips": [], "k": 0}
    for op in crop["image"].applied_operations:
        name, extra = op["class"], op.get("extra_info", {})
        if name in ("RandCropByPosNegLabel", "RandCropByLabelClasses", "RandSpatialCrop"):
            info["start"] = extra["extra_info"]["cropped"][0::2]
        elif name == "RandSpatialCropSamples":
            info["start"] = (
                extra["extra_info"]["extra_info"]["cropped"][0::2]
                if "extra_info" in extra.get("extra_info", {})
                else extra["extra_info"]["cropped"][0::2]
            )
        elif name == "RandFlipd":
            info["flips"].append(bool(op["do_transforms"]))
        elif name == "RandRotate90d":
            info["k"] = int(extra["extra_info"]["k"]) if op["do_transforms"] else 0
    assert "start" in info, [op["class"] for op in crop["image"].applied_operations]
    return info


def device_crops(sampler: DeviceCropSampler, volume: int, n: int) -> dict:
    out = sampler.draw(torch.full((n // sampler.num_samples,), volume, dtype=torch.int64), details=True)
    return out


def same_distribution(a, b, what: str) -> None:
    """Two-sample chi-square on the counts of integer values (sparse values pooled into one bin)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    values = np.union1d(a, b)
    ca = np.array([(a == v).sum() for v in values])
    cb = np.array([(b == v).sum() for v in values])
    keep = (ca + cb) >= 10
    table = np.stack([np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        assert np.array_equal(np.unique(a), np.unique(b)), what
        return
    p = stats.chi2_contingency(table)[1]
    assert p > 1e-4, f"{what}: p={p:.2e}\n{table}"


# ------------------------------------------------------------------ crop centres against the MONAI chain
@pytest.mark.parametrize("crop,extra", [("random", {}), ("label", {"pos": 1.0, "neg": 3.0}), ("classes", {})])
def test_crop_starts_and_class_mix_match_the_monai_chain(entries, crop, extra):
    cfg = cfg_with(crop=crop, **extra)
    t = chain(cfg)
    pre = heads(t, entries)
    s = DeviceCropSampler(entries, t, batch_size=cfg.num_samples, seed=1)
    for v in range(len(entries)):
        ref = monai_crops(t, pre[v], calls=60, seed=10 + v, crop_only=True)
        ours = device_crops(s, v, 4000)
        ms = np.array([monai_info(c)["start"] for c in ref])
        ds = ours["details"]["start"].numpy()
        for ax in range(3):
            same_distribution(ms[:, ax], ds[:, ax], f"{crop}: crop start on axis {ax}, volume {v}")
        if crop != "random":
            # the class at the crop's middle voxel (the centre as moved inside the volume)
            r = cfg.roi[0] // 2
            same_distribution(
                [int(c["label"][0, r, r, r]) for c in ref],
                ours["label"][:, 0, r, r, r].numpy(),
                f"{crop}: class at the crop middle, volume {v}",
            )


def test_pos_neg_and_class_centres_follow_the_configured_odds(entries):
    # pos:neg 1:3 -> a quarter of the drawn centres on the label; background centres inside the body
    cfg = cfg_with(crop="label", pos=1.0, neg=3.0)
    t = chain(cfg)
    pre = heads(t, entries)
    s = DeviceCropSampler(entries, t, batch_size=cfg.num_samples, seed=2)
    n = 4000
    for v in range(len(entries)):
        lab = torch.as_tensor(pre[v]["label"])[0]
        img = torch.as_tensor(pre[v]["image"])[0]
        c = device_crops(s, v, n)["details"]["centre"]
        on = lab[c[:, 0], c[:, 1], c[:, 2]] > 0
        frac = float(on.float().mean())
        assert abs(frac - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n), frac
        assert bool((img[c[:, 0], c[:, 1], c[:, 2]][~on] > cfg.b_min).all()), "a background centre in the air"
    # classes: every class present inside the body with equal odds, absent ones never
    cfg = cfg_with(crop="classes")
    t = chain(cfg)
    pre = heads(t, entries)
    s = DeviceCropSampler(entries, t, batch_size=cfg.num_samples, seed=3)
    for v in range(len(entries)):
        lab = torch.as_tensor(pre[v]["label"])[0].long()
        img = torch.as_tensor(pre[v]["image"])[0]
        present = sorted({int(x) for x in torch.unique(lab[img > cfg.b_min])})
        c = device_crops(s, v, n)["details"]["centre"]
        drawn = lab[c[:, 0], c[:, 1], c[:, 2]].numpy()
        assert set(drawn.tolist()) == set(present)
        counts = np.array([(drawn == k).sum() for k in present])
        p = stats.chisquare(counts).pvalue
        assert p > 1e-4, (present, counts)


def test_centres_near_the_border_are_moved_inside_as_monai_does(tmp_path, nifti_writer, synthetic_ct):
    # three labelled voxels, one deep inside, two at the body's border: with pos=1 every crop is centred
    # on one of them, so MONAI's and our sets of crop starts must be the same three starts
    img, _ = synthetic_ct((40, 40, 24), seed=0)
    lab = np.zeros_like(img, dtype=np.uint8)
    body = np.argwhere(img > -500)
    lo, hi = body.min(0), body.max(0)
    for p in ((20, 20, 12), tuple(lo + [2, 20 - lo[1], 1]), tuple(hi - [1, 20 - (40 - hi[1]), 0])):
        lab[p] = 1
    e = [
        {
            "image": str(nifti_writer(tmp_path / "i.nii.gz", img, (4.0, 4.0, 4.0))),
            "label": str(nifti_writer(tmp_path / "l.nii.gz", lab, (4.0, 4.0, 4.0))),
        }
    ]
    cfg = cfg_with(crop="label", pos=1.0, neg=0.0, roi=(16, 16, 8))
    t = chain(cfg)
    pre = heads(t, e)[0]
    shape = np.array(pre["label"].shape[1:])
    voxels = np.argwhere(np.asarray(pre["label"][0]) > 0)
    assert len(voxels) == 3
    roi = np.array(cfg.roi)
    expected = {tuple(np.clip(c - roi // 2, 0, shape - roi).tolist()) for c in voxels}  # plain reference
    assert len(expected) == 3 and any(0 in s_ or any(np.array(s_) == shape - roi) for s_ in expected)
    theirs = {tuple(monai_info(c)["start"]) for c in monai_crops(t, pre, calls=10, seed=0, crop_only=True)}
    s = DeviceCropSampler(e, t, batch_size=8, seed=0)
    ours = {tuple(x) for x in device_crops(s, 0, 200)["details"]["start"].tolist()}
    assert theirs == expected and ours == expected, (theirs, ours, expected)


# ------------------------------------------------------------------ flips, rotations, intensities
def test_flip_and_rot90_rates_match_the_monai_chain(entries):
    cfg = cfg_with(crop="random", flip_prob=0.3, rot90_prob=0.4)
    t = chain(cfg)
    pre = heads(t, entries)
    s = DeviceCropSampler(entries, t, batch_size=cfg.num_samples, seed=4)
    ref = [monai_info(c) for c in monai_crops(t, pre[0], calls=60, seed=5)]
    n = 8000
    ops = device_crops(s, 0, n)["details"]["ops"]
    flips = [o for o in ops if o[0]["op"] == "flip"]
    assert [o[0]["axis"] for o in flips] == [0, 1, 2]
    for ax in range(3):
        ours = flips[ax][1].numpy()
        theirs = np.array([r["flips"][ax] for r in ref], dtype=np.int64)
        for rate, m in ((ours.mean(), n), (theirs.mean(), len(ref))):
            assert abs(rate - 0.3) < 5 * np.sqrt(0.3 * 0.7 / m), (ax, rate)
        same_distribution(theirs, ours, f"flip on axis {ax}")
    k_ours = [o for o in ops if o[0]["op"] == "rot90"][0][1].numpy()
    k_theirs = np.array([r["k"] for r in ref])
    assert abs((k_ours > 0).mean() - 0.4) < 5 * np.sqrt(0.24 / n)
    for k in (1, 2, 3):  # k uniform in 1..3 among the rotated crops
        assert abs((k_ours == k).sum() / (k_ours > 0).sum() - 1 / 3) < 5 * np.sqrt(2 / 9 / (k_ours > 0).sum())
    same_distribution(k_theirs, k_ours, "rot90 k (0: not rotated)")
    assert set(k_ours.tolist()) == {0, 1, 2, 3}


def _fit(crop: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    x, y = ref.double().reshape(-1), crop.double().reshape(-1)
    a = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return a, float(y.mean() - a * x.mean())


def test_intensity_jitter_and_crop_statistics_match_the_monai_chain(entries):
    cfg = cfg_with(
        crop="label", intensity_scale_prob=0.5, intensity_shift_prob=0.5, intensity_scale=0.2, intensity_shift=0.1
    )
    t = chain(cfg)
    pre = heads(t, entries)
    s = DeviceCropSampler(entries, t, batch_size=cfg.num_samples, seed=6)
    img = torch.as_tensor(pre[0]["image"])[0]
    R = cfg.roi
    fits = {}
    means, stds = {}, {}
    ref = monai_crops(t, pre[0], calls=60, seed=7)
    ours = device_crops(s, 0, 60 * cfg.num_samples)
    for name, crops, starts in (
        ("monai", [c["image"][0] for c in ref], [monai_info(c)["start"] for c in ref]),
        ("device", list(ours["image"][:, 0]), ours["details"]["start"].tolist()),
    ):
        f = []
        for crop, (a, b, c) in zip(crops, starts):
            block = img[a : a + R[0], b : b + R[1], c : c + R[2]]
            f.append(_fit(torch.as_tensor(crop), block) if float(block.std()) > 1e-3 else (np.nan, np.nan))
        fits[name] = np.array(f)
        means[name] = np.array([float(torch.as_tensor(c).mean()) for c in crops])
        stds[name] = np.array([float(torch.as_tensor(c).std()) for c in crops])
    for name in fits:
        a, b = fits[name][:, 0], fits[name][:, 1]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        scaled = np.abs(a - 1) > 1e-4
        assert abs(scaled.mean() - 0.5) < 5 * np.sqrt(0.25 / len(a)), (name, scaled.mean())
        assert np.all(np.abs(a - 1) <= 0.2 + 1e-4)  # 1 + U(-0.2, 0.2)
        assert stats.kstest((a[scaled] - 0.8) / 0.4, "uniform").pvalue > 1e-4, name
    for j, what in ((0, "scale factor"), (1, "shift")):
        x, y = fits["monai"][:, j], fits["device"][:, j]
        assert stats.ks_2samp(x[np.isfinite(x)], y[np.isfinite(y)]).pvalue > 1e-4, what
    for what, d in (("mean", means), ("std", stds)):
        x, y = d["monai"], d["device"]
        se = np.sqrt(x.var() / len(x) + y.var() / len(y))
        assert abs(x.mean() - y.mean()) < 5 * se, (what, x.mean(), y.mean())


# ------------------------------------------------------------------ exact content, a plain reference
def _reference_crop(vol: torch.Tensor, start, roi, ops, i: int) -> torch.Tensor:
    a, b, c = start
    x = vol[a : a + roi[0], b : b + roi[1], c : c + roi[2]].clone()
    for op, value in ops:
        val = value[i].item()
        if op["op"] == "flip" and val:
            x = torch.flip(x, dims=(op["axis"],))
        elif op["op"] == "rot90" and val:
            x = torch.rot90(x, int(val), dims=(0, 1))
    return x


@pytest.mark.parametrize("roi", [(16, 16, 16), (24, 24, 64)])  # 64: larger than the volume, padded
def test_crops_are_the_preprocessed_sub_block_at_the_drawn_start(entries, roi):
    cfg = cfg_with(
        crop="label",
        roi=roi,
        num_samples=4,
        flip_prob=0.5,
        rot90_prob=0.5,
        intensity_scale_prob=0.5,
        intensity_shift_prob=0.5,
    )
    t = chain(cfg)
    pre = heads(t, entries)
    s = DeviceCropSampler(entries, t, batch_size=8, seed=8)
    out = s.draw(torch.tensor([0, 1, 1, 0]), details=True)
    d = out["details"]
    assert out["image"].shape == (16, 1, *roi) and out["label"].shape == (16, 1, *roi)
    for i in range(16):
        v = int(d["volume"][i])
        img, lab = torch.as_tensor(pre[v]["image"])[0], torch.as_tensor(pre[v]["label"])[0]
        assert all(s_ + r <= n for s_, r, n in zip(d["start"][i].tolist(), roi, img.shape))
        geo = [o for o in d["ops"] if o[0]["op"] in ("flip", "rot90")]
        ref_lab = _reference_crop(lab, d["start"][i].tolist(), roi, geo, i)
        ref_img = _reference_crop(img, d["start"][i].tolist(), roi, geo, i)
        for op, value in d["ops"]:
            if op["op"] == "scale":
                ref_img = ref_img * (1 + value[i].item())
            elif op["op"] == "shift":
                ref_img = ref_img + value[i].item()
        assert torch.equal(out["label"][i, 0], ref_lab.float()), i
        assert torch.allclose(out["image"][i, 0], ref_img.float(), atol=1e-6), i
    if roi[2] == 64:
        assert all(sh[2] == 64 for sh in s.shapes), "the head pads the volume up to the ROI"
        assert int(d["start"][:, 2].max()) == 0


# ------------------------------------------------------------------ format, hooks, determinism, ranks
@pytest.mark.parametrize("kind", ["train", "pretrain"])
def test_batches_have_the_monai_loaders_format(entries, tmp_path, kind):
    cfg = cfg_with(crop="label" if kind == "train" else "random", num_samples=2, flip_prob=0.2, rot90_prob=0.2)
    t = chain(cfg, kind)
    ref_loader = training_loader(entries, t, dataclasses.replace(cfg, cache="memory"), 4, 0, tmp_path)
    dev_loader = training_loader(entries, t, dataclasses.replace(cfg, cache="device"), 4, 0, tmp_path)
    assert isinstance(dev_loader, DeviceCropSampler) and len(dev_loader) == len(ref_loader)
    ref, ours = next(iter(ref_loader)), next(iter(dev_loader))
    keys = ["image", "label"] if kind == "train" else ["image"]
    assert sorted(ours) == keys
    for k in keys:
        assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype == torch.float32, k
    if kind == "train":
        assert set(torch.unique(ours["label"]).tolist()) <= set(range(NC))
    # the same volumes per step as the MONAI loader's DistributedSampler
    assert list(dev_loader.sampler) == list(ref_loader.sampler)


def _batches(sampler, epochs=2):
    return [[b["image"].clone() for b in sampler] for _ in range(epochs)]


def test_seeded_and_reseeded_per_epoch_by_the_training_loop(entries):
    cfg = cfg_with(crop="classes", num_samples=2, flip_prob=0.3, rot90_prob=0.3, intensity_scale_prob=0.3)
    t = chain(cfg)
    a = DeviceCropSampler(entries, t, batch_size=2, seed=0)
    b = DeviceCropSampler(entries, t, batch_size=2, seed=0)
    first, again = _batches(a), _batches(b)
    assert all(torch.equal(x, y) for ex, ey in zip(first, again) for x, y in zip(ex, ey))
    assert not torch.equal(first[0][0], first[1][0]) or not torch.equal(first[0][1], first[1][1])
    c = DeviceCropSampler(entries, t, batch_size=2, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(first[0], _batches(c, 1)[0]))

    # Trainer._seed_epoch (runtime/loop.py) re-seeds the generator and tells the sampler the epoch: an
    # epoch is then a function of (seed, epoch), whatever ran before it (a resumed run repeats it)
    def epoch(sampler, e):
        Trainer._seed_epoch(
            types.SimpleNamespace(cfg=types.SimpleNamespace(seed=0), dist=DistInfo(), loader=sampler), e
        )
        return [x["image"].clone() for x in sampler]

    e1 = epoch(a, 1)
    epoch(b, 0), epoch(b, 3)
    assert all(torch.equal(x, y) for x, y in zip(e1, epoch(b, 1)))
    assert not all(torch.equal(x, y) for x, y in zip(e1, epoch(b, 2)))


def test_ranks_draw_disjoint_shares_of_the_one_process_batch(entries):
    cfg = cfg_with(crop="label", num_samples=2, flip_prob=0.5, rot90_prob=0.5)
    t = chain(cfg)
    one = DeviceCropSampler(entries, t, batch_size=4, seed=5)  # 2 volumes per step
    ranks = [DeviceCropSampler(entries, t, batch_size=2, seed=5, world_size=2, rank=r) for r in (0, 1)]
    assert len(one) == 1 and all(len(r) == 1 for r in ranks)
    assert sorted(list(ranks[0].sampler) + list(ranks[1].sampler)) == [0, 1]
    full = next(iter(one))
    for r, s in enumerate(ranks):
        part = next(iter(s))
        # global position p = t * world_size + rank holds the same volume and the same random numbers
        for key in ("image", "label"):
            assert torch.equal(part[key], full[key][r * 2 : (r + 1) * 2]), (r, key)


# ------------------------------------------------------------------ refusals
def test_refuses_what_it_does_not_implement(entries):
    cfg = cfg_with()
    t = chain(cfg)
    noisy = Compose(list(t.transforms) + [RandGaussianNoised("image", prob=0.5)])
    with pytest.raises(DeviceSamplerError, match=r"data\.cache=device.*RandGaussianNoised"):
        DeviceCropSampler(entries, noisy, batch_size=8)
    with pytest.raises(DeviceSamplerError, match=r"data\.cache=device.*no random crop"):
        DeviceCropSampler(entries, Compose(deterministic_head(t)), batch_size=8)
    with pytest.raises(ValueError, match="data.num_samples"):
        DeviceCropSampler(entries, t, batch_size=3)
    with pytest.raises(ValueError, match=r"data\.cache=device serves training crops only"):
        make_dataset(entries, t, dataclasses.replace(cfg, cache="device"))
    assert load_config("demo", ["data.cache=device"]).data.cache == "device"
    with pytest.raises(ConfigError, match="data.cache.*not one of none, memory, disk, device"):
        load_config("demo", ["data.cache=gpu"])
