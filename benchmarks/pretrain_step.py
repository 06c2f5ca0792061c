"""Benchmark 1: one pre-training step, ``hpm`` against ``mae``, per encoder size.

A step is what ``PretrainTrainer`` does per optimizer step, from the product's own functions
(``medhpm.pretrain.step``): the mask's uniform ranks (and, for the masked teacher view, the view
partition's ranks) drawn from a generator re-seeded each step, as the trainer's ``step_noise``; for hpm
with alpha > 0 the EMA teacher's scores (``teacher_scores``, no gradient, timed as its own phase
``teacher_pass``), then ``step_core(..., scores=scores)`` (hard-patch mask, student forward, L_rec and
L_pred); without a teacher pass (mae, alpha 0) ``pretrain_iteration``; then backward, gradient-norm
clipping (5.0), AdamW step over the trainer's weight-decay groups, ``zero_grad``, and for hpm the EMA
update of the teacher. Precision as the trainer: bf16 autocast on CUDA, fp32 on CPU (the teacher always
scores in fp32).

Variants per encoder: ``mae``; ``hpm_a0.5`` (alpha 0.5, the end of the curriculum; the teacher scores
the full volume, ``pretrain.teacher_view=full``, the paper's way; at 216 tokens 81 of the 162 masked
patches are mined); ``hpm_a0.5_masked`` (the same with ``pretrain.teacher_view=masked``, the default:
V = 4 complementary masked views per crop run as ONE batched pass of B*V sequences, the encoder on N/V
visible tokens of each, the loss predictor over all N positions of each); ``hpm_a0`` (alpha 0, start of
the curriculum: no teacher pass, but the loss predictor and L_pred run); ``teacher_full`` and
``teacher_masked``: the teacher pass alone (``teacher_scores``), for its time and FLOPs apart from the
step. The variants above step torch's default AdamW; ``mae_fused``, ``hpm_a0.5_fused`` and
``hpm_a0.5_masked_fused`` (at the sizes' ``prototype_models``) are the same steps with
``torch.optim.AdamW(..., fused=True)``, the optimizer the trainer uses since fix 1
(``runtime/loop.py``: CUDA, or a CPU with torch >= 2.4). Sizes: ``demo`` is the demo's model
(``configs/demo.yaml``: tiny ViT, patch 8, 48^3 crops, 216 tokens, decoder 96 wide and 2 deep, batch 4);
``cpu`` and ``paper`` tiny and ViT-B/16 at 96^3 (216 tokens, decoder 384 wide and 8 deep).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    Case,
    Context,
    PhaseTimer,
    add_flops,
    amp_context,
    amp_name,
    apply_threads,
    count_case_flops,
    measure_memory,
    ratio_entry,
    seeded,
    summarize,
    sync,
    time_interleaved,
    write_result,
)

NAME = "pretrain_step"
TITLE = "Pre-training step: hpm vs mae"
MODULE = "benchmarks.pretrain_step"

SIZES = {
    # models: encoder presets; patch: patch size; decoder: (width, depth, heads) of the reconstructor and the
    # predictor; prototype_models: the presets that also run the fused-AdamW variants
    "smoke": dict(
        models=("micro",),
        prototype_models=("micro",),
        roi=32,
        patch=16,
        batch=1,
        decoder=(96, 1, 4),
        repeats=2,
        warmup=1,
    ),
    "demo": dict(
        models=("tiny",), prototype_models=("tiny",), roi=48, patch=8, batch=4, decoder=(96, 2, 4), repeats=12, warmup=2
    ),
    "cpu": dict(
        models=("tiny", "base"),
        prototype_models=("base",),
        roi=96,
        patch=16,
        batch=2,
        decoder=(384, 8, 12),
        repeats=4,
        warmup=1,
    ),
    "paper": dict(
        models=("tiny", "base"),
        prototype_models=("tiny", "base"),
        roi=96,
        patch=16,
        batch=4,
        decoder=(384, 8, 12),
        repeats=10,
        warmup=3,
    ),
}
VARIANTS = {
    # name: (method, alpha, fused AdamW, teacher view, part: "step" (the whole step) or "teacher" (its pass alone))
    "mae": ("mae", 0.0, False, "full", "step"),
    "hpm_a0.5": ("hpm", 0.5, False, "full", "step"),
    "hpm_a0.5_masked": ("hpm", 0.5, False, "masked", "step"),
    "hpm_a0": ("hpm", 0.0, False, "full", "step"),
    "teacher_full": ("hpm", 0.5, False, "full", "teacher"),
    "teacher_masked": ("hpm", 0.5, False, "masked", "teacher"),
    "mae_fused": ("mae", 0.0, True, "full", "step"),
    "hpm_a0.5_fused": ("hpm", 0.5, True, "full", "step"),
    "hpm_a0.5_masked_fused": ("hpm", 0.5, True, "masked", "step"),
}
MEMORY_VARIANTS = ("mae", "hpm_a0.5", "hpm_a0.5_masked", "hpm_a0")
MASK_RATIO = 0.75
LAMBDA_PRED = 1.0
CLIP = 5.0
RATIOS = (
    # numerator, denominator, target, what
    (
        "hpm_a0.5",
        "mae",
        1.1,
        "hpm step (teacher pass over the full volume, alpha 0.5) / mae step; the paper claims < 1.1",
    ),
    ("hpm_a0", "mae", None, "hpm step at alpha 0 (no teacher pass) / mae step"),
    ("mae_fused", "mae", None, "fused AdamW (the trainer's since fix 1) / torch's default AdamW, mae step"),
    ("hpm_a0.5_fused", "hpm_a0.5", None, "fused AdamW (the trainer's since fix 1) / torch's default AdamW, hpm step"),
    ("hpm_a0.5_masked", "mae", None, "hpm step, teacher from V masked views (the default), alpha 0.5 / mae step"),
    ("hpm_a0.5_masked", "hpm_a0.5", None, "hpm step, teacher from V masked views / from the full volume"),
    ("teacher_masked", "teacher_full", None, "the teacher pass alone, V masked views / the full volume"),
    ("hpm_a0.5_masked_fused", "mae_fused", None, "the trainer's steps (fused AdamW): hpm, masked teacher view / mae"),
    ("hpm_a0.5_masked_fused", "hpm_a0.5_fused", None, "fused AdamW: hpm step, masked teacher view / full"),
)
# ratios of one phase of two step variants (from the phase times of the same rounds)
PHASE_RATIOS = (
    (
        "teacher_pass",
        "hpm_a0.5_masked",
        "hpm_a0.5",
        "teacher_masked",
        "teacher_full",
        "the teacher pass inside the hpm step (phase times), V masked views / the full volume",
    ),
)


def _cfg(spec: dict):
    from medhpm.config import load_config

    d = spec["decoder"]
    roi = spec["roi"]
    return load_config(
        "demo",
        [
            f"model.preset={spec['preset']}",
            f"data.roi=[{roi},{roi},{roi}]",
            f"model.patch_size={spec.get('patch', 16)}",
            f"model.decoder_dim={d[0]}",
            f"model.decoder_depth={d[1]}",
            f"model.decoder_heads={d[2]}",
            f"pretrain.method={spec['method']}",
            "pretrain.batch_size=" + str(spec["batch"]),
            f"pretrain.mask_ratio={MASK_RATIO}",
            f"pretrain.teacher_view={spec.get('view', 'full')}",
        ],
    )


def build_case(spec: dict, device: str) -> Case:
    """spec: preset, roi, patch (default 16), batch, decoder, method, alpha, fused, view (full | masked, default
    full), part (step | teacher, default step)."""
    from medhpm.pretrain.ema import momentum_at
    from medhpm.pretrain.masking import num_hard, num_masked
    from medhpm.pretrain.step import pretrain_iteration, step_core, teacher_scores, teacher_views_used
    from medhpm.pretrain.trainer import METHOD_SWITCHES, build_pretrain_model, make_teacher
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
    n_tokens = model.encoder.num_patches
    n_hard = num_hard(alpha, num_masked(n_tokens, MASK_RATIO)) if teacher is not None else 0
    n_hard_t = torch.tensor(n_hard, device=device) if n_hard else None  # made once, as the trainer caches it
    view = p.teacher_view
    views = teacher_views_used(view, p.teacher_views, MASK_RATIO)
    # any momentum: the cost is the same
    momentum = momentum_at(50, 100, p.ema_horizon_start, p.ema_horizon_end, p.ema_ramp)
    gen = torch.Generator(device=device)
    step_no = [0]
    case = Case(step=lambda: None, info={"params": sum(q.numel() for q in params), "teacher_views": views})

    def draw():
        """The trainer's ``step_noise``: the mask's ranks first, then the view partition's (masked view only)."""
        step_no[0] += 1
        gen.manual_seed(step_no[0])
        noise = torch.rand(b, n_tokens, generator=gen, device=device)
        view_noise = (
            torch.rand(b, n_tokens, generator=gen, device=device) if teacher is not None and view == "masked" else None
        )
        return noise, view_noise

    def scores_of(view_noise):  # the teacher pass, timed as its own phase
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():  # as step_core runs it
            scores = teacher_scores(teacher, x, view, views, view_noise)
        sync(device)
        case.phases.setdefault("teacher_pass", []).append(time.perf_counter() - t0)
        return scores

    if spec.get("part", "step") == "teacher":

        def teacher_only():
            _, view_noise = draw()
            with amp_context(device):
                return scores_of(view_noise)

        case.step = teacher_only
        return case

    def forward():
        noise, view_noise = draw()
        with amp_context(device):
            if n_hard:  # pretrain_iteration's call of step_core, with the teacher's scores made apart
                scores = scores_of(view_noise)
                loss, _ = step_core(
                    model,
                    teacher,
                    x,
                    noise,
                    n_hard_t,
                    MASK_RATIO,
                    LAMBDA_PRED,
                    use_pred,
                    view,
                    views,
                    view_noise,
                    scores=scores,
                )
            else:  # no teacher pass (mae, or alpha 0)
                loss, _ = pretrain_iteration(
                    model,
                    teacher,
                    x,
                    alpha=alpha,
                    mask_ratio=MASK_RATIO,
                    lambda_pred=LAMBDA_PRED,
                    use_pred=use_pred,
                    noise=noise,
                    view=view,
                    views=views,
                    view_noise=view_noise,
                )
        return loss.float()

    def step():
        t = PhaseTimer(case.phases, device)
        loss = forward()
        t.mark("forward")  # includes the teacher pass
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


