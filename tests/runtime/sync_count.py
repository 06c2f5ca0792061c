"""Count the host syncs of a training loop on the CPU: every call that reads a tensor's value back to
Python (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, ``index``, ``numpy``, ``cpu``, boolean-mask
indexing) seen by a ``TorchFunctionMode`` while ``Trainer.train_one_epoch`` runs, classified by the
Python stack: inside the log-interval read-back (``_flush``), inside the data loader (``_batches``:
MONAI's transforms, not the step), or in the step itself. On CUDA each of these is a device sync.

Also run as a script by the issue-18 report (``python tests/runtime/sync_count.py``) on this tree and
on an older one, to count before/after."""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

# Reads of tensors that live on the host on every device, so not a device sync on CUDA either:
# (file, function, read) of the caller. MONAI's DiceLoss turns a CPU ``torch.arange`` into a list.
HOST_ONLY = {("monai/losses/dice.py", "forward", "tolist")}

READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()  # (where, name) -> count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        hit = name in READS
        if name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dtype == torch.bool:
            hit, name = True, "bool-index"
        if hit:
            caller = sys._getframe(1)
            if (
                caller.f_code.co_filename.endswith(tuple(f for f, _, _ in HOST_ONLY))
                and (caller.f_code.co_filename.rsplit("site-packages/", 1)[-1], caller.f_code.co_name, name)
                in HOST_ONLY
            ):
                return func(*args, **(kwargs or {}))
            where = self._where()
            if where:
                self.calls[(where, name)] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _where() -> str | None:
        f = sys._getframe(2)
        names = []
        while f is not None:
            names.append(f.f_code.co_name)
            f = f.f_back
        if "train_one_epoch" not in names:
            return None  # set-up, validation, checkpoints: outside the loop
        if "_batches" in names:
            return None  # the data loader
        if "_flush" in names or "_nonfinite" in names:
            return "flush"
        return "step"

    def count(self, where: str) -> int:
        return sum(n for (w, _), n in self.calls.items() if w == where)


def count_run(trainer) -> SyncCounter:
    torch.set_num_threads(1)
    with SyncCounter() as counter:
        trainer.run()
    return counter


if __name__ == "__main__":  # python sync_count.py DATASET_JSON OUT_DIR [stage]
    from medhpm.config import load_config

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from runtime_helpers import tiny_overrides

    ds, out = sys.argv[1], sys.argv[2]
    stage = sys.argv[3] if len(sys.argv) > 3 else "pretrain"
    cfg = load_config(
        "demo",
        tiny_overrides(
            ds, f"{stage}.epochs=1", f"{stage}.steps_per_epoch=6", f"{stage}.batch_size=1", "runtime.log_every=3"
        ),
    )
    if stage == "pretrain":
        from medhpm.pretrain.trainer import PretrainTrainer as T
    else:
        from medhpm.segment.trainer import FinetuneTrainer as T
    c = count_run(T(cfg, out))
    print({f"{w}:{n}": k for (w, n), k in sorted(c.calls.items())}, "step", c.count("step"), "flush", c.count("flush"))
