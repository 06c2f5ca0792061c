"""The default demo's training steps on the CPU: float32 against bf16 autocast, channels-last and torch.compile.

A step is what the demo's trainers run, at the demo's shapes (``configs/demo.yaml``): fine-tuning = the
UNETR (tiny ViT, patch 8, feature size 16, 14 classes) forward on a batch of 2 crops of 48^3, DiceCE (batch
Dice) on float32 logits, backward, clipping at 1.0, fused AdamW; pre-training = hpm at alpha 0.5 (teacher
pass as the demo queries it, ``pretrain.teacher_view``: 4 complementary masked views with the config's
default; mask, student, L_rec, L_pred) on 4 crops, backward, fused AdamW. Variants of the fine-tuning step:

* ``fp32``: the baseline (``runtime.precision=fp32``);
* ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around the forward, as ``runtime.precision=bf16`` or
  ``bf16-native`` on a CPU with AVX512-BF16 / AMX;
* ``channels_last``: model and input in ``torch.channels_last_3d`` (float32);
* ``channels_last_gn``: the same, with every ``InstanceNorm3d`` of the decoder replaced by the equal
  ``GroupNorm(C, C)`` (no affine, same eps: the same function, no parameters either way). PyTorch's
  instance norm returns a contiguous tensor, which drops MONAI's blocks out of channels-last after their
  first norm; group norm keeps the layout, so here every decoder convolution sees channels-last;
* ``compile`` / ``compile+bf16`` (with ``--compile``): ``torch.compile`` (inductor) of the forward; its
  compile time is reported apart (``first_s``), not in the median.

Every variant starts from the same weights and inputs, in the same process; the rounds interleave the
variants so that load on the machine hits them alike. Reported: median seconds per step, the ratio to
``fp32`` (below 1: faster), the first step's time and the first loss (the variants compute the same
function: their losses agree to bf16 rounding), and the floating-point work of each stage's forward and
backward (``benchmarks.common.count_flops``, 2 per multiply-add, optimizer not counted) with the rate each
variant achieves, to set beside the CPU's peak. Whether a CPU does bf16 natively is recorded
(``medhpm.runtime.device.cpu_has_native_bf16``): without it bf16 is emulated and slower.

Run: ``python -m benchmarks.demo_step [--rounds 6] [--compile] [--no-bf16] [--variants V,...] [--out DIR]`` ->
``demo_step_cpu.json`` (``--no-bf16`` leaves out the bf16 variants, which are emulated and very slow on a CPU
without native bf16; ``--variants`` measures the listed fine-tuning variants instead of the default set, parts
joined by '+', e.g. ``bf16,channels_last+bf16,compile+bf16``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import count_flops, cpu_machine, upper_median


def _instance_to_group_norm(module: torch.nn.Module) -> None:
    """Replace every ``InstanceNorm3d`` under ``module`` by ``GroupNorm(C, C)`` with its eps and affine flag."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.InstanceNorm3d) and not child.track_running_stats:
            setattr(
                module,
                name,
                torch.nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine),
            )
        else:
            _instance_to_group_norm(child)


def _finetune_variants(names: list[str]) -> tuple[dict, float]:
    from medhpm.config import load_config
    from medhpm.segment.trainer import build_segmentation_model, forward_loss, segmentation_loss

    cfg = load_config("demo")
    f = cfg.finetune
    torch.manual_seed(0)
    base = build_segmentation_model(cfg)
    loss_fn = segmentation_loss(cfg)  # the trainer's loss (before 2026-12-06 a copy without squared_pred)
    roi = tuple(cfg.data.roi)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(f.batch_size, 1, *roi, generator=g) * 2 - 1
    y = torch.randint(0, f.num_classes, (f.batch_size, 1, *roi), generator=g).float()
    steps = {}
    for name in names:
        parts = set(name.split("+"))
        model, x = copy.deepcopy(base), x0
        if "channels_last_gn" in parts:
            _instance_to_group_norm(model)
        if parts & {"channels_last", "channels_last_gn"}:
            model = model.to(memory_format=torch.channels_last_3d)
            x = x0.contiguous(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=tuple(f.betas), fused=True)
        fwd = torch.compile(model) if "compile" in parts else model
        bf16 = "bf16" in parts

        def step(model=model, fwd=fwd, opt=opt, x=x, bf16=bf16) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = forward_loss(fwd, loss_fn, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), f.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        steps[f"finetune/{name}"] = step
    model = copy.deepcopy(base)
    return steps, count_flops(lambda: forward_loss(model, loss_fn, x0, y).backward()) / 1e9


