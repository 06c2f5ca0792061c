"""benchmarks/demo_step.py: one round at the demo's shapes. No timing is asserted: the variants must compute
the same step (first losses agree to bf16 rounding) and the JSON must hold a ratio and a FLOP rate for each;
its FLOP count and norm swap are checked against hand counts and MONAI's instance norm."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import demo_step  # noqa: E402
from medhpm.runtime.device import cpu_has_native_bf16  # noqa: E402


def test_demo_step_writes_ratios_of_the_same_step(tmp_path):
    # bf16 only where the CPU computes it natively (where the demo uses it): emulated it takes minutes here
    native = cpu_has_native_bf16()
    demo_step.main(["--rounds", "1", "--threads", "1", "--out", str(tmp_path)] + ([] if native else ["--no-bf16"]))
    data = json.loads((tmp_path / "demo_step_cpu.json").read_text())
    res = data["results"]
    expected = {"finetune/fp32", "finetune/channels_last", "finetune/channels_last_gn", "pretrain/fp32"}
    assert set(res) == (expected | {"finetune/bf16", "pretrain/bf16"} if native else expected)
    for stage in ("finetune", "pretrain"):
        assert res[f"{stage}/fp32"]["ratio_vs_fp32"] == 1.0
        ref = res[f"{stage}/fp32"]["first_loss"]
        assert math.isfinite(ref) and ref > 0
        for k, r in res.items():
            if k.startswith(stage):
                assert r["median_s"] > 0 and math.isfinite(r["ratio_vs_fp32"])
                assert r["gflop_per_s"] == data["gflop_per_step"][stage] / r["median_s"]
                # the same weights, inputs and function: bf16 rounds (about 3 significant digits)
                tol = 2e-2 if "bf16" in k else 1e-4
                assert abs(r["first_loss"] - ref) <= tol * abs(ref), (k, r["first_loss"], ref)
    assert isinstance(data["machine"]["native_bf16"], bool) and data["machine"]["cpu"]
    # the demo's UNETR step at 2 x 48^3 is tens of GFLOP, the pre-training step a few
    assert 20 < data["gflop_per_step"]["finetune"] < 200 and 1 < data["gflop_per_step"]["pretrain"] < 50


def test_flop_count_of_a_convolution_matches_the_hand_count():
    import torch

    from benchmarks.common import count_flops

    conv = torch.nn.Conv3d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 6, 7)
    forward = 2 * 2 * 4 * 3 * 27 * (5 * 6 * 7)  # 2 FLOP per multiply-add, batch 2, every output voxel
    # input without grad: the backward computes the weight gradient only (as much work as the forward)
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward
    xg = x.clone().requires_grad_()
    assert count_flops(lambda: conv(xg).sum().backward()) == 3 * forward


def test_group_norm_swap_keeps_the_function_and_the_channels_last_layout():
    import torch
    from monai.networks.blocks import UnetrUpBlock

    torch.manual_seed(0)
    block = UnetrUpBlock(3, 8, 4, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
    x, skip = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 4, 8, 8, 8)
    ref = block(x, skip)
    demo_step._instance_to_group_norm(block)
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in block.modules())
    cl = torch.channels_last_3d
    block = block.to(memory_format=cl)
    out = block(x.contiguous(memory_format=cl), skip.contiguous(memory_format=cl))
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()


def test_cpu_details_reads_the_first_processor_block():
    from benchmarks.common import cpu_details

    text = (
        "processor\t: 0\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\n"
        "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: avx2 avx512f avx512_bf16\n"
    )
    assert cpu_details(text) == {"cpu_family": "23", "cpu_model_number": "1", "simd": ["avx2"]}
    zen4 = text.split("\n\n")[1]
    assert cpu_details(zen4)["simd"] == ["avx2", "avx512f", "avx512_bf16"]


def test_variant_names_keep_the_baseline_and_refuse_unknown_parts():
    import pytest

    names = demo_step.finetune_variant_names
    assert names() == ["fp32", "bf16", "channels_last", "channels_last_gn"]
    assert names(compile=True, no_bf16=True) == ["fp32", "channels_last", "channels_last_gn", "compile"]
    # a chosen list: the baseline first, once; duplicates and spaces dropped; --no-bf16 still applies
    assert names("bf16, channels_last+bf16,fp32,bf16") == ["fp32", "bf16", "channels_last+bf16"]
    assert names("compile+bf16,channels_last", no_bf16=True) == ["fp32", "channels_last"]
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['channel_last'\]"):
        names("bf16,channel_last+bf16")
    with pytest.raises(SystemExit):  # the command line says so before building anything
        demo_step.main(["--variants", "fp16"])
