"""Benchmark 3: our UNETR training step against MONAI's ``UNETR`` at one configuration.

Identical: ViT width, depth (12), heads, MLP (4x width), qkv bias (on), patch 16 with a Conv3d embedding,
learnable position embedding, no dropout and no drop path (ours is built with ``drop_path=0``; MONAI's
UNETR has none), the same MONAI decoder blocks (feature size, instance norm, residual and conv blocks),
output classes, ROI and batch; loss ``DiceCELoss(to_onehot_y=True, softmax=True)`` on float32 logits as
in the fine-tuning trainer; plain AdamW (0.9, 0.999), weight decay 0.05, over every trainable parameter;
gradient clipping 1.0; precision bf16 autocast on CUDA, fp32 on CPU. A step = forward, loss, backward,
clip, AdamW step, zero_grad.

Known differences that do not change the work: our skips come from blocks 3, 6, 9 (paper), MONAI's
from blocks 4, 7, 10 (all 12 blocks run either way); MONAI's blocks carry an unused cross-attention
LayerNorm (no gradient, skipped by AdamW); MONAI computes attention with einsum + softmax, ours with
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import (
    Case,
    Context,
    add_flops,
    amp_context,
    amp_name,
    count_case_flops,
    measure_memory,
    ratio_entry,
    seeded,
    time_interleaved,
    write_result,
)

NAME = "unetr_vs_monai"
TITLE = "UNETR training step: ours vs MONAI UNETR"
MODULE = "benchmarks.unetr_vs_monai"

SIZES = {
    "smoke": dict(preset="micro", roi=32, batch=1, feature_size=8, classes=3, repeats=2, warmup=1),
    "cpu": dict(preset="base", roi=96, batch=1, feature_size=16, classes=14, repeats=3, warmup=1),
    "paper": dict(preset="base", roi=96, batch=4, feature_size=16, classes=14, repeats=10, warmup=3),
}
IMPLS = ("ours", "monai")
LR, BETAS, WD, CLIP = 8e-4, (0.9, 0.999), 0.05, 1.0


def build_model(spec: dict, device: str) -> torch.nn.Module:
    """Our or MONAI's UNETR for ``spec`` (impl, preset, roi, feature_size, classes)."""
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
    """spec: impl, preset, roi, batch, feature_size, classes."""
    from monai.losses import DiceCELoss

    seeded(0)
    model = build_model(spec, device).train()
    roi, b = spec["roi"], spec["batch"]
    x = torch.rand(b, 1, roi, roi, roi, device=device)
    y = torch.randint(0, spec["classes"], (b, 1, roi, roi, roi), device=device).float()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD)

    def loss():
        with amp_context(device):
            logits = model(x)
        return loss_fn(logits.float(), y)

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Case(step=step, info={"params": sum(p.numel() for p in params)})


def run(ctx: Context) -> dict:
    started = time.time()
    s = SIZES[ctx.size]
    repeats = ctx.reps({k: v["repeats"] for k, v in SIZES.items()})
    warmup = ctx.warm({k: v["warmup"] for k, v in SIZES.items()})
    keys = ("preset", "roi", "batch", "feature_size", "classes")
    specs = {impl: dict(impl=impl, **{k: s[k] for k in keys}) for impl in IMPLS}
    ctx.log(f"{NAME}: {s['preset']}, ROI {s['roi']}^3, batch {s['batch']}, {repeats} repeats")
    cases = {impl: build_case(spec, ctx.device) for impl, spec in specs.items()}
    count_case_flops(ctx, cases)
    timings = time_interleaved(cases, repeats, warmup, ctx.device, log=ctx.log)
    results = {
        impl: {
            "model": s["preset"],
            "variant": impl,
            "spec": specs[impl],
            **timings[impl],
            "params": cases[impl].info["params"],
        }
        for impl in IMPLS
    }
    add_flops(ctx, cases, timings, results)
    del cases
    for impl in IMPLS:
        ctx.log(f"  memory probe {impl}")
        results[impl]["memory"] = measure_memory(ctx, MODULE, specs[impl])
    e = ratio_entry(
        "ours / monai",
        "ours",
        "monai",
        results,
        target=1.0,
        what="our UNETR training step / MONAI UNETR training step (target <= 1.0)",
    )
    fa, fb = results["ours"].get("flops_per_step"), results["monai"].get("flops_per_step")
    e["flop_ratio"] = fa / fb if fa and fb else None
    payload = {
        "title": TITLE,
        "measures": __doc__.strip().split("\n\n", 1)[1],
        "settings": {
            **{k: s[k] for k in keys},
            "repeats": repeats,
            "warmup": warmup,
            "precision": amp_name(ctx.device),
            "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
            "optimizer": f"AdamW lr {LR}, betas {BETAS}, wd {WD}",
            "clip_grad": CLIP,
            "norm": "instance",
            "qkv_bias": True,
            "drop_path": 0.0,
        },
        "results": results,
        "ratios": [e],
    }
    write_result(ctx, NAME, payload, started)
    return payload
