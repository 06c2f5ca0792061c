"""Training steps eager against ``torch.compile`` (issue 18), as the trainers run them.

A step is the trainers' optimizer step: for pre-training (``mae``, ``hpm`` at alpha 0.5 with the teacher
pass) ``pretrain.step.step_core`` (teacher pass, mask, student, L_rec, L_pred), backward, gradient clipping (5.0),
fused AdamW over the trainer's weight-decay groups, for hpm the EMA update; for fine-tuning
``segment.trainer.forward_loss`` (the UNETR forward and the trainer's ``segmentation_loss``), backward,
clipping, fused AdamW over the trainer's layer-decay groups. ``runtime.compile``'s modes compile the part up
to the loss (``Trainer.compiled``).
The teacher is queried as the demo config says (``pretrain.teacher_view``: masked, 4 views by default).
Mask noise (and the view partition's ranks) is drawn on the device, as the trainer's ``step_noise``. Each
mode is built in the same process with the same seed and shapes; timing interleaves the modes
(``benchmarks.common.time_interleaved``). Reported: median seconds per step and the ratio compiled / eager
(below 1: compiling helps); compile time is the first (warm-up) calls and not part of the medians.

Run: ``python -m benchmarks.compile_step [--threads 1] [--repeats 5] [--out DIR]``; the CPU figures of
docs/PERFORMANCE.md come from it. ``benchmarks/gpu_all.py`` uses :func:`build_step` for the GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

TASKS = ("mae", "hpm", "finetune")
MODES = ("none", "default", "reduce-overhead", "max-autotune")
CLIP = 5.0
SIZES = {
    # preset, roi, patch, decoder (width, depth, heads), UNETR feature size
    "tiny": dict(preset="micro", roi=32, patch=16, decoder=(24, 1, 4), feature_size=8),
    "cpu": dict(preset="tiny", roi=64, patch=16, decoder=(96, 2, 4), feature_size=16),
    "paper": dict(preset="base", roi=96, patch=16, decoder=(384, 8, 12), feature_size=16),
}


def _cfg(task: str, size: dict, batch: int):
    from medhpm.config import load_config

    d, roi = size["decoder"], size["roi"]
    return load_config(
        "demo",
        [
            f"model.preset={size['preset']}",
            f"data.roi=[{roi},{roi},{roi}]",
            f"model.patch_size={size['patch']}",
            f"model.decoder_dim={d[0]}",
            f"model.decoder_depth={d[1]}",
            f"model.decoder_heads={d[2]}",
            f"model.feature_size={size['feature_size']}",
            f"pretrain.method={'mae' if task == 'mae' else 'hpm'}",
            f"pretrain.batch_size={batch}",
            f"finetune.batch_size={batch}",
            "finetune.drop_path=0.0",
            "data.num_samples=1",
        ],
    )


def _room_for_graphs() -> None:
    """One process here compiles the same functions for many models, batches and modes: keep dynamo from
    falling back to eager after its default of 8 graphs per function."""
    import torch._dynamo.config as dc

    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(dc, key):
            setattr(dc, key, 256)
    if hasattr(dc, "accumulated_cache_size_limit"):
        dc.accumulated_cache_size_limit = 1024


def build_step(task: str, size: dict, batch: int, mode: str, device: str, seed: int = 0, backend: str = "inductor"):
    """(step, forward_backward) callables of one trainer step of ``task`` at ``batch`` crops, compiled in
    ``mode`` (``none``: eager). ``forward_backward`` (the step without optimizer and EMA) is for FLOP
    counting. ``backend``: torch.compile's backend (``eager``: dynamo's capture only, for quick tests)."""
    from medhpm.pretrain.masking import num_masked
    from medhpm.pretrain.step import step_core, teacher_views_used
    from medhpm.pretrain.trainer import build_pretrain_model, make_teacher
    from medhpm.runtime.param_groups import param_groups_layer_decay, param_groups_weight_decay

    torch.manual_seed(seed)
    cfg = _cfg(task, size, batch)
    dev = torch.device(device)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else None

    def compiled(fn):
        if mode == "none":
            return fn
        _room_for_graphs()
        if backend != "inductor":
            return torch.compile(fn, backend=backend)
        return torch.compile(fn, mode=None if mode == "default" else mode)

    roi = size["roi"]
    x = torch.rand(batch, 1, roi, roi, roi, device=dev)
    if task == "finetune":
        from medhpm.segment.trainer import build_segmentation_model, forward_loss, segmentation_loss

        f = cfg.finetune
        model = build_segmentation_model(cfg).to(dev).train()
        y = torch.randint(0, f.num_classes, (batch, 1, roi, roi, roi), device=dev).float()
        loss_fn = segmentation_loss(cfg)  # the trainer's loss (before 2026-12-06 a copy without its Dice settings)

        def core(xx, yy):  # FinetuneTrainer.forward_loss, which the trainer compiles
            return forward_loss(model, loss_fn, xx, yy)

        core_c = compiled(core)
        teacher, call = None, (lambda: core_c(x, y))
        groups = param_groups_layer_decay(model, f.lr, f.weight_decay, f.layer_decay)  # FinetuneTrainer's (UNETR)
    else:
        model = build_pretrain_model(cfg).to(dev).train()
        teacher = make_teacher(model).to(dev) if task == "hpm" else None
        p = cfg.pretrain
        n = model.encoder.num_patches
        n_hard = torch.tensor(int(0.5 * num_masked(n, p.mask_ratio)), device=dev) if teacher else None
        # the teacher queried as the trainer queries it (pretrain.teacher_view / teacher_views)
        view = p.teacher_view if teacher is not None else "full"
        views = teacher_views_used(view, p.teacher_views, p.mask_ratio)
        gen = torch.Generator(device=dev)
        core_c = compiled(step_core)
        step_no = [0]

        def call():
            step_no[0] += 1
            gen.manual_seed(step_no[0])
            noise = torch.rand(batch, n, generator=gen, device=dev)  # the mask's ranks first, as step_noise
            view_noise = torch.rand(batch, n, generator=gen, device=dev) if view == "masked" else None
            loss, _ = core_c(
                model, teacher, x, noise, n_hard, p.mask_ratio, p.lambda_pred, task == "hpm", view, views, view_noise
            )
            return loss

        groups = param_groups_weight_decay(model, p.lr, p.weight_decay)  # PretrainTrainer's
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(groups, fused=True)  # each group carries its lr

    def forward_backward():
        if amp is not None:
            with amp:
                loss = call()
        else:
            loss = call()
        loss.float().backward()
        return loss

    def step():
        loss = forward_backward()
        gn = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.found_inf = (~torch.isfinite(gn)).float()  # the trainers' device-side skip
        opt.step()
        opt.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(model, 0.99, applied=torch.isfinite(gn))
        return loss

    return step, forward_backward


def measure(task, size, batch, modes, device, repeats, warmup, log=print, backend: str = "inductor") -> dict:
    """Interleaved timing of the modes of one task and batch; returns per-mode median seconds."""
    from benchmarks.common import Case, time_interleaved

    cases, compile_s = {}, {}
    for mode in modes:
        step, _ = build_step(task, size, batch, mode, device, backend=backend)
        t0 = time.perf_counter()
        step()  # the compile happens here
        step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        compile_s[mode] = time.perf_counter() - t0
        cases[mode] = Case(step=step)
    timings = time_interleaved(cases, repeats, warmup, device, log=None)
    out = {}
    for mode in modes:
        med = timings[mode]["wall_s"]["median"]
        out[mode] = {
            "s_per_step": med,
            "ms_per_step": 1e3 * med,
            "crops_per_s": batch / med,
            "first_two_steps_s": compile_s[mode],
            "wall_s": timings[mode]["wall_s"],
        }
        log(f"  {task} batch {batch} {mode}: {1e3 * med:.1f} ms/step (first two steps {compile_s[mode]:.1f}s)")
    return out


def main(argv=None) -> dict:
    from benchmarks.common import cpu_model
    from medhpm.config import load_config
    from medhpm.pretrain.step import teacher_views_used

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="cpu", choices=tuple(SIZES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--modes", default="none,default")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    modes = a.modes.split(",")
    p = load_config("demo").pretrain  # build_step's teacher view (the demo config's)
    results, ratios = {}, []
    started = time.time()
    for task in a.tasks.split(","):
        r = measure(task, SIZES[a.size], a.batch, modes, "cpu", a.repeats, a.warmup, log=lambda m: print(m, flush=True))
        results[task] = r
        for mode in modes[1:]:
            ratios.append({"name": f"{task}: {mode} / eager", "ratio": r[mode]["s_per_step"] / r["none"]["s_per_step"]})
    payload = {
        "title": "Training step: torch.compile vs eager on the CPU",
        "measures": __doc__.strip(),
        "machine": {"cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__},
        "settings": {
            "size": a.size,
            **SIZES[a.size],
            "batch": a.batch,
            "repeats": a.repeats,
            "modes": modes,
            "teacher_view": p.teacher_view,
            "teacher_views": teacher_views_used(p.teacher_view, p.teacher_views, p.mask_ratio),
        },
        "results": results,
        "ratios": ratios,
        "duration_s": time.time() - started,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_step_cpu.json").write_text(json.dumps(payload, indent=1, default=str))
    for e in ratios:
        print(f"{e['name']}: {e['ratio']:.3f}")
    return payload


if __name__ == "__main__":
    main()
