"""runtime.precision: which autocast dtype the trainers and the predictor use on each device."""

from __future__ import annotations

import pytest
import torch

from medhpm.config import load_config
from medhpm.runtime import device as dev

# abridged /proc/cpuinfo texts: the flags line is what counts
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
NO_FLAGS = "processor\t: 0\nmodel name\t: something avx512_bf16 in a name\n"  # only the flags line counts


@pytest.mark.parametrize(
    "text, native", [(ZEN4, True), (SKYLAKE, False), (SAPPHIRE, True), (NO_FLAGS, False), ("", False)]
)
def test_native_bf16_read_from_the_flags_line(text, native):
    assert dev.cpu_has_native_bf16(text) is native


@pytest.mark.parametrize("native", [True, False])
def test_bf16_native_follows_the_cpu_and_prediction_stays_float32(monkeypatch, native):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dev.autocast_dtype(cpu, "bf16-native") == (torch.bfloat16 if native else None)
    assert dev.autocast_dtype(cuda, "bf16-native") == torch.bfloat16
    # prediction: bf16-native is a training setting, the CPU predicts in float32 as auto does
    assert dev.inference_dtype(cpu, "bf16-native") is None
    assert dev.inference_dtype(cuda, "bf16-native") == torch.bfloat16
    # the other values are unchanged by the CPU's flags
    assert dev.autocast_dtype(cpu, "auto") is None and dev.autocast_dtype(cpu, "fp32") is None
    assert dev.autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert dev.inference_dtype(cpu, "bf16") == torch.bfloat16


def test_an_unknown_precision_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"runtime\.precision.*'bf17'.*bf16-native"):
        load_config("demo", ["runtime.precision=bf17"])
    assert load_config("demo", ["runtime.precision=bf16-native"]).runtime.precision == "bf16-native"
