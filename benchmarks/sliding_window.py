"""Benchmark 4: sliding-window prediction of one CT-sized volume, ours against plain MONAI.

Ours: ``medhpm.segment.predict.Predictor._infer`` (the core of every prediction: MONAI's
``sliding_window_inference`` over our UNETR, gaussian blending, output gathered on the CPU, softmax)
on an already preprocessed ``(1, H, W, D)`` volume. Baseline: ``sliding_window_inference`` of MONAI's
``UNETR`` at the identical configuration (``build_model`` below) with the same ROI, overlap (0.5),
window batch (4), blending (gaussian), output device (CPU), precision (bf16 autocast on CUDA, fp32 on
CPU) and the same softmax afterwards. Weights are random (speed does not depend on them); the
preprocessing and the inversion to the scan's geometry are not timed.

The paper-size volume is 512 x 512 x 150 voxels; the CPU size uses a smaller volume so that the whole
suite fits its 10-minute budget (the size used is recorded with the results). Memory: peak RSS of a
fresh process (the full-volume probability map lives on the CPU: classes x H x W x D float32, plus MONAI's
weight map), and on CUDA the peak of allocated GPU memory.
"""

from __future__ import annotations

import math
import time

import torch

from benchmarks.common import (
    Case,
    Context,
    amp_context,
    amp_name,
    measure_memory,
    ratio_entry,
    seeded,
    time_interleaved,
    write_result,
)

NAME = "sliding_window"
TITLE = "Sliding-window prediction of one volume"
MODULE = "benchmarks.sliding_window"

SIZES = {
    "smoke": dict(preset="micro", roi=32, volume=(48, 40, 36), feature_size=8, classes=3, repeats=2, warmup=0),
    "cpu": dict(preset="base", roi=96, volume=(192, 144, 96), feature_size=16, classes=14, repeats=2, warmup=0),
    "paper": dict(preset="base", roi=96, volume=(512, 512, 150), feature_size=16, classes=14, repeats=3, warmup=1),
}
IMPLS = ("ours", "monai")
OVERLAP, SW_BATCH, BLEND = 0.5, 4, "gaussian"


def n_windows(volume, roi, overlap) -> int:
    """Window count of MONAI's scan (per axis ``ceil((size - roi) / (roi * (1 - overlap))) + 1``)."""
    n = 1
    for v in volume:
        step = max(int(roi * (1 - overlap)), 1)
        n *= 1 if v <= roi else math.ceil((v - roi) / step) + 1
    return n


def build_model(spec: dict, device: str) -> torch.nn.Module:
    """Our or MONAI's UNETR for ``spec`` (impl, preset, roi, feature_size, classes), configured alike: ViT width,
    depth (12), heads, MLP (4x width), qkv bias, patch 16 with a Conv3d embedding, learnable position embedding,
    no dropout or drop path, the same MONAI decoder blocks (instance norm, residual and conv blocks). Our skips
    come from blocks 3, 6, 9, MONAI's from 4, 7, 10 (all 12 blocks run either way); attention is SDPA in ours,
    einsum + softmax in MONAI's. (Kept from the retired ``benchmarks/unetr_vs_monai.py``, which timed the
    training step of these two; docs/PERFORMANCE.md.)"""
    from medhpm.models.vit import PRESETS

    enc = PRESETS[spec["preset"]]
    roi = spec["roi"]
    if spec["impl"] == "ours":
        from medhpm.models.unetr import build_unetr

        model = build_unetr(
            dict(img_size=[roi] * 3, patch_size=16, in_chans=1, **enc),
            out_channels=spec["classes"],
            feature_size=spec["feature_size"],
            drop_path=0.0,
            norm_name="instance",
        )
    else:
        from monai.networks.nets import UNETR

        model = UNETR(
            in_channels=1,
            out_channels=spec["classes"],
            img_size=(roi,) * 3,
            feature_size=spec["feature_size"],
            hidden_size=enc["embed_dim"],
            mlp_dim=4 * enc["embed_dim"],
            num_heads=enc["num_heads"],
            proj_type="conv",
            norm_name="instance",
            conv_block=True,
            res_block=True,
            dropout_rate=0.0,
            qkv_bias=True,
        )
        if enc["depth"] != model.num_layers:
            raise ValueError(f"MONAI's UNETR has {model.num_layers} blocks; preset {spec['preset']} has {enc['depth']}")
    return model.to(device)


