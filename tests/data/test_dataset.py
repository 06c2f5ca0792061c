"""Datasets (none / memory / disk cache) and seeded loaders."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from medhpm.config import DataConfig
from medhpm.data.dataset import make_dataset, make_loader
from medhpm.data.transforms import train_transforms, val_transforms


@pytest.fixture
def entries(tmp_path, ct_case_writer):
    out = []
    for i in range(3):
        img, lab = ct_case_writer(
            tmp_path / "data" / f"img{i}.nii.gz", tmp_path / "data" / f"lab{i}.nii.gz", (40, 40, 24), seed=i
        )
        out.append({"image": str(img), "label": str(lab), "case": f"img{i}"})
    return out


def cfg_with(**kw) -> DataConfig:
    return DataConfig(spacing=(1.5, 1.5, 2.0), roi=(16, 16, 16), num_samples=2, **kw)


def same_item(a, b):
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            same_item(x, y)
        return
    for key in ("image", "label"):
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
        assert np.allclose(np.asarray(a[key].affine), np.asarray(b[key].affine)), key


def cache_files(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".pt"))


@pytest.mark.parametrize("kind", ["val", "train"])
def test_memory_and_disk_cache_give_the_uncached_items(entries, tmp_path, kind):
    build = val_transforms if kind == "val" else train_transforms
    results = {}
    for mode in ("none", "memory", "disk"):
        cfg = cfg_with(cache=mode, cache_dir=str(tmp_path / "cache"))
        t = build(cfg)
        t.set_random_state(7)  # the random part then draws the same crops in every mode
        ds = make_dataset(entries, t, cfg)
        results[mode] = [ds[i] for i in range(len(ds))]
    for mode in ("memory", "disk"):
        for a, b in zip(results["none"], results[mode]):
            same_item(a, b)
    assert len(cache_files(tmp_path / "cache")) == len(entries)


def test_disk_cache_is_reused_and_keyed_on_files_and_chain(entries, tmp_path):
    folder = tmp_path / "cache"
    cfg = cfg_with(cache="disk", cache_dir=str(folder))
    ds = make_dataset(entries, val_transforms(cfg), cfg)
    first = [ds[i] for i in range(3)]
    files = cache_files(folder)
    stamps = {f: os.stat(folder / f).st_mtime_ns for f in files}
    # a new dataset (e.g. the next run) reads the same files
    ds2 = make_dataset(entries, val_transforms(cfg), cfg)
    for a, b in zip(first, [ds2[i] for i in range(3)]):
        same_item(a, b)
    assert cache_files(folder) == files and all(os.stat(folder / f).st_mtime_ns == stamps[f] for f in files)
    # another spacing is another deterministic head: new files, no stale item served
    cfg2 = dataclasses.replace(cfg, spacing=(3.0, 3.0, 4.0))
    item = make_dataset(entries, val_transforms(cfg2), cfg2)[0]
    assert len(cache_files(folder)) == 4 and item["image"].shape != first[0]["image"].shape
    # a rewritten scan (new mtime) is recomputed
    st = os.stat(entries[0]["image"])
    os.utime(entries[0]["image"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    make_dataset(entries, val_transforms(cfg), cfg)[0]
    assert len(cache_files(folder)) == 5
    # random-only changes (flip probability) share the cached head
    cfg3 = dataclasses.replace(cfg, flip_prob=0.9)
    make_dataset(entries[1:], val_transforms(cfg3), cfg3)[0]
    assert len(cache_files(folder)) == 5


def test_corrupt_cache_file_is_recomputed(entries, tmp_path):
    folder = tmp_path / "cache"
    cfg = cfg_with(cache="disk", cache_dir=str(folder))
    ref = make_dataset(entries[:1], val_transforms(cfg), cfg)[0]
    (f,) = cache_files(folder)
    (folder / f).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="recomputing"):
        again = make_dataset(entries[:1], val_transforms(cfg), cfg)[0]
    same_item(ref, again)
    assert (folder / f).stat().st_size > 100


def test_disk_cache_needs_a_folder(entries):
    cfg = cfg_with(cache="disk", cache_dir="")
    with pytest.raises(ValueError, match="cache_dir"):
        make_dataset(entries, val_transforms(cfg), cfg)


def batches(entries, seed, num_workers=0):
    cfg = cfg_with()
    ds = make_dataset(entries, train_transforms(cfg), cfg)
    loader = make_loader(ds, batch_size=2, shuffle=True, num_workers=num_workers, seed=seed)
    return [(b["image"].clone(), list(b["case"])) for b in loader]


def test_loader_batches_crops_and_is_seeded(entries):
    out = batches(entries, seed=0)
    assert [x.shape for x, _ in out] == [(4, 1, 16, 16, 16), (2, 1, 16, 16, 16)]  # 2 volumes x 2 crops, then 1
    again = batches(entries, seed=0)
    assert all(torch.equal(a, b) and ca == cb for (a, ca), (b, cb) in zip(out, again))
    other = [batches(entries, seed=s) for s in (1, 2, 3)]
    assert any(not torch.equal(o[0][0], out[0][0]) for o in other)


def test_loader_with_workers_is_seeded(entries):
    a = batches(entries, seed=5, num_workers=2)
    b = batches(entries, seed=5, num_workers=2)
    assert all(torch.equal(x, y) and cx == cy for (x, cx), (y, cy) in zip(a, b))