def _flop_ratio(results: dict, num: str, den: str) -> float | None:
    fa, fb = results.get(num, {}).get("flops_per_step"), results.get(den, {}).get("flops_per_step")
    return fa / fb if fa and fb else None


def run(ctx: Context) -> dict:
    started = time.time()
    s = SIZES[ctx.size]
    repeats, warmup = (
        ctx.reps({k: v["repeats"] for k, v in SIZES.items()}),
        ctx.warm({k: v["warmup"] for k, v in SIZES.items()}),
    )
    views = None
    results, ratios, timings_all = {}, [], {}
    for preset in s["models"]:
        specs = {
            name: dict(
                preset=preset,
                roi=s["roi"],
                patch=s["patch"],
                batch=s["batch"],
                decoder=list(s["decoder"]),
                method=m,
                alpha=a,
                fused=f,
                view=v,
                part=part,
            )
            for name, (m, a, f, v, part) in VARIANTS.items()
            if preset in s["prototype_models"] or not f
        }
        ctx.log(f"{NAME}: {preset}, ROI {s['roi']}^3, patch {s['patch']}, batch {s['batch']}, {repeats} repeats")
        cases = {name: build_case(spec, ctx.device) for name, spec in specs.items()}
        views = cases["hpm_a0.5_masked"].info["teacher_views"]
        count_case_flops(ctx, cases)
        timings = time_interleaved(cases, repeats, warmup, ctx.device, log=ctx.log)
        res = {
            name: {
                "model": preset,
                "variant": name,
                "spec": specs[name],
                **timings[name],
                "params": cases[name].info["params"],
            }
            for name in cases
        }
        add_flops(ctx, cases, timings, res)
        phase_timings = {  # every timed round's phase times (the warm-up's were cleared)
            (phase, name): {"wall_s": summarize(case.phases[phase])}
            for phase in {pr[0] for pr in PHASE_RATIOS}
            for name, case in cases.items()
            if case.phases.get(phase)
        }
        del cases
        for name in MEMORY_VARIANTS:
            ctx.log(f"  memory probe {preset} {name}")
            res[name]["memory"] = measure_memory(ctx, MODULE, specs[name])
        for name, r in res.items():
            results[f"{preset}/{name}"] = r
            timings_all[f"{preset}/{name}"] = r
        for num, den, target, what in RATIOS:
            if f"{preset}/{num}" not in results or f"{preset}/{den}" not in results:
                continue
            e = ratio_entry(
                f"{preset}: {num} / {den}", f"{preset}/{num}", f"{preset}/{den}", timings_all, target=target, what=what
            )
            e["flop_ratio"] = _flop_ratio(results, f"{preset}/{num}", f"{preset}/{den}")
            ratios.append(e)
        for phase, num, den, fnum, fden, what in PHASE_RATIOS:
            if (phase, num) not in phase_timings or (phase, den) not in phase_timings:
                continue
            pt = {f"{preset}/{n}": phase_timings[(phase, n)] for n in (num, den)}
            e = ratio_entry(f"{preset}: {phase} of {num} / {den}", f"{preset}/{num}", f"{preset}/{den}", pt, what=what)
            e["phase"] = phase
            e["flop_ratio"] = _flop_ratio(results, f"{preset}/{fnum}", f"{preset}/{fden}")  # the pass alone
            ratios.append(e)
    payload = {
        "title": TITLE,
        "measures": __doc__.strip().split("\n\n", 1)[1],
        "settings": {
            **{k: v for k, v in s.items() if k not in ("repeats", "warmup")},
            "repeats": repeats,
            "warmup": warmup,
            "mask_ratio": MASK_RATIO,
            "lambda_pred": LAMBDA_PRED,
            "clip_grad": CLIP,
            "teacher_views": views,
            "precision": amp_name(ctx.device),
            "optimizer": "AdamW (0.9, 0.95), weight-decay groups",
            "memory_variants": list(MEMORY_VARIANTS),
        },
        "results": results,
        "ratios": ratios,
    }
    write_result(ctx, NAME, payload, started)
    return payload


def main(argv=None) -> dict:
    """``python -m benchmarks.pretrain_step --size demo``: this benchmark alone, at any of its sizes (``python -m
    benchmarks`` offers the suite's sizes only), into ``--results-dir``; the docs are not regenerated."""
    from benchmarks.common import _loadavg

    ap = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=tuple(SIZES), default="demo")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default: the size's)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default: the size's)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    threads = apply_threads(a.threads)
    ctx = Context(
        device=a.device,
        size=a.size,
        threads=threads,
        repeats=a.repeats,
        warmup=a.warmup,
        memory=not a.no_memory,
        flops=not a.no_flops,
        results_dir=a.results_dir,
        verbose=not a.quiet,
    )
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    ctx.extra["loadavg_start"] = _loadavg()
    ctx.log(f"device {a.device}, size {a.size}, {threads} threads")
    payload = run(ctx)
    for r in payload["ratios"]:
        ctx.log(f"  {r['name']} = {r['ratio']:.3f} (paired {r['paired_median']:.3f})")
    return payload


if __name__ == "__main__":
    main()
