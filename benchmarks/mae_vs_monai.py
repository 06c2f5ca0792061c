"""Benchmark 2: our ``mae`` training step against MONAI's ``MaskedAutoEncoderViT`` at one configuration.

Identical: encoder width, depth, heads and MLP (4x width), qkv bias (on), patch 16 with a Conv3d
embedding, fixed 3D sin-cos position embeddings in encoder and decoder, decoder width / depth / heads /
MLP (4x width), mask ratio 0.75, batch, ROI, loss (per-patch normalised MSE on the masked patches only,
``medhpm.pretrain.losses.normalize_patches`` for both), optimizer (plain AdamW (0.9, 0.95), weight decay
0.05 over every trainable parameter), gradient clipping (5.0), precision (bf16 autocast on CUDA, fp32 on
CPU). A step = forward, loss, backward, clip, AdamW step, zero_grad.

What differs is each implementation's own design: MONAI adds a class token to the encoder and decoder
sequences (1 more token), draws its mask with ``torch.multinomial`` on the CPU, runs its prediction head
on every token (ours on the masked ones only) and computes attention with einsum + softmax (ours with
``scaled_dot_product_attention``). ``monai_sdpa`` is MONAI with its own ``use_flash_attention`` switch
turned on in every block (the constructor of ``MaskedAutoEncoderViT`` does not expose it), to separate the
attention kernel from the rest.

Further variants: ``ours_fused`` / ``monai_fused`` (both with ``AdamW(fused=True)``: still identical to
each other, and the optimizer's share of the step shrinks, which isolates the models), and
``ours_embed_all``, our model as it was before it embedded only the visible patches (Conv3d over
all N patches, then gather the K kept tokens): ``ours / ours_embed_all`` measures that change (same
tokens, a quarter of the patch-embedding work).

With ``--compile`` (``python -m benchmarks --only mae_vs_monai --compile``): ``ours_compiled`` is ``ours``
with the step up to the loss through ``torch.compile`` as ``runtime.compile=default`` runs it (the
trainers compile ``pretrain.step.step_core``), ``monai_compiled`` MONAI's forward and the same loss through
``torch.compile`` (their backward is compiled with them); clipping and AdamW stay eager in both, as in the
trainers. The first two steps (compilation) are recorded as ``first_two_steps_s`` and not timed; FLOPs are
the eager variant's.
"""

from __future__ import annotations

import time
import warnings

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
    sync,
    time_interleaved,
    write_result,
)

NAME = "mae_vs_monai"
TITLE = "MAE step: ours vs MONAI MaskedAutoEncoderViT"
MODULE = "benchmarks.mae_vs_monai"

SIZES = {
    "smoke": dict(preset="micro", roi=32, batch=1, decoder=(96, 1, 4), repeats=2, warmup=1),
    "cpu": dict(preset="base", roi=96, batch=2, decoder=(384, 8, 12), repeats=4, warmup=1),
    "paper": dict(preset="base", roi=96, batch=4, decoder=(384, 8, 12), repeats=10, warmup=3),
}
IMPLS = ("ours", "monai", "monai_sdpa", "ours_fused", "monai_fused", "ours_embed_all")
COMPILED_IMPLS = ("ours_compiled", "monai_compiled")  # with ctx.compile (--compile)
MEMORY_IMPLS = ("ours", "monai")
MASK_RATIO = 0.75
LR, BETAS, WD, CLIP = 1.5e-4, (0.9, 0.95), 0.05, 5.0


