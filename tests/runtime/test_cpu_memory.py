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

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# a training step in miniature: a convolution's forward and backward at 2 x 8 x 48^3 float32 (7 MiB a
# feature map, all freed when the step ends), 24 steps; the first 4 fill the heap and are not counted.
# Where the freed blocks land depends on the heap's layout, so single steps vary (0 to 12 000 faults
# under glibc's defaults, 0 to 3 500 with reuse); the totals differ 20- to 30-fold on this machine.
STEPS, WARM = 24, 4

CHILD = r"""
import json, resource, sys
import torch
from medhpm.runtime.device import configure_cpu_memory
policy, device, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = configure_cpu_memory(policy, device) if policy != "untouched" else None
torch.manual_seed(0)
torch.set_num_threads(1)
conv = torch.nn.Conv3d(1, 8, 3, padding=1)
x = torch.randn(2, 1, 48, 48, 48)
faults = []
for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.relu(conv(x))
    (y * y).mean().backward()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults}))
"""


def _run(policy: str, device: str = "cpu") -> tuple[dict | None, int]:
    """What configure_cpu_memory returned in a fresh interpreter, and the page faults of its counted steps."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run([sys.executable, "-c", CHILD, policy, device, str(STEPS)], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["done"], sum(got["faults"][WARM:])


@pytest.fixture(scope="module")
def untouched_faults() -> int:
    if _thp_always():
        pytest.skip("transparent huge pages 'always': freed memory faults back in 2 MiB pages, few faults either way")
    done, faults = _run("untouched")
    assert done is None
    return faults


@pytest.fixture(scope="module")
def reuse_faults(untouched_faults) -> int:
    return _run("reuse", "cpu")[1]


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("policy", ["reuse", "auto"])
def test_reuse_and_auto_on_a_cpu_keep_freed_memory_for_the_next_step(policy, untouched_faults):
    done, faults = _run(policy, "cpu")
    assert done["applied"] is True and done["mmap_threshold"] >= 32 << 20 and done["trim_threshold"] >= 1 << 30
    # glibc's defaults map and zero-fill a step's feature maps again and again (7 MiB = 1 728 pages each)
    assert untouched_faults > 10 * 1728
    assert faults * 5 < untouched_faults, (faults, untouched_faults)


@pytest.mark.parametrize("policy,device", [("release", "cpu"), ("auto", "cuda")])
def test_release_and_auto_on_cuda_leave_glibcs_defaults(policy, device, reuse_faults):
    done, faults = _run(policy, device)
    assert done["applied"] is False and done["reason"]
    assert faults > 5 * reuse_faults, (faults, reuse_faults)  # as many faults as untouched glibc, not as few as reuse


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
