"""``data.cache=device``: the training crops drawn on the training device in batched tensor ops.

The MONAI chain (:mod:`medhpm.data.transforms`) stays the reference. This module runs the chain's
deterministic head (load, orientation, spacing, HU window, foreground crop, padding up to the ROI) once per
case, through the same MONAI transforms, and keeps the results as one flat tensor per key on the device.
Each step it then draws a batch of crops there, with the distributions of the chain's random tail, read
from the tail's own transform objects (so a chain built from any config is followed, not re-derived):

* crop centres: ``RandSpatialCropSamplesd`` (uniform start ``U{0..dim-roi}`` per axis);
  ``RandCropByPosNegLabeld`` (a foreground voxel with probability ``pos / (pos + neg)``, else a background
  voxel inside the body, i.e. image above the threshold; all from the other set when one is empty);
  ``RandCropByLabelClassesd`` (a class among those present in the scan with equal odds, then one of its
  voxels inside the body). A centre near the border is moved inwards as MONAI's ``correct_crop_centers``
  does, i.e. the crop start is clamped into ``[0, dim - roi]``; volumes smaller than the ROI were padded
  by the head (image with ``b_min``, label with background), exactly as in the MONAI chain.
* ``RandFlipd`` per axis, ``RandRotate90d`` (k uniform in 1..max_k, axes (0, 1)), ``RandScaleIntensityd``
  (``x * (1 + U(lo, hi))``) and ``RandShiftIntensityd`` (``x + U(lo, hi)``), each with its probability,
  independently for every crop, in the chain's order. Flips and rotations are folded into the gather's
  index grids, so a crop is one gather from the flat volume buffer.

A batch is ``{"image": (B, 1, *roi) float32, "label": (B, 1, *roi) float32}`` (no label for unlabelled
pre-training) with ``num_samples`` consecutive crops per volume, as ``list_data_collate`` gives. Anything
else in a tail (another transform, other keys or axes) is refused with an error naming ``data.cache``.

Randomness: one ``torch.Generator`` on the device (:attr:`DeviceCropSampler.generator`; the training loop
re-seeds it every epoch, as it re-seeds a DataLoader's generator). The order of volumes is that of a
``DistributedSampler(shuffle=True, seed)`` (:attr:`DeviceCropSampler.sampler`, told the epoch by the loop),
i.e. the same volumes per step and rank as the MONAI loader. Every rank draws the random numbers of the
whole global batch from the same seed and uses those of its own positions, so 1 process at batch ``W*b``
and ``W`` processes at batch ``b`` draw the same crops for the same volumes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence, cast

import torch
from monai.transforms import (
    EnsureTyped,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    apply_transform,
)
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from medhpm.data.datalist import DataError

__all__ = ["DeviceCropSampler", "DeviceSamplerError", "tail_plan"]


class DeviceSamplerError(ValueError):
    """A chain or dataset that ``data.cache=device`` cannot sample as the MONAI chain would; says why."""


def _refuse(why: str) -> DeviceSamplerError:
    return DeviceSamplerError(
        f"data.cache=device: {why}; use data.cache=memory (or none/disk), which runs the MONAI chain itself"
    )


def _keys(t: Any) -> tuple[str, ...]:
    return tuple(str(k) for k in getattr(t, "keys", ()))


def _range(v: Any, what: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in v)
    if hi < lo:
        raise _refuse(f"{what} range ({lo}, {hi}) is empty")
    return lo, hi


def tail_plan(tail: Sequence[Any], keys: Sequence[str]) -> dict:
    """What the random tail of a chain does, in a form the sampler runs: ``{"crop": {...}, "ops": [...]}``.
    ``keys``: the chain's keys ("image" and maybe "label"). Raises :class:`DeviceSamplerError` for a
    transform, key set or option the device sampler does not implement."""
    keys = tuple(keys)
    if not tail:
        raise _refuse("the chain has no random crop")
    crop_t, rest = tail[0], list(tail[1:])
    if _keys(crop_t) != keys:
        raise _refuse(f"the crop {type(crop_t).__name__} acts on keys {_keys(crop_t)}, not on all of {keys}")
    # MONAI types the croppers' sizes as Sequence[int] | int; the chains this module reads give sequences
    crop: dict[str, Any]
    c: Any
    if isinstance(crop_t, RandSpatialCropSamplesd):
        inner: Any = crop_t.cropper.cropper
        if inner.random_size or not inner.random_center:
            raise _refuse("RandSpatialCropSamplesd with random_size or a fixed centre is not implemented")
        crop = {
            "mode": "random",
            "roi": tuple(int(r) for r in inner.roi_size),
            "num_samples": int(crop_t.cropper.num_samples),
        }
    elif isinstance(crop_t, RandCropByPosNegLabeld):
        c = crop_t.cropper
        if crop_t.fg_indices_key or crop_t.bg_indices_key:
            raise _refuse("RandCropByPosNegLabeld with precomputed indices is not implemented")
        if crop_t.label_key != "label" or crop_t.image_key not in (None, "image"):
            raise _refuse("RandCropByPosNegLabeld must read 'label' (and 'image')")
        crop = {
            "mode": "posneg",
            "roi": tuple(int(r) for r in c.spatial_size),
            "num_samples": int(c.num_samples),
            "pos_ratio": float(c.pos_ratio),
            "threshold": float(c.image_threshold),
            "use_image": crop_t.image_key is not None,
        }
    elif isinstance(crop_t, RandCropByLabelClassesd):
        c = crop_t.cropper
        if getattr(crop_t, "indices_key", None) or getattr(c, "max_samples_per_class", None):
            raise _refuse(
                "RandCropByLabelClassesd with precomputed indices or max_samples_per_class is not implemented"
            )
        if crop_t.label_key != "label" or crop_t.image_key not in (None, "image"):
            raise _refuse("RandCropByLabelClassesd must read 'label' (and 'image')")
        if not c.num_classes:
            raise _refuse("RandCropByLabelClassesd needs num_classes")
        ratios = None if c.ratios is None else [float(r) for r in c.ratios]
        if ratios is not None and len(set(ratios)) > 1:
            raise _refuse("RandCropByLabelClassesd with unequal class ratios is not implemented")
        crop = {
            "mode": "classes",
            "roi": tuple(int(r) for r in c.spatial_size),
            "num_samples": int(c.num_samples),
            "num_classes": int(c.num_classes),
            "threshold": float(c.image_threshold),
            "use_image": crop_t.image_key is not None,
        }
    else:
        raise _refuse(
            f"the first random transform is {type(crop_t).__name__}, not a crop it implements "
            "(RandSpatialCropSamplesd, RandCropByPosNegLabeld, RandCropByLabelClassesd)"
        )
    if len(crop["roi"]) != 3 or min(crop["roi"]) < 1:
        raise _refuse(f"crop size {crop['roi']} must be three positive sizes")
    ops: list[dict] = []
    for t in rest:
        name = type(t).__name__
        if isinstance(t, RandFlipd):
            axis = t.flipper.spatial_axis
            axes = (axis,) if isinstance(axis, int) else tuple(axis or ())
            if _keys(t) != keys or len(axes) != 1 or axes[0] not in (0, 1, 2):
                raise _refuse(f"{name} must flip one spatial axis of all of {keys}")
            ops.append({"op": "flip", "axis": int(axes[0]), "prob": float(t.prob)})
        elif isinstance(t, RandRotate90d):
            if _keys(t) != keys or tuple(t.spatial_axes) != (0, 1):
                raise _refuse(f"{name} must rotate all of {keys} in spatial axes (0, 1)")
            if crop["roi"][0] != crop["roi"][1]:
                raise _refuse(f"{name} needs roi[0] == roi[1], got {crop['roi']}")
            ops.append({"op": "rot90", "prob": float(t.prob), "max_k": int(t.max_k)})
        elif isinstance(t, RandScaleIntensityd):
            if _keys(t) != ("image",) or getattr(t.scaler, "channel_wise", False):
                raise _refuse(f"{name} must scale 'image' only, not channel-wise")
            ops.append({"op": "scale", "prob": float(t.prob), "range": _range(t.scaler.factors, name)})
        elif isinstance(t, RandShiftIntensityd):
            factor_keys = getattr(t, "factor_key", None) or ()
            if (
                _keys(t) != ("image",)
                or any(k is not None for k in factor_keys)
                or getattr(getattr(t.shifter, "_shifter", None), "safe", False)
                or getattr(t.shifter, "channel_wise", False)
            ):
                raise _refuse(f"{name} must shift 'image' only, without factor_key, safe or channel_wise")
            ops.append({"op": "shift", "prob": float(t.prob), "range": _range(t.shifter.offsets, name)})
        elif isinstance(t, EnsureTyped):
            if t.converter.dtype not in (None, torch.float32):
                raise _refuse(f"{name} to {t.converter.dtype}: the device sampler gives float32")
        else:
            raise _refuse(f"the chain's {name} is not implemented by the device sampler")
    return {"crop": crop, "ops": ops}


# random numbers per crop: 3 for a uniform start, 2 for a centre (set/class, voxel), then per op
_OP_FIELDS = {"flip": 1, "rot90": 2, "scale": 2, "shift": 2}


class DeviceCropSampler:
    """Iterable of training batches drawn on ``device`` from the preprocessed volumes of ``entries``.

    ``transform``: a training chain of :mod:`medhpm.data.transforms` (its deterministic head is run once
    per case here, its random tail is followed on the device). ``batch_size``: crops per step of this
    process (``batch_size // num_samples`` volumes). ``world_size``/``rank``: this process's share (see the
    module docstring). Hooks the training loop uses: :attr:`sampler` (``set_epoch``) and :attr:`generator`
    (re-seeded per epoch); ``len()`` is the number of batches per epoch, as a DataLoader's."""

    def __init__(
        self,
        entries: Sequence[dict],
        transform: Callable,
        batch_size: int,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        device: Optional[torch.device | str] = None,
    ):
        from medhpm.data.datalist import case_error
        from medhpm.data.transforms import deterministic_head, flat_transforms

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        entries = [dict(e) for e in entries]
        if not entries:
            raise _refuse("no training cases")
        head = deterministic_head(transform)
        tail = flat_transforms(transform)[len(head) :]
        self.keys = tuple(_keys(tail[0])) if tail else ("image",)
        self.plan = tail_plan(tail, self.keys)
        crop = self.plan["crop"]
        self.roi = crop["roi"]
        self.num_samples = crop["num_samples"]
        if batch_size < 1 or batch_size % self.num_samples:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of data.num_samples "
                f"({self.num_samples}): each volume gives num_samples crops per step"
            )
        self.volumes_per_batch = batch_size // self.num_samples
        self.world_size, self.rank = int(world_size), int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cases = [str(e.get("case") or e.get("image")) for e in entries]
        self._build(entries, head, case_error)
        self.sampler: DistributedSampler = DistributedSampler(
            cast(Dataset, range(len(entries))),  # the sampler only takes the len() of its data set
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=int(seed),
            drop_last=False,
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        fields = 3 + 2 + sum(_OP_FIELDS[o["op"]] for o in self.plan["ops"])
        self._fields = fields

    # ------------------------------------------------------------------ the preprocessed volumes
    def _build(self, entries: list[dict], head: list, case_error: Callable) -> None:
        crop, roi = self.plan["crop"], torch.tensor(self.roi)
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        cands: list[torch.Tensor] = []
        shapes: list[tuple[int, ...]] = []
        counts: list[list[int]] = []
        labelled = "label" in self.keys
        for e in entries:
            try:
                item: Any = dict(e)
                for t in head:
                    item = apply_transform(t, item)
            except MemoryError:
                raise
            except Exception as err:
                raise case_error(err, e) from err
            img = torch.as_tensor(item["image"]).as_subclass(torch.Tensor)
            name = self.cases[len(images)]
            if img.ndim != 4 or img.shape[0] != 1:
                raise _refuse(f"case {name}: image of shape {tuple(img.shape)}, the sampler takes one channel")
            if any(s < r for s, r in zip(img.shape[1:], self.roi)):
                raise _refuse(
                    f"case {name}: preprocessed volume {tuple(img.shape[1:])} is smaller than the ROI "
                    f"{self.roi} (the chain does not pad it), which the MONAI crops handle differently"
                )
            img = img[0].to(torch.float32).contiguous()
            lab = None
            if labelled:
                lab = torch.as_tensor(item["label"]).as_subclass(torch.Tensor)[0]
                if lab.shape != img.shape:
                    raise _refuse(f"case {name}: label {tuple(lab.shape)} and image {tuple(img.shape)} differ in shape")
                lab = lab.round().to(torch.int64)
            if crop["mode"] != "random":
                inside = img > crop["threshold"] if crop["use_image"] else torch.ones_like(img, dtype=torch.bool)
                if crop["mode"] == "posneg":
                    fg = cast(torch.Tensor, lab) > 0  # a posneg crop needs the label
                    sets = [fg, inside & ~fg]
                    if not (fg.any() or sets[1].any()):
                        raise DataError(
                            f"case {name}: no voxel to centre a crop on (no label, no body above the "
                            f"threshold {crop['threshold']}); the MONAI chain fails on it too"
                        )
                else:
                    sets = [inside & (lab == c) for c in range(crop["num_classes"])]
                    if not any(s.any() for s in sets):
                        raise DataError(f"case {name}: no voxel inside the body to centre a crop on")
                idx = [torch.nonzero(s.reshape(-1)).reshape(-1) for s in sets]
                counts.append([len(i) for i in idx])
                cands.append(torch.cat(idx))
            shapes.append(tuple(img.shape))
            images.append(img.reshape(-1))
            if lab is not None:
                labels.append(lab.reshape(-1))
        dev = self.device
        sizes = [math.prod(s) for s in shapes]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        total = sum(sizes)
        self._index_dtype = torch.int32 if total < 2**31 else torch.int64
        self._image = torch.cat(images).to(dev)
        self._label = None
        if labels:
            flat = torch.cat(labels)
            small = torch.uint8 if flat.min() >= 0 and flat.max() < 256 else torch.int32
            self._label = flat.to(small).to(dev)
        self._offset = torch.tensor(offsets, dtype=torch.int64, device=dev)
        self._shape = torch.tensor(shapes, dtype=torch.int64, device=dev)
        self._roi = roi.to(dev)
        if cands:
            cnt = torch.tensor(counts, dtype=torch.int64)
            starts = torch.cumsum(cnt.reshape(-1), 0) - cnt.reshape(-1)
            self._cand = torch.cat(cands).to(torch.int32 if max(sizes) < 2**31 else torch.int64).to(dev)
            self._cand_count = cnt.to(dev)
            self._cand_start = starts.reshape(cnt.shape).to(dev)
        self.shapes = shapes

    @property
    def nbytes(self) -> int:
        """Bytes the sampler holds on the device (volumes, labels, candidate centres)."""
        ts = [self._image, self._label, getattr(self, "_cand", None)]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.volumes_per_batch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64).to(self.device)  # once per epoch
        b = self.volumes_per_batch
        for j in range(len(self)):
            vols = order[j * b : (j + 1) * b]
            yield self.draw(vols)

    def draw(self, vols: torch.Tensor, details: bool = False) -> dict:
        """One batch: ``num_samples`` crops of each volume index in ``vols`` (a device tensor); the random
        numbers of all ``world_size`` ranks are drawn and this rank's are used. ``details``: also
        ``out["details"]`` = {"volume", "start", "centre" (as drawn, before it is moved inside), "ops": [(op,
        per-crop value: flip 0/1, rot90 k or 0, scale/shift the factor/offset or 0)]} (tests, debugging)."""
        ns, W = self.num_samples, self.world_size
        nv = int(vols.numel())
        u = torch.rand((nv, W, ns, self._fields), dtype=torch.float64, generator=self.generator, device=self.device)
        u = u[:, self.rank].reshape(nv * ns, self._fields)
        v = vols.repeat_interleave(ns)
        shape = self._shape[v]  # (B, 3)
        start, centre = self._starts(v, shape, u)
        record: list = []
        R0, R1, R2 = self.roi
        B = v.numel()
        dev = self.device
        # crop-local coordinates of every output voxel: axes 0 and 1 as (B, R0, R1) grids (rot90 mixes them)
        c0 = torch.arange(R0, device=dev).view(1, R0, 1).expand(B, R0, R1)
        c1 = torch.arange(R1, device=dev).view(1, 1, R1).expand(B, R0, R1)
        c2 = torch.arange(R2, device=dev).view(1, R2).expand(B, R2)
        col = 5
        intensity: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for op in self.plan["ops"]:
            kind = op["op"]
            if kind == "flip":
                do = u[:, col] < op["prob"]
                col += 1
                record.append((op, do.to(torch.int64)))
                if op["axis"] == 2:
                    c2 = torch.where(do[:, None], c2.flip(1), c2)
                else:
                    d = 1 + op["axis"]
                    m = do[:, None, None]
                    c0, c1 = torch.where(m, c0.flip(d), c0), torch.where(m, c1.flip(d), c1)
            elif kind == "rot90":
                do = u[:, col] < op["prob"]
                k = torch.floor(u[:, col + 1] * op["max_k"]).clamp(max=op["max_k"] - 1).to(torch.int64) + 1
                col += 2
                record.append((op, torch.where(do, k, 0)))
                n0, n1 = c0, c1
                for kk in range(1, op["max_k"] + 1):
                    m = (do & (k == kk))[:, None, None]
                    n0 = torch.where(m, torch.rot90(c0, kk, dims=(1, 2)), n0)
                    n1 = torch.where(m, torch.rot90(c1, kk, dims=(1, 2)), n1)
                c0, c1 = n0, n1
            else:
                do = u[:, col] < op["prob"]
                lo, hi = op["range"]
                val = (lo + (hi - lo) * u[:, col + 1]).to(torch.float32)
                col += 2
                record.append((op, torch.where(do, val, 0.0)))
                intensity.append((kind, do, val))
        s1 = shape[:, 2]
        s0 = shape[:, 1] * s1
        base = self._offset[v] + start[:, 0] * s0 + start[:, 1] * s1 + start[:, 2]
        it = self._index_dtype
        plane = (base[:, None, None] + c0 * s0[:, None, None] + c1 * s1[:, None, None]).to(it)
        c2 = c2.to(it)
        # intensity jitter as one affine map per crop, x * a + b, composed in the chain's order
        a = torch.ones(B, dtype=torch.float32, device=dev)
        b = torch.zeros(B, dtype=torch.float32, device=dev)
        for kind, do, val in intensity:
            if kind == "scale":
                f = torch.where(do, 1.0 + val, 1.0)
                a, b = a * f, b * f
            else:
                b = b + torch.where(do, val, 0.0)
        image = torch.empty((B, 1, R0, R1, R2), dtype=torch.float32, device=dev)
        label = None if self._label is None else torch.empty_like(image)
        # on a CPU, gathers of a few crops at a time stay in cache (one chunk: the whole batch on a GPU)
        step = B if dev.type != "cpu" else max(1, (1 << 21) // (R0 * R1 * R2))
        for i in range(0, B, step):
            sl = slice(i, i + step)
            idx = plane[sl, :, :, None] + c2[sl, None, None, :]
            torch.addcmul(b[sl].view(-1, 1, 1, 1), self._image[idx], a[sl].view(-1, 1, 1, 1), out=image[sl, 0])
            if label is not None:
                assert self._label is not None  # label is allocated only when there are labels
                label[sl, 0] = self._label[idx]
        out: dict[str, Any] = {"image": image}
        if label is not None:
            out["label"] = label
        if details:
            out["details"] = {"volume": v, "start": start, "centre": centre, "ops": record}
        return out

    def _starts(self, v: torch.Tensor, shape: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3) crop starts (uniform, or a drawn centre moved inside as MONAI's correct_crop_centers) and
        the drawn centres."""
        crop, roi = self.plan["crop"], self._roi
        room = shape - roi  # >= 0: volumes were checked against the ROI
        if crop["mode"] == "random":
            start = torch.minimum(torch.floor(u[:, 0:3] * (room + 1).to(u.dtype)).to(torch.int64), room)
            return start, start + roi // 2
        cnt = self._cand_count[v]  # (B, K)
        if crop["mode"] == "posneg":
            k = torch.where(u[:, 3] < crop["pos_ratio"], 0, 1)
            empty = cnt.gather(1, k[:, None])[:, 0] == 0
            k = torch.where(empty, 1 - k, k)  # MONAI: all centres from the other set when one is empty
        else:
            avail = cnt > 0
            n = avail.sum(1)
            r = torch.minimum(torch.floor(u[:, 3] * n.to(u.dtype)).to(torch.int64), n - 1)
            k = (avail.cumsum(1) > r[:, None]).to(torch.int8).argmax(1)  # the r-th present class
        c = cnt.gather(1, k[:, None])[:, 0]
        i = torch.minimum(torch.floor(u[:, 4] * c.to(u.dtype)).to(torch.int64), c - 1)
        flat = self._cand[self._cand_start[v].gather(1, k[:, None])[:, 0] + i].to(torch.int64)
        d1, d2 = shape[:, 1], shape[:, 2]
        centre = torch.stack([flat // (d1 * d2), (flat // d2) % d1, flat % d2], 1)
        return torch.minimum(torch.clamp(centre - roi // 2, min=0), room), centre