def _pretrain_variants(names: list[str]) -> tuple[dict, float]:
    from medhpm.config import load_config
    from medhpm.pretrain.step import pretrain_iteration, teacher_views_used
    from medhpm.pretrain.trainer import build_pretrain_model, make_teacher

    cfg = load_config("demo")
    p = cfg.pretrain
    torch.manual_seed(0)
    base = build_pretrain_model(cfg)
    x = torch.rand(p.batch_size, 1, *cfg.data.roi, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # the teacher queried as the demo's trainer queries it
    view, views = p.teacher_view, teacher_views_used(p.teacher_view, p.teacher_views, p.mask_ratio)
    n = base.encoder.num_patches

    def step_noise():
        """The mask's ranks, then the view partition's (masked view), from one seeded generator like the
        trainer's ``step_noise``; the same every step, so every variant masks alike."""
        g = torch.Generator().manual_seed(2)
        noise = torch.rand(x.shape[0], n, generator=g)
        return noise, (torch.rand(x.shape[0], n, generator=g) if view == "masked" else None)

    def iteration(model, teacher):
        noise, view_noise = step_noise()
        return pretrain_iteration(
            model,
            teacher,
            x,
            0.5,
            p.mask_ratio,
            p.lambda_pred,
            True,
            noise=noise,
            view=view,
            views=views,
            view_noise=view_noise,
        )

    steps = {}
    for name in names:
        model = copy.deepcopy(base)
        teacher = make_teacher(model)
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, fused=True)
        bf16 = name == "bf16"

        def step(model=model, teacher=teacher, opt=opt, bf16=bf16) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = iteration(model, teacher)
            loss = loss.float()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        steps[f"pretrain/{name}"] = step
    model = copy.deepcopy(base)
    teacher = make_teacher(model)
    return steps, count_flops(lambda: iteration(model, teacher)[0].backward()) / 1e9


def _demo_teacher_view() -> str:
    """How the demo's teacher is queried, e.g. ``masked, 4 views`` (``pretrain.teacher_view``)."""
    from medhpm.config import load_config
    from medhpm.pretrain.step import teacher_views_used

    p = load_config("demo").pretrain
    v = teacher_views_used(p.teacher_view, p.teacher_views, p.mask_ratio)
    return p.teacher_view + (f", {v} views" if p.teacher_view == "masked" else "")


PARTS = ("bf16", "channels_last", "channels_last_gn", "compile")


def native_demo_steps() -> dict:
    """The demo's fine-tuning and pre-training steps as it trains them on this CPU: float32, and bf16 where
    the CPU computes it natively (``runtime.precision=bf16-native``). Keys ``finetune/fp32`` etc."""
    from medhpm.runtime.device import cpu_has_native_bf16

    names = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    return {**_finetune_variants(names)[0], **_pretrain_variants(names)[0]}


def finetune_variant_names(variants: str = "", compile: bool = False, no_bf16: bool = False) -> list[str]:
    """The fine-tuning variants to measure: ``fp32`` (the baseline, always first), then the default set
    (``--compile`` adds the compiled two) or the comma-separated ``variants``, each of ``PARTS`` joined by
    '+'; ``no_bf16`` drops every variant with bf16."""
    if variants:
        names = [v.strip() for v in variants.split(",") if v.strip() and v.strip() != "fp32"]
        unknown = sorted({p for v in names for p in v.split("+")} - set(PARTS))
        if unknown:
            raise ValueError(f"--variants: unknown part(s) {unknown}; a variant joins some of {list(PARTS)} with '+'")
    else:
        names = ["bf16", "channels_last", "channels_last_gn"] + (["compile", "compile+bf16"] if compile else [])
    return ["fp32"] + [v for v in dict.fromkeys(names) if not (no_bf16 and "bf16" in v.split("+"))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the demo uses 2)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile variants (minutes to compile)")
    ap.add_argument("--no-bf16", action="store_true", help="leave out the bf16 variants (slow where emulated)")
    ap.add_argument(
        "--variants",
        default="",
        help="comma-separated fine-tuning variants instead of the default set, "
        f"parts of {', '.join(PARTS)} joined by '+' (e.g. channels_last+bf16); fp32 is always measured",
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    started = time.time()
    try:
        ft = finetune_variant_names(a.variants, a.compile, a.no_bf16)
    except ValueError as e:
        ap.error(str(e))
    pt = ["fp32"] if a.no_bf16 else ["fp32", "bf16"]
    ft_steps, ft_gflop = _finetune_variants(ft)
    pt_steps, pt_gflop = _pretrain_variants(pt)
    steps, gflop = {**ft_steps, **pt_steps}, {"finetune": ft_gflop, "pretrain": pt_gflop}
    first, loss0, times = {}, {}, {k: [] for k in steps}
    for k, step in steps.items():  # the first call: compilation, oneDNN's kernel choice
        t = time.perf_counter()
        loss0[k] = step()
        first[k] = time.perf_counter() - t
    for _ in range(a.rounds):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    results = {}
    for k, ts in times.items():
        stage = k.split("/")[0]
        med = upper_median(ts)
        base = upper_median(times[f"{stage}/fp32"])
        results[k] = {
            "median_s": med,
            "ratio_vs_fp32": med / base,
            "first_s": first[k],
            "first_loss": loss0[k],
            "gflop_per_s": gflop[stage] / med,
            "samples_s": ts,
        }
    payload = {
        "name": "demo_step",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": time.time() - started,
        "machine": cpu_machine(a.threads),
        "settings": {
            "rounds": a.rounds,
            "config": "demo",
            "finetune_batch": 2,
            "pretrain_batch": 4,
            "pretrain_teacher_view": _demo_teacher_view(),
        },
        "gflop_per_step": gflop,
        "results": results,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_step_cpu.json").write_text(json.dumps(payload, indent=1))
    for k, r in results.items():
        print(
            f"{k:28s} {r['median_s']:.3f} s/step  x{r['ratio_vs_fp32']:.3f} vs fp32  {r['gflop_per_s']:.1f} GFLOP/s"
            f"  (first {r['first_s']:.1f} s)"
        )
    return payload


if __name__ == "__main__":
    main()
