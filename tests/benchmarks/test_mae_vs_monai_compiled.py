"""``python -m benchmarks --only mae_vs_monai --compile``: the compiled variants run the same step as their
eager counterparts. Built at the smoke size with torch.compile's ``eager`` backend (dynamo's capture, no
code generation: seconds instead of inductor's minutes), so both draw the same random numbers and one
optimizer step must leave the same weights; the capture must actually have happened."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.mae_vs_monai import SIZES, build_case  # noqa: E402


@pytest.mark.parametrize("eager_impl", ["ours", "monai"])
def test_compiled_variant_steps_like_the_eager_one(eager_impl):
    from torch._dynamo.utils import counters

    s = SIZES["smoke"]
    spec = dict(preset=s["preset"], roi=s["roi"], batch=s["batch"], decoder=list(s["decoder"]), backend="eager")
    torch.set_num_threads(1)
    eager = build_case(dict(spec, impl=eager_impl), "cpu")
    before = {k: v.detach().clone() for k, v in eager.info["model"].state_dict().items()}
    eager.step()
    compiled = build_case(dict(spec, impl=f"{eager_impl}_compiled"), "cpu")
    graphs = counters["stats"]["unique_graphs"]
    compiled.step()
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was captured"
    a, b = eager.info["model"].state_dict(), compiled.info["model"].state_dict()
    assert a.keys() == b.keys() == before.keys()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], before[k])]
    assert len(moved) > len(a) // 2, "the eager step moved few weights"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), f"{eager_impl}: {k} differs after one step"