def build_case(spec: dict, device: str) -> Case:
    """spec: impl, preset, roi, volume, feature_size, classes."""
    seeded(0)
    model = build_model(spec, device).eval()
    roi = spec["roi"]
    image = torch.rand(1, *spec["volume"])  # preprocessed image (1, H, W, D) on the CPU, as after the transforms
    if spec["impl"] == "ours":
        from medhpm.config import load_config
        from medhpm.segment.predict import Predictor

        cfg = load_config("demo", [f"data.roi=[{roi},{roi},{roi}]", "model.patch_size=16"])
        predictor = Predictor(
            model, cfg, device=device, overlap=OVERLAP, blend=BLEND, sw_batch_size=SW_BATCH, output_on_cpu=True
        )

        def step():
            return predictor._infer(image)
    else:
        from monai.inferers import sliding_window_inference

        dev = torch.device(device)

        @torch.no_grad()
        def step():
            x = image[None].to(dev)
            with amp_context(dev):
                logits = sliding_window_inference(
                    x,
                    (roi,) * 3,
                    SW_BATCH,
                    model,
                    overlap=OVERLAP,
                    mode=BLEND,
                    sw_device=dev,
                    device=torch.device("cpu"),
                )
            return torch.softmax(logits.float(), dim=1)[0]

    return Case(step=step, info={"params": sum(p.numel() for p in model.parameters())})


def run(ctx: Context) -> dict:
    started = time.time()
    s = SIZES[ctx.size]
    repeats = ctx.reps({k: v["repeats"] for k, v in SIZES.items()})
    warmup = ctx.warm({k: v["warmup"] for k, v in SIZES.items()}, flops_warm=False)
    keys = ("preset", "roi", "volume", "feature_size", "classes")
    specs = {impl: dict(impl=impl, **{k: (list(s[k]) if k == "volume" else s[k]) for k in keys}) for impl in IMPLS}
    windows = n_windows(s["volume"], s["roi"], OVERLAP)
    ctx.log(f"{NAME}: {s['preset']}, volume {s['volume']}, ROI {s['roi']}^3, {windows} windows, {repeats} repeats")
    cases = {impl: build_case(spec, ctx.device) for impl, spec in specs.items()}
    timings = time_interleaved(cases, repeats, warmup, ctx.device, log=ctx.log)
    results = {
        impl: {
            "model": s["preset"],
            "variant": impl,
            "spec": specs[impl],
            **timings[impl],
            "params": cases[impl].info["params"],
            "windows_per_s": windows / timings[impl]["wall_s"]["median"],
        }
        for impl in IMPLS
    }
    del cases
    for impl in IMPLS:
        ctx.log(f"  memory probe {impl}")
        results[impl]["memory"] = measure_memory(ctx, MODULE, specs[impl], steps=1)
    e = ratio_entry(
        "ours / monai",
        "ours",
        "monai",
        results,
        target=None,
        what="Predictor sliding window (our UNETR) / plain MONAI sliding_window_inference (MONAI UNETR)",
    )
    payload = {
        "title": TITLE,
        "measures": __doc__.strip().split("\n\n", 1)[1],
        "settings": {
            **{k: s[k] for k in keys},
            "windows": windows,
            "overlap": OVERLAP,
            "sw_batch_size": SW_BATCH,
            "blend": BLEND,
            "output_device": "cpu",
            "repeats": repeats,
            "warmup": warmup,
            "precision": amp_name(ctx.device),
            "paper_volume": list(SIZES["paper"]["volume"]),
            "reduced_volume": list(s["volume"]) != list(SIZES["paper"]["volume"]),
        },
        "results": results,
        "ratios": [e],
    }
    write_result(ctx, NAME, payload, started)
    return payload
