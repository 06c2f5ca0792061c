"""HPM pre-training model: token order of masked outputs, gradient paths, teacher pass, a short fit."""

import json

import pytest
import torch

from medhpm.models import ViTEncoder, patchify
from medhpm.pretrain.model import HPMPretrainModel, mask_to_ids
from medhpm.pretrain import EMATeacher, random_mask

IMG, P = (32, 32, 16), 8  # grid (4, 4, 2): N = 32


def tiny_model(predictor=True, **kw):
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=IMG, patch_size=P, embed_dim=48, depth=2, num_heads=4)
    args = dict(decoder_dim=36, decoder_depth=1, decoder_heads=3, predictor=predictor)
    args.update(kw)
    return HPMPretrainModel(enc, **args)


def batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, *IMG, generator=g)


def mask_for(b=2, seed=0, ratio=0.75):
    return random_mask(b, 32, ratio, generator=torch.Generator().manual_seed(seed))


def test_mask_to_ids():
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    keep, masked = mask_to_ids(mask)
    assert masked.tolist() == [[0, 2], [1, 2]] and keep.tolist() == [[1, 3], [0, 3]]
    with pytest.raises(ValueError, match="same number"):
        mask_to_ids(torch.tensor([[True, False, True], [True, False, False]]))
    with pytest.raises(ValueError, match="at least one"):
        mask_to_ids(torch.zeros(2, 3, dtype=torch.bool))


def test_forward_outputs_share_ascending_token_order():
    model = tiny_model()
    x, mask = batch(), mask_for()
    out = model(x, mask)
    b, m = 2, 24
    assert out["pred"].shape == (b, m, P**3) and out["lp"].shape == (b, m)
    assert out["per_patch_loss"].shape == (b, m) and out["loss_rec"].dim() == 0 and out["loss_pred"].dim() == 0
    for i in range(b):
        assert out["ids_masked"][i].tolist() == mask[i].nonzero().flatten().tolist()
        assert out["ids_keep"][i].tolist() == (~mask[i]).nonzero().flatten().tolist()
    # per-patch loss recomputed slowly from pred and the token-indexed targets
    patches = patchify(x, P)
    for i in range(b):
        for j, tok in enumerate(out["ids_masked"][i].tolist()):
            t = patches[i, tok]
            t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
            ref = ((out["pred"][i, j] - t) ** 2).mean()
            torch.testing.assert_close(out["per_patch_loss"][i, j], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_rec"], out["per_patch_loss"].mean())
    # lp row j belongs to token ids_masked[j]: compare with the predictor over all N then gathered
    with torch.no_grad():
        seq = model.decoder_input(model.forward_encoder(x, out["ids_keep"]), out["ids_keep"])
        lp_all = model.forward_predictor(seq, None)  # (B, N)
        pred_all = model.forward_decoder(seq, None)  # (B, N, P^3)
    torch.testing.assert_close(out["lp"], torch.gather(lp_all, 1, out["ids_masked"]))
    for i in range(b):
        torch.testing.assert_close(out["pred"][i], pred_all[i, out["ids_masked"][i]])


def test_decoder_input_places_tokens():
    model = tiny_model()
    x, mask = batch(), mask_for()
    keep, masked = mask_to_ids(mask)
    latent = model.forward_encoder(x, keep)
    seq = model.decoder_input(latent, keep) - model.decoder_pos_embed
    vis = model.decoder_embed(latent)
    for i in range(2):
        torch.testing.assert_close(seq[i, keep[i]], vis[i])
        torch.testing.assert_close(seq[i, masked[i]], model.mask_token[0].expand(24, -1))


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_model()
    out = model(batch(), mask_for())
    (out["loss_rec"] + out["loss_pred"]).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.pos_embed", "decoder_pos_embed"}


def test_prediction_loss_reaches_encoder_projection_mask_token_not_reconstructor():
    model = tiny_model()
    out = model(batch(), mask_for())
    out["loss_pred"].backward()

    def has_grad(p):
        return p.grad is not None and bool(p.grad.abs().sum() > 0)

    assert has_grad(model.encoder.blocks[0].attn.qkv.weight)
    assert has_grad(model.encoder.patch_embed.proj.weight)
    assert has_grad(model.decoder_embed.weight)
    assert has_grad(model.mask_token)
    assert has_grad(model.predictor_pred.weight)
    assert not any(has_grad(p) for p in model.decoder_blocks.parameters())
    assert not has_grad(model.decoder_pred.weight)


def test_predict_difficulty_runs_predictor_only():
    model = tiny_model().eval()
    calls = []
    for mod in [model.decoder_pred, model.decoder_norm, *model.decoder_blocks]:
        mod.register_forward_hook(lambda *a: calls.append(1))
    x = batch()
    s = model.predict_difficulty(x)
    assert s.shape == (2, 32) and s.dtype == torch.float32 and not s.requires_grad
    assert calls == []
    full = model.decoder_embed(model.encoder(x)[0]) + model.decoder_pos_embed
    for blk in model.predictor_blocks:
        full = blk(full)
    torch.testing.assert_close(s, model.predictor_pred(model.predictor_norm(full)).mean(-1))


def test_predictor_head_is_linear_to_patch_then_mean():
    model = tiny_model()
    assert model.predictor_pred.out_features == P**3


def test_mae_variant_without_predictor():
    model = tiny_model(predictor=False)
    assert not any(n.startswith("predictor") for n, _ in model.named_parameters())
    out = model(batch(), mask_for())
    assert out["lp"] is None and out["loss_pred"] is None
    out["loss_rec"].backward()
    with pytest.raises(RuntimeError, match="predictor=False"):
        model.predict_difficulty(batch())


def test_absolute_prediction_loss_variant():
    model = tiny_model(prediction_loss="absolute")
    out = model(batch(), mask_for())
    assert torch.isfinite(out["loss_pred"])


def test_losses_float32_under_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch(), mask_for())
    assert out["loss_rec"].dtype == torch.float32 and out["loss_pred"].dtype == torch.float32
    assert out["per_patch_loss"].dtype == torch.float32


