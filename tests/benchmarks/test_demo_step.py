"""benchmarks/demo_step.py: one round at the demo's shapes. No timing is asserted: the variants must compute
the same step (first losses agree to bf16 rounding) and the JSON must hold a ratio for each."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import demo_step  # noqa: E402


def test_demo_step_writes_ratios_of_the_same_step(tmp_path):
    demo_step.main(["--rounds", "1", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "demo_step_cpu.json").read_text())
    res = data["results"]
    assert set(res) == {"finetune/fp32", "finetune/bf16", "finetune/channels_last", "pretrain/fp32", "pretrain/bf16"}
    for stage in ("finetune", "pretrain"):
        assert res[f"{stage}/fp32"]["ratio_vs_fp32"] == 1.0
        ref = res[f"{stage}/fp32"]["first_loss"]
        assert math.isfinite(ref) and ref > 0
        for k, r in res.items():
            if k.startswith(stage):
                assert r["median_s"] > 0 and math.isfinite(r["ratio_vs_fp32"])
                # the same weights, inputs and function: bf16 rounds (about 3 significant digits)
                tol = 2e-2 if "bf16" in k else 1e-4
                assert abs(r["first_loss"] - ref) <= tol * abs(ref), (k, r["first_loss"], ref)
    assert isinstance(data["machine"]["native_bf16"], bool) and data["machine"]["cpu"]
