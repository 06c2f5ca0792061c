"""Datasets and loaders: MONAI Dataset / CacheDataset / PersistentDataset chosen by ``data.cache``.

* ``none``: every item is loaded and preprocessed on every access.
* ``memory``: the deterministic head of the chain (up to the first random transform) is computed once
  per case and kept in RAM (``CacheDataset``).
* ``disk``: the same head is stored as one file per case under ``data.cache_dir`` (``PersistentDataset``);
  the file name hashes the case's paths with their size and modification time and the chain's
  deterministic parameters, so editing a scan or changing the spacing never serves a stale item.
* ``device``: training only (:func:`training_loader`): the same head is computed once per case and kept
  as tensors on the training device, where the crops, flips, rotations and intensity jitter of each step
  are drawn in batched tensor ops (:mod:`medhpm.data.device_sampler`; the MONAI chain is the reference).

The trainers check every NIfTI header of a run's cases before they build a dataset
(:func:`medhpm.data.headers.check_headers`); a case that fails in the chain later is reported as a ``DataError``
naming its files and the first cause (not MONAI's "applying transform" chain).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, list_data_collate
from monai.data.utils import worker_init_fn as _monai_worker_init_fn
from torch.utils.data.distributed import DistributedSampler

from medhpm.config import DataConfig
from medhpm.data.datalist import case_error, root_cause
from medhpm.data.transforms import DETERMINISTIC_FIELDS, deterministic_head, transforms_spec
from medhpm.runtime.files import atomic_path

__all__ = [
    "make_dataset",
    "make_loader",
    "training_loader",
    "seed_worker",
    "item_hash",
    "chain_hash",
    "case_error",
    "root_cause",
]

CACHE_FORMAT = 1  # bump when the layout of cached items changes


def item_hash(item: Any) -> bytes:
    """Cache key of a datalist entry: its JSON, plus size and mtime of every path it names."""

    def stat(v: Any) -> Any:
        if isinstance(v, str) and os.path.exists(v):
            st = os.stat(v)
            return [v, st.st_size, st.st_mtime_ns]
        if isinstance(v, dict):
            return {str(k): stat(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [stat(x) for x in v]
        return v if isinstance(v, (int, float, bool, type(None))) else str(v)

    blob = json.dumps(stat(item), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest().encode("utf-8")


def chain_hash(transform: Any, cfg: DataConfig) -> str:
    """Hash of what the cached (deterministic) head computes: its transforms and their keys, and the
    chain parameters (the spec attached by medhpm.data.transforms, else those of ``cfg``)."""

    spec = getattr(transform, "medhpm_spec", None) or transforms_spec(cfg)
    head = []
    for t in deterministic_head(transform):
        desc: list = [type(t).__name__, sorted(map(str, getattr(t, "keys", ())))]
        checks = getattr(t, "checks", None)  # LoadCTd's checks: an item cached without them was never checked
        if isinstance(checks, dict) and checks:
            desc.append(checks)
        head.append(desc)
    blob = {"cache_format": CACHE_FORMAT, "params": {k: spec.get(k) for k in DETERMINISTIC_FIELDS}, "head": head}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class _NamedErrors:
    """Mixin for MONAI datasets: a case whose chain fails raises a DataError that names it."""

    def _transform(self, index):
        try:
            return super()._transform(index)
        except MemoryError:
            raise
        except Exception as e:
            raise case_error(e, self.data[index]) from e


class _Dataset(_NamedErrors, Dataset):
    pass


class _CacheDataset(_NamedErrors, CacheDataset):
    def _fill_cache(self, indices=None) -> list:
        # one loader: fill in this thread. A bad file raised inside MONAI's thread pool left torch's
        # threads alive at exit and the process aborted ("terminate called") after the clear error line
        # num_workers is an int: make_dataset passes one (CacheDataset types it Optional)
        if self.num_workers > 1 or self.cache_num <= 0:  # type: ignore[operator]
            return super()._fill_cache(indices)
        return [self._load_cache_item(i) for i in (range(self.cache_num) if indices is None else indices)]

    def _load_cache_item(self, idx: int):  # the deterministic head runs here, at construction
        try:
            return super()._load_cache_item(idx)
        except MemoryError:
            raise
        except Exception as e:
            raise case_error(e, self.data[idx]) from e


class _DiskCacheDataset(_NamedErrors, PersistentDataset):
    """PersistentDataset whose cache files are written atomically next to their final name and which
    recomputes (instead of failing on) a cache file it cannot read."""

    def _cachecheck(self, item_transformed):
        assert self.cache_dir is not None
        name = f"{self.hash_func(item_transformed).decode('utf-8')}-{self.transform_hash}.pt"
        hashfile = self.cache_dir / name
        if hashfile.is_file():
            try:
                # Our own files, written by this class: weights_only=False is needed to restore the
                # MetaTensor metadata (affine, applied operations) that inverting a prediction uses.
                return torch.load(hashfile, weights_only=False)
            except Exception as e:
                warnings.warn(f"cache file {hashfile} is unreadable ({type(e).__name__}); recomputing it")
                try:
                    hashfile.unlink()
                except OSError:
                    pass
        out = self._pre_transform(deepcopy(item_transformed))
        try:
            with atomic_path(hashfile, suffix=".pt") as tmp:
                torch.save(out, tmp, pickle_protocol=self.pickle_protocol)
        except OSError as e:  # a full or read-only disk slows the run down but does not stop it
            warnings.warn(f"could not write cache file {hashfile}: {e}")
        return out


def make_dataset(
    entries: Sequence[dict], transform: Callable, cfg: DataConfig, cache_dir: Optional[str | os.PathLike] = None
) -> Dataset:
    """Dataset over datalist ``entries`` with ``transform``, cached as ``cfg.cache`` says.

    ``cache_dir`` overrides ``cfg.cache_dir`` for ``cache == "disk"`` (one of them must be set).
    Memory caching runs the deterministic head at construction (``cfg.num_workers`` threads).
    """
    data = [dict(e) for e in entries]
    mode = cfg.cache
    if mode == "none":
        return _Dataset(data, transform)
    if mode == "memory":
        return _CacheDataset(data, transform, cache_rate=1.0, num_workers=max(1, int(cfg.num_workers)), progress=False)
    if mode == "disk":
        folder = cache_dir or cfg.cache_dir
        if not folder:
            raise ValueError("data.cache=disk needs a folder: set data.cache_dir (or pass cache_dir)")
        folder = Path(folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the cache folder {folder} (data.cache_dir): {e.strerror or e}") from None
        ds = _DiskCacheDataset(data, transform, cache_dir=folder, hash_func=item_hash, track_meta=True)
        ds.transform_hash = chain_hash(transform, cfg)
        return ds
    if mode == "device":
        raise ValueError(
            "data.cache=device serves training crops only (medhpm.data.dataset.training_loader); "
            "a dataset of whole items needs data.cache=none, memory or disk"
        )
    raise ValueError(f"data.cache must be none, memory, disk or device, got {mode!r}")


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seeds MONAI's random transforms (as MONAI's own worker_init_fn does)
    and Python's and NumPy's global generators from the worker's torch seed, which the loader derives
    from its generator; runs are then repeatable for a given seed and number of workers."""
    _monai_worker_init_fn(worker_id)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    sampler: Optional[torch.utils.data.Sampler] = None,
    prefetch_factor: int = 2,
    drop_last: bool = False,
    pin_memory: Optional[bool] = None,
    persistent_workers: Optional[bool] = None,
) -> DataLoader:
    """MONAI DataLoader with ``list_data_collate`` (a chain that returns ``num_samples`` crops per
    volume gives batches of ``batch_size * num_samples``) and seeded shuffling and workers.

    With a ``sampler`` (e.g. DistributedSampler) ``shuffle`` is left to the sampler.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=bool(shuffle) if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=list_data_collate,
        worker_init_fn=seed_worker,
        generator=gen,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
    return DataLoader(dataset, **kwargs)


def training_loader(
    entries: list[dict],
    transform: Callable,
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    run_dir: str | Path,
    world_size: int = 1,
    rank: int = 0,
    device: Optional[torch.device | str] = None,
):
    """The loader one training process reads: the dataset over ``entries`` (cached as ``cfg.cache`` says,
    on disk under ``cfg.cache_dir`` or ``run_dir/cache``), ``batch_size`` crops per step, i.e.
    ``batch_size // cfg.num_samples`` volumes. A DistributedSampler is used also for one process, so the
    order of volumes in the global batch is the same whatever the number of processes. Both trainers
    build their loader here.

    ``data.cache=device``: a :class:`medhpm.data.device_sampler.DeviceCropSampler` instead, on ``device``
    (default: the current CUDA device if there is one, else the CPU), with the same batches' format, length,
    volume order and epoch hooks (``sampler.set_epoch``, a re-seedable ``generator``)."""
    if cfg.cache == "device":
        from medhpm.data.device_sampler import DeviceCropSampler

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return DeviceCropSampler(
            entries, transform, batch_size=batch_size, seed=seed, world_size=world_size, rank=rank, device=device
        )
    ds = make_dataset(entries, transform, cfg, cache_dir=cfg.cache_dir or (Path(run_dir) / "cache"))
    sampler: DistributedSampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    return make_loader(
        ds,
        batch_size=batch_size // cfg.num_samples,
        shuffle=False,
        num_workers=cfg.num_workers,
        seed=seed,
        sampler=sampler,
        prefetch_factor=cfg.prefetch_factor,
    )
