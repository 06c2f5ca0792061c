"""``runtime.distributed.unwrap``: the one unwrapping helper of the trainers and the EMA teacher."""

from __future__ import annotations

import torch
from torch import nn

from medhpm.runtime.distributed import unwrap


def test_unwrap_strips_data_parallel_and_compile_in_any_nesting():
    net = nn.Linear(3, 2)
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(net)) is net
    compiled = torch.compile(net)  # wrapping only: nothing is compiled before the first call
    assert compiled is not net and unwrap(compiled) is net
    assert unwrap(torch.compile(nn.DataParallel(net))) is net
    assert list(unwrap(torch.compile(net)).state_dict()) == ["weight", "bias"]  # no _orig_mod. prefix


def test_unwrap_keeps_a_module_that_merely_has_a_module_attribute():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)  # a child named "module" is not a wrapper

    h = Holder()
    assert unwrap(h) is h