def test_reconstruct_full():
    model = tiny_model().eval()
    x, mask = batch(), mask_for()
    r = model.reconstruct_full(x, mask)
    assert r["pred"].shape == (2, 32, P**3) and r["recon"].shape == x.shape
    keep = ~mask.unsqueeze(-1)
    pasted = patchify(r["pasted"], P)
    assert torch.equal(pasted.masked_select(keep), patchify(x, P).masked_select(keep))
    assert (patchify(r["masked_input"], P).masked_select(~keep) == 0).all()
    out = model(x, mask)
    for i in range(2):
        torch.testing.assert_close(r["pred"][i, out["ids_masked"][i]], out["pred"][i].detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(decoder_dim=40, decoder_heads=4), "decoder_dim"),
        (dict(decoder_dim=36, decoder_heads=5), "decoder_heads"),
        (dict(prediction_loss="l1"), "prediction_loss"),
        (dict(decoder_depth=0), "decoder_depth"),
    ],
)
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tiny_model(**kwargs)


def test_config_round_trip():
    model = tiny_model()
    cfg = json.loads(json.dumps(model.config()))
    twin = HPMPretrainModel.from_config(cfg)
    assert twin.config() == model.config()
    twin.load_state_dict(model.state_dict())


def test_teacher_copy_predicts_without_grad():
    model = tiny_model()
    teacher = EMATeacher(model)
    s = teacher.model.predict_difficulty(batch())
    assert s.shape == (2, 32) and not s.requires_grad
    assert not teacher.model.training


def test_short_fit_lowers_both_losses():
    torch.manual_seed(0)
    model = tiny_model()
    # a smooth, structured fixed batch: a blurred random field plus a bright blob
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.avg_pool3d(torch.rand(2, 1, 36, 36, 20, generator=g), 5, stride=1)
    x = x + torch.linspace(0, 1, 32).reshape(1, 1, 32, 1, 1)
    mask = mask_for(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        first = model(x, mask)
    for _ in range(60):
        out = model(x, mask)
        opt.zero_grad()
        (out["loss_rec"] + out["loss_pred"]).backward()
        opt.step()
    with torch.no_grad():
        last = model(x, mask)
    assert last["loss_rec"] < 0.7 * first["loss_rec"]
    assert last["loss_pred"] < 0.9 * first["loss_pred"]


def test_teacher_scores_are_float32_without_the_ties_of_bf16():
    """Under a bf16 autocast the predictor's scores collapse onto few values (topk then picks among ties);
    predict_difficulty computes them in float32 whatever the autocast, equal to a plain float32 pass."""
    torch.manual_seed(0)
    img = (24, 24, 24)  # 6^3 = 216 tokens, as the demo and the paper's 96^3 / 16^3
    enc = ViTEncoder(img_size=img, patch_size=4, embed_dim=48, depth=2, num_heads=4)
    model = HPMPretrainModel(enc, decoder_dim=36, decoder_depth=1, decoder_heads=3).eval()
    x = torch.rand(2, 1, *img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # the teacher pass as it was: the same three steps, left to the autocast
            seq = model.decoder_input(model.forward_encoder(x, None), None)
            bf16 = model.forward_predictor(seq, None).float()
            scores = model.predict_difficulty(x)
        plain = model.forward_predictor(model.decoder_input(model.forward_encoder(x, None), None), None)
    assert scores.dtype == torch.float32
    n_bf16 = [len(torch.unique(row)) for row in bf16]
    assert min(n_bf16) < 216, n_bf16  # the reference really has ties, so the check below means something
    assert all(len(torch.unique(row)) == 216 for row in scores)
    torch.testing.assert_close(scores, plain, rtol=0, atol=1e-6)