def forward_embed_all(self, x, ids_keep=None, return_hidden=()):
    """``ViTEncoder.forward`` as it was before the visible-only embedding (bound to one encoder instance
    by the benchmark): embed every patch with the Conv3d, add the position embedding, then gather."""
    from medhpm.models.vit import ViTEncoder

    if ids_keep is None:
        return ViTEncoder.forward(self, x, ids_keep, return_hidden)
    wanted = [int(k) for k in return_hidden]
    tokens = self.patch_embed(x) + self.pos_embed  # (B, N, D): all patches
    tokens = torch.gather(tokens, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    outputs = {}
    for number, blk in enumerate(self.blocks, start=1):
        tokens = blk(tokens)
        if number in wanted:
            outputs[number] = tokens
    return self.norm(tokens), [outputs[k] for k in wanted]


def build_case(spec: dict, device: str) -> Case:
    """spec: impl, preset, roi, batch, decoder; optional backend (torch.compile's, for ``*_compiled``;
    default inductor)."""
    from medhpm.models.vit import PRESETS, patchify
    from medhpm.pretrain.losses import normalize_patches

    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    seeded(0)
    roi, b, (dd, ddepth, dheads) = spec["roi"], spec["batch"], spec["decoder"]
    enc = PRESETS[spec["preset"]]
    x = torch.rand(b, 1, roi, roi, roi, device=device)
    impl = spec["impl"]
    compiled = impl.endswith("_compiled")
    backend = spec.get("backend", "inductor")
    if impl.startswith("ours"):
        from medhpm.config import load_config
        from medhpm.pretrain.step import pretrain_iteration, step_core
        from medhpm.pretrain.trainer import build_pretrain_model

        cfg = load_config(
            "demo",
            [
                f"model.preset={spec['preset']}",
                f"data.roi=[{roi},{roi},{roi}]",
                "model.patch_size=16",
                f"model.decoder_dim={dd}",
                f"model.decoder_depth={ddepth}",
                f"model.decoder_heads={dheads}",
                "pretrain.method=mae",
                "pretrain.norm_pix_loss=true",
            ],
        )
        model = build_pretrain_model(cfg).to(device).train()
        if impl == "ours_embed_all":
            import types

            enc = model.encoder
            ids = torch.randperm(enc.num_patches, device=device)[: max(enc.num_patches // 4, 1)].sort().values
            ids = ids.expand(b, -1)
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32 check
            try:
                with torch.no_grad():  # the old path must give the same tokens
                    ref = enc(x, ids_keep=ids)[0]
                    enc.forward = types.MethodType(forward_embed_all, enc)
                    new = enc(x, ids_keep=ids)[0]
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            if not torch.allclose(ref.float(), new.float(), atol=1e-3, rtol=1e-3):
                raise RuntimeError("embedding all patches then gathering differs from ViTEncoder.forward")

        core = torch.compile(step_core, backend=backend) if compiled else None

        def loss_fn():
            with amp_context(device):
                loss, _ = pretrain_iteration(
                    model, None, x, alpha=0.0, mask_ratio=MASK_RATIO, lambda_pred=1.0, use_pred=False, core=core
                )
            return loss.float()
    else:
        from monai.networks.nets import MaskedAutoEncoderViT

        model = (
            MaskedAutoEncoderViT(
                in_channels=1,
                img_size=roi,
                patch_size=16,
                hidden_size=enc["embed_dim"],
                mlp_dim=4 * enc["embed_dim"],
                num_layers=enc["depth"],
                num_heads=enc["num_heads"],
                masking_ratio=MASK_RATIO,
                decoder_hidden_size=dd,
                decoder_mlp_dim=4 * dd,
                decoder_num_layers=ddepth,
                decoder_num_heads=dheads,
                proj_type="conv",
                pos_embed_type="sincos",
                decoder_pos_embed_type="sincos",
                dropout_rate=0.0,
                spatial_dims=3,
                qkv_bias=True,
            )
            .to(device)
            .train()
        )
        if impl == "monai_sdpa":
            from monai.networks.blocks import SABlock

            for m in model.modules():
                if isinstance(m, SABlock):
                    m.use_flash_attention = True

        def forward_loss(x):
            pred, mask = model(x)  # (B, N, P^3), (B, N) 1 = masked
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                target = normalize_patches(patchify(x, 16))[0]  # (B, N, P^3), float32
                per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
                m = mask.to(per_patch.dtype)
                return (per_patch * m).sum() / m.sum()  # masked patches only

        forward_loss = torch.compile(forward_loss, backend=backend) if compiled else forward_loss

        def loss_fn():
            with amp_context(device):
                return forward_loss(x)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD, fused=impl.endswith("_fused") or None)

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Case(step=step, info={"params": sum(p.numel() for p in params), "model": model})


def run(ctx: Context) -> dict:
    started = time.time()
    s = SIZES[ctx.size]
    repeats = ctx.reps({k: v["repeats"] for k, v in SIZES.items()})
    warmup = ctx.warm({k: v["warmup"] for k, v in SIZES.items()})
    impls = IMPLS + (COMPILED_IMPLS if ctx.compile else ())
    specs = {
        impl: dict(impl=impl, preset=s["preset"], roi=s["roi"], batch=s["batch"], decoder=list(s["decoder"]))
        for impl in impls
    }
    ctx.log(f"{NAME}: {s['preset']}, ROI {s['roi']}^3, batch {s['batch']}, {repeats} repeats")
    cases = {impl: build_case(spec, ctx.device) for impl, spec in specs.items()}
    count_case_flops(ctx, {k: c for k, c in cases.items() if k not in COMPILED_IMPLS})
    for impl in impls:
        if impl in COMPILED_IMPLS:  # compile now, untimed; the same work as the eager variant
            t0 = time.perf_counter()
            cases[impl].step()
            cases[impl].step()
            sync(ctx.device)
            cases[impl].info["first_two_steps_s"] = time.perf_counter() - t0
            cases[impl].info["flops"] = cases[impl.removesuffix("_compiled")].info.get("flops")
            ctx.log(f"  {impl}: first two steps (compilation) {cases[impl].info['first_two_steps_s']:.1f}s")
    timings = time_interleaved(cases, repeats, warmup, ctx.device, log=ctx.log)
    results = {
        impl: {
            "model": s["preset"],
            "variant": impl,
            "spec": specs[impl],
            **timings[impl],
            "params": cases[impl].info["params"],
            **({"first_two_steps_s": cases[impl].info["first_two_steps_s"]} if impl in COMPILED_IMPLS else {}),
        }
        for impl in impls
    }
    add_flops(ctx, cases, timings, results)
    del cases
    for impl in MEMORY_IMPLS:
        ctx.log(f"  memory probe {impl}")
        results[impl]["memory"] = measure_memory(ctx, MODULE, specs[impl])
    ratios = []
    for num, den, target, what in (
        ("ours", "monai", 0.8, "our mae step / MONAI MaskedAutoEncoderViT step (target <= 0.8)"),
        ("ours_fused", "monai_fused", None, "the same with fused AdamW on both: the models' share of the step grows"),
        ("ours", "monai_sdpa", None, "our mae step / MONAI with SDPA attention switched on"),
        ("monai_sdpa", "monai", None, "effect of the attention kernel on MONAI"),
        ("ours", "ours_embed_all", None, "embedding only the visible patches / embedding all, then gathering"),
        ("ours_compiled", "monai", None, "our mae step with runtime.compile=default / MONAI as a user runs it"),
        ("ours_compiled", "monai_compiled", None, "both compiled: the models' share again"),
        ("ours_compiled", "ours", None, "torch.compile on our step"),
        ("monai_compiled", "monai", None, "torch.compile on MONAI's step"),
    ):
        if num not in results or den not in results:
            continue
        e = ratio_entry(f"{num} / {den}", num, den, results, target=target, what=what)
        fa, fb = results[num].get("flops_per_step"), results[den].get("flops_per_step")
        e["flop_ratio"] = fa / fb if fa and fb else None
        ratios.append(e)
    payload = {
        "title": TITLE,
        "measures": __doc__.strip().split("\n\n", 1)[1],
        "settings": {
            **{k: v for k, v in s.items() if k not in ("repeats", "warmup")},
            "repeats": repeats,
            "warmup": warmup,
            "mask_ratio": MASK_RATIO,
            "precision": amp_name(ctx.device),
            "optimizer": f"AdamW lr {LR}, betas {BETAS}, wd {WD}",
            "clip_grad": CLIP,
            "qkv_bias": True,
            "mlp_ratio": 4,
            "pos_embed": "sincos (encoder and decoder)",
            "compiled_variants": bool(ctx.compile),
        },
        "results": results,
        "ratios": ratios,
    }
    write_result(ctx, NAME, payload, started)
    return payload
