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


def test_the_trainer_pins_what_it_is_told_and_says_so(tiny_dataset, tmp_path, capsys):
    from runtime_helpers import tiny_overrides

    from medhpm.pretrain.trainer import PretrainTrainer

    torch.set_num_threads(1)
    cfg = load_config("demo", tiny_overrides(tiny_dataset, "runtime.threads=2", "runtime.device=cpu"))
    t = PretrainTrainer(cfg, tmp_path / "run")
    t.setup()
    t.logger.close()
    assert torch.get_num_threads() == 2
    assert "[pretrain] device cpu (2 threads), precision" in capsys.readouterr().out
