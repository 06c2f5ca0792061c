"""runtime.cpu_memory: with ``reuse`` a block freed by one step is reused by the next without new page
faults; ``release`` (and ``auto`` on a CUDA device) leaves glibc's defaults, under which a large freed block
goes back to the operating system and faults in again. Each case runs in its own interpreter: the setting
is process-wide and glibc's adaptive default cannot be restored once changed."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from medhpm.config import load_config

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# A step's large temporaries in miniature: a 40 MiB and a 12 MiB tensor made, used and freed, 16 times. 40 MiB
# is above the largest mmap threshold glibc adapts to by default (32 MiB on 64-bit, mallopt(3)), so under its
# defaults that block is mapped and zero-filled anew at every step: at least 10 240 page faults (4 KiB pages)
# each. With the heap keeping freed memory the steps stop faulting once the heap has grown to hold them (here
# after 2 to 6 steps), so only the last 8 are counted. (A convolution's forward and backward, used before,
# left allocations under the threshold too and its fault counts overlapped between policies on torch 2.11.)
STEPS, WARM = 16, 8
BIG_BLOCK_PAGES = (40 << 20) // 4096

CHILD = r"""
import json, resource, sys
import torch
from medhpm.runtime.device import configure_cpu_memory
policy, device, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = configure_cpu_memory(policy, device) if policy != "untouched" else None
torch.set_num_threads(1)
faults = []
for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(10 << 20)  # 40 MiB of float32
    b = torch.ones(3 << 20) * a[: 3 << 20]  # 12 MiB
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults}))
"""


def _run(policy: str, device: str = "cpu") -> tuple[dict | None, list[int]]:
    """What configure_cpu_memory returned in a fresh interpreter, and the page faults of its counted steps."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, policy, device, str(STEPS)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["done"], got["faults"][WARM:]


@pytest.fixture(scope="module")
def untouched_faults() -> list[int]:
    if _thp_always():
        pytest.skip("transparent huge pages 'always': freed memory faults back in 2 MiB pages, few faults either way")
    done, faults = _run("untouched")
    assert done is None
    return faults


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def test_glibcs_defaults_fault_the_big_block_in_at_every_step(untouched_faults):
    assert all(f >= BIG_BLOCK_PAGES for f in untouched_faults), untouched_faults


@pytest.mark.parametrize("policy", ["reuse", "auto"])
def test_reuse_and_auto_on_a_cpu_keep_freed_memory_for_the_next_step(policy, untouched_faults):
    done, faults = _run(policy, "cpu")
    assert done["applied"] is True and done["mmap_threshold"] >= 32 << 20 and done["trim_threshold"] >= 1 << 30
    # fewer faults in all the counted steps together than glibc's defaults take in any single one
    assert sum(faults) < BIG_BLOCK_PAGES <= min(untouched_faults), (faults, untouched_faults)


@pytest.mark.parametrize("policy,device", [("release", "cpu"), ("auto", "cuda")])
def test_release_and_auto_on_cuda_leave_glibcs_defaults(policy, device, untouched_faults):
    done, faults = _run(policy, device)
    assert done["applied"] is False and done["reason"]
    assert all(f >= BIG_BLOCK_PAGES for f in faults), faults  # the big block mapped anew at every step, as untouched


def test_the_trainers_apply_the_config(tiny_dataset, tmp_path):
    from runtime_helpers import tiny_overrides

    from medhpm.pretrain.trainer import PretrainTrainer

    cfg = load_config("demo", tiny_overrides(tiny_dataset, "runtime.cpu_memory=release", "runtime.device=cpu"))
    t = PretrainTrainer(cfg, tmp_path / "run")
    t.setup()
    t.logger.close()
    assert t.cpu_memory["policy"] == "release" and t.cpu_memory["applied"] is False


def test_an_unknown_policy_is_refused():
    from medhpm.runtime.device import configure_cpu_memory

    with pytest.raises(ValueError, match="runtime.cpu_memory='keep'"):
        configure_cpu_memory("keep")
