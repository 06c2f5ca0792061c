"""runtime.threads: 0 leaves torch's own thread count (every core it sees), N pins N; the demo does not pin."""

from __future__ import annotations

import pytest
import torch

from medhpm.config import load_config
from medhpm.runtime.device import configure_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_zero_keeps_torchs_count_and_n_pins_it():
    torch.set_num_threads(3)  # stands for what torch chose on a bigger machine
    configure_threads(load_config("demo").runtime.threads)  # the demo uses what the machine gives
    assert torch.get_num_threads() == 3
    configure_threads(1)
    assert torch.get_num_threads() == 1
    configure_threads(0)
    assert torch.get_num_threads() == 1  # 0 changes nothing


def _trainer_set_up(tiny_dataset, run_dir, threads: int) -> None:
    """Set up (not run) a tiny pre-training run with ``runtime.threads=threads`` on the CPU."""
    from runtime_helpers import tiny_overrides

    from medhpm.pretrain.trainer import PretrainTrainer

    cfg = load_config("demo", tiny_overrides(tiny_dataset, f"runtime.threads={threads}", "runtime.device=cpu"))
    t = PretrainTrainer(cfg, run_dir)
    t.setup()
    t.logger.close()


def test_the_trainer_pins_what_it_is_told_and_says_so(tiny_dataset, tmp_path, capsys):
    torch.set_num_threads(1)
    _trainer_set_up(tiny_dataset, tmp_path / "run", 2)
    assert torch.get_num_threads() == 2
    assert "[pretrain] device cpu (2 threads), precision" in capsys.readouterr().out


# --------------------------------------------------------------------------- a container's CPU quota
# cgroup trees written here as the kernel lays them out (file names and formats of cgroup v2 and v1)
def _v2(tmp_path, own="/", **files):
    """cgroup v2 tree: files maps a folder under the root ('' for the root) to its cpu.max text."""
    root = tmp_path / "v2"
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for folder, text in files.items():
        d = root / folder.replace("__", "/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def _v1(tmp_path, quotas: dict, own="/", mount="cpu,cpuacct", period=100000):
    root = tmp_path / "v1"
    for folder, quota in quotas.items():
        d = root / mount / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"12:memory:{own}\n4:{mount}:{own}\n0::/\n")
    return root, proc


def _no_thread_env(monkeypatch) -> None:
    from medhpm.runtime.device import THREAD_ENV

    for k in THREAD_ENV:
        monkeypatch.delenv(k, raising=False)


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path):
    from medhpm.runtime.device import cpu_quota

    assert cpu_quota(*_v2(tmp_path / "a", **{"": "200000 100000"})) == 2.0  # docker --cpus 2
    assert cpu_quota(*_v2(tmp_path / "b", **{"": "max 100000"})) is None
    # nested: the smallest limit on the way up from the process's own cgroup counts
    root, proc = _v2(
        tmp_path / "c",
        own="/kubepods/pod1",
        **{"": "max 100000", "kubepods": "400000 100000", "kubepods__pod1": "150000 100000"},
    )
    assert cpu_quota(root, proc) == 1.5
    assert cpu_quota(*_v1(tmp_path / "d", {"": -1})) is None
    assert cpu_quota(*_v1(tmp_path / "e", {"": -1, "job/7": 50000}, own="/job/7")) == 0.5
    assert cpu_quota(*_v1(tmp_path / "f", {"": 300000}, mount="cpu")) == 3.0
    assert cpu_quota(tmp_path / "none", tmp_path / "none.txt") is None


def test_threads_zero_stay_within_the_quota_unless_the_user_chose(tmp_path, monkeypatch):
    from medhpm.runtime.device import configure_threads

    _no_thread_env(monkeypatch)
    one_and_a_half = _v2(tmp_path / "q", **{"": "150000 100000"})
    torch.set_num_threads(3)  # what torch chose from the cores it sees
    said = configure_threads(0, *one_and_a_half)
    assert torch.get_num_threads() == 1 and said == "the cgroup CPU quota of 1.5 CPUs (torch would use 3)"
    torch.set_num_threads(3)
    assert configure_threads(0, *_v2(tmp_path / "big", **{"": "400000 100000"})) is None
    assert torch.get_num_threads() == 3  # a quota above torch's count changes nothing
    assert configure_threads(2, *one_and_a_half) is None and torch.get_num_threads() == 2  # N pins N
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads(0, *one_and_a_half) is None and torch.get_num_threads() == 3


def test_the_trainer_says_when_the_quota_capped_its_threads(tiny_dataset, tmp_path, capsys, monkeypatch):
    import functools

    import medhpm.runtime.loop as loop
    from medhpm.runtime.device import configure_threads

    _no_thread_env(monkeypatch)
    root, proc = _v2(tmp_path, **{"": "100000 100000"})  # 1 CPU
    monkeypatch.setattr(
        loop, "configure_threads", functools.partial(configure_threads, cgroup_root=root, proc_cgroup=proc)
    )
    torch.set_num_threads(2)
    _trainer_set_up(tiny_dataset, tmp_path / "run", 0)
    assert torch.get_num_threads() == 1
    assert (
        "[pretrain] device cpu (1 thread: the cgroup CPU quota of 1 CPU (torch would use 2)), precision"
        in capsys.readouterr().out
    )


def test_a_real_cgroup_quota_caps_a_process_placed_in_it(tmp_path):
    """The kernel's own cgroup files: a child process moved into a v1 cpu cgroup limited to 1 CPU reads that
    quota and runs torch on 1 thread. Needs a writable cgroup v1 cpu hierarchy (root in a container with
    one, as on the machines here); skipped elsewhere."""
    import os
    import subprocess
    import sys

    base = "/sys/fs/cgroup/cpu"
    group = f"{base}/medhpm_test_{os.getpid()}"
    try:
        os.mkdir(group)
    except OSError as e:
        pytest.skip(f"no writable cgroup v1 cpu hierarchy here ({e})")
    try:
        with open(f"{group}/cpu.cfs_quota_us", "w") as f:
            f.write(str(int(open(f"{group}/cpu.cfs_period_us").read())))  # one CPU's worth per period
        child = (
            "import os, torch\n"
            f"open('{group}/cgroup.procs', 'w').write(str(os.getpid()))\n"
            "from medhpm.runtime.device import configure_threads, cpu_quota\n"
            "before = torch.get_num_threads()\n"
            "said = configure_threads(0)\n"
            "print(cpu_quota(), before, torch.get_num_threads(), said)\n"
        )
        from medhpm.runtime.device import THREAD_ENV

        env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
        r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        quota, before, after, *said = r.stdout.split(maxsplit=3)
        assert float(quota) == 1.0 and int(after) == 1
        assert (said != [] and "quota of 1 CPU " in said[0]) == (int(before) > 1)
    finally:
        os.rmdir(group)
