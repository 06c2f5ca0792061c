"""Benchmark 1: one pre-training step, ``hpm`` against ``mae``, per encoder size.

A step is what ``PretrainTrainer`` does per optimizer step: ``pretrain_iteration`` (for hpm with
alpha > 0 the EMA teacher's pass over the full volume, hard-patch mask, student forward, L_rec and
L_pred), backward, gradient-norm clipping (5.0), AdamW step over the trainer's weight-decay groups,
``zero_grad``, and for hpm the EMA update of the teacher. Precision as the trainer: bf16 autocast on
CUDA, fp32 on CPU.

Variants per encoder: ``mae``; ``hpm_a0.5`` (alpha 0.5, the end of the curriculum: teacher pass and
81 of 162 masked patches mined); ``hpm_a0`` (alpha 0, start of the curriculum: no teacher pass, but the
loss predictor and L_pred run); and two prototypes of a proposed fix, ``mae_fused`` and
``hpm_a0.5_fused``: the same steps with ``torch.optim.AdamW(..., fused=True)``.
"""

from __future__ import annotations

import time
import warnings

import torch

from benchmarks.common import (
    Case,
    Context,
    PhaseTimer,
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

NAME = "pretrain_step"
TITLE = "Pre-training step: hpm vs mae"
MODULE = "benchmarks.pretrain_step"

SIZES = {
    # models: encoder presets; decoder: (width, depth, heads) of the reconstructor and the predictor;
    # prototype_models: the presets that also run the fused-AdamW prototypes
    "smoke": dict(models=("micro",), prototype_models=("micro",), roi=32, batch=1, decoder=(96, 1, 4), repeats=2,
                  warmup=1),
    "cpu": dict(models=("tiny", "base"), prototype_models=("base",), roi=96, batch=2, decoder=(384, 8, 12),
                repeats=4, warmup=1),
    "paper": dict(models=("tiny", "base"), prototype_models=("tiny", "base"), roi=96, batch=4,
                  decoder=(384, 8, 12), repeats=10, warmup=3),
}
VARIANTS = {
    # name: (method, alpha, fused AdamW)
    "mae": ("mae", 0.0, False),
    "hpm_a0.5": ("hpm", 0.5, False),
    "hpm_a0": ("hpm", 0.0, False),
    "mae_fused": ("mae", 0.0, True),
    "hpm_a0.5_fused": ("hpm", 0.5, True),
}
MEMORY_VARIANTS = ("mae", "hpm_a0.5", "hpm_a0")
MASK_RATIO = 0.75
LAMBDA_PRED = 1.0
CLIP = 5.0


def _cfg(spec: dict):
    from medhpm.config import load_config

    d = spec["decoder"]
    roi = spec["roi"]
    return load_config("demo", [
        f"model.preset={spec['preset']}", f"data.roi=[{roi},{roi},{roi}]", "model.patch_size=16",
        f"model.decoder_dim={d[0]}", f"model.decoder_depth={d[1]}", f"model.decoder_heads={d[2]}",
        f"pretrain.method={spec['method']}", "pretrain.batch_size=" + str(spec["batch"]),
    ])


def build_case(spec: dict, device: str) -> Case:
    """spec: preset, roi, batch, decoder, method, alpha, fused."""
    from medhpm.pretrain.ema import momentum_at
    from medhpm.pretrain.trainer import METHOD_SWITCHES, build_pretrain_model, make_teacher, pretrain_iteration
    from medhpm.runtime.param_groups import param_groups_weight_decay

    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    seeded(0)
    cfg = _cfg(spec)
    p = cfg.pretrain
    use_pred, use_teacher = METHOD_SWITCHES[p.method]
    model = build_pretrain_model(cfg).to(device).train()
    teacher = make_teacher(model).to(device) if use_teacher else None
    groups = param_groups_weight_decay(model, p.lr, p.weight_decay)
    opt = torch.optim.AdamW(groups, lr=p.lr, betas=tuple(p.betas), fused=bool(spec.get("fused")) or None)
    params = [q for q in model.parameters() if q.requires_grad]
    roi, b = spec["roi"], spec["batch"]
    x = torch.rand(b, 1, roi, roi, roi, device=device)
    alpha = float(spec["alpha"])
    momentum = momentum_at(50, 100, p.ema_horizon_start, p.ema_horizon_end, p.ema_ramp)  # any value: the cost is the same
    case = Case(step=lambda: None, info={"params": sum(q.numel() for q in params)})

    if teacher is not None:  # time the teacher pass inside pretrain_iteration (instance-level wrapper)
        inner = teacher.model.predict_difficulty

        def timed_teacher(xx):
            t0 = time.perf_counter()
            out = inner(xx)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            case.phases.setdefault("teacher_pass", []).append(time.perf_counter() - t0)
            return out

        teacher.model.predict_difficulty = timed_teacher

    def forward():
        with amp_context(device):
            loss, _ = pretrain_iteration(model, teacher, x, alpha=alpha, mask_ratio=MASK_RATIO,
                                         lambda_pred=LAMBDA_PRED, use_pred=use_pred)
        return loss.float()

    def step():
        t = PhaseTimer(case.phases, device)
        loss = forward()
        t.mark("forward")
        loss.backward()
        t.mark("backward")
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.mark("optimizer")
        if teacher is not None:
            teacher.update(model, momentum)
            t.mark("ema")

    case.step = step
    return case


def run(ctx: Context) -> dict:
    started = time.time()
    s = SIZES[ctx.size]
    repeats, warmup = ctx.reps({k: v["repeats"] for k, v in SIZES.items()}), ctx.warm(
        {k: v["warmup"] for k, v in SIZES.items()})
    results, ratios, timings_all = {}, [], {}
    for preset in s["models"]:
        specs = {
            name: dict(preset=preset, roi=s["roi"], batch=s["batch"], decoder=list(s["decoder"]), method=m,
                       alpha=a, fused=f)
            for name, (m, a, f) in VARIANTS.items() if preset in s["prototype_models"] or not f
        }
        ctx.log(f"{NAME}: {preset}, ROI {s['roi']}^3, batch {s['batch']}, {repeats} repeats")
        cases = {name: build_case(spec, ctx.device) for name, spec in specs.items()}
        count_case_flops(ctx, cases)
        timings = time_interleaved(cases, repeats, warmup, ctx.device, log=ctx.log)
        res = {name: {"model": preset, "variant": name, "spec": specs[name], **timings[name],
                      "params": cases[name].info["params"]} for name in cases}
        add_flops(ctx, cases, timings, res)
        del cases
        for name in MEMORY_VARIANTS:
            ctx.log(f"  memory probe {preset} {name}")
            res[name]["memory"] = measure_memory(ctx, MODULE, specs[name])
        for name, r in res.items():
            results[f"{preset}/{name}"] = r
            timings_all[f"{preset}/{name}"] = r
        for num, den, target, what in (
            ("hpm_a0.5", "mae", 1.1, "hpm step (teacher pass, alpha 0.5) / mae step; the paper claims < 1.1"),
            ("hpm_a0", "mae", None, "hpm step at alpha 0 (no teacher pass) / mae step"),
            ("mae_fused", "mae", None, "proposed fix: fused AdamW / the trainer's AdamW, mae step"),
            ("hpm_a0.5_fused", "hpm_a0.5", None, "proposed fix: fused AdamW / the trainer's AdamW, hpm step"),
        ):
            if f"{preset}/{num}" not in results:
                continue
            e = ratio_entry(f"{preset}: {num} / {den}", f"{preset}/{num}", f"{preset}/{den}", timings_all,
                            target=target, what=what)
            fa, fb = results[f"{preset}/{num}"].get("flops_per_step"), results[f"{preset}/{den}"].get("flops_per_step")
            e["flop_ratio"] = fa / fb if fa and fb else None
            ratios.append(e)
    payload = {
        "title": TITLE,
        "measures": __doc__.strip().split("\n\n", 1)[1],
        "settings": {**{k: v for k, v in s.items() if k not in ("repeats", "warmup")}, "repeats": repeats,
                     "warmup": warmup, "mask_ratio": MASK_RATIO, "lambda_pred": LAMBDA_PRED, "clip_grad": CLIP,
                     "precision": amp_name(ctx.device), "optimizer": "AdamW (0.9, 0.95), weight-decay groups",
                     "memory_variants": list(MEMORY_VARIANTS)},
        "results": results,
        "ratios": ratios,
    }
    write_result(ctx, NAME, payload, started)
    return payload
