"""The 3D ViT encoder: token order, position embedding, forward options, validation, presets."""

import json
import math

import pytest
import torch

from medhpm.models import PRESETS, ViTEncoder, build_encoder, patchify, unpatchify
from medhpm.models.vit import DropPath, sincos_pos_embed_3d


def micro(**kw):
    args = dict(img_size=(16, 24, 8), patch_size=8, in_chans=1, embed_dim=48, depth=3, num_heads=4)
    args.update(kw)
    return ViTEncoder(**args)


# -- patchify / token order -----------------------------------------------------------------------
def test_patchify_matches_loop_reference_and_round_trips():
    torch.manual_seed(0)
    p = 4
    x = torch.randn(2, 3, 8, 12, 4)  # non-cubic, 3 channels: grid (2, 3, 1)
    tokens = patchify(x, p)
    assert tokens.shape == (2, 6, p**3 * 3)
    gh, gw, gd = 2, 3, 1
    for ih in range(gh):
        for iw in range(gw):
            for id_ in range(gd):
                block = x[:, :, ih * p : (ih + 1) * p, iw * p : (iw + 1) * p, id_ * p : (id_ + 1) * p]
                expected = block.permute(0, 2, 3, 4, 1).reshape(2, -1)  # (ph, pw, pd, C)
                assert torch.equal(tokens[:, (ih * gw + iw) * gd + id_], expected)
    assert torch.equal(unpatchify(tokens, p, (3, 8, 12, 4)), x)
    assert torch.equal(unpatchify(tokens, p, x.shape), x)


def test_patchify_order_equals_conv_patch_embedding():
    torch.manual_seed(1)
    enc = micro(in_chans=2)
    x = torch.randn(2, 2, 16, 24, 8)
    conv_tokens = enc.patch_embed(x)  # (B, N, D)
    w = enc.patch_embed.proj.weight  # (D, C, P, P, P) -> rows in (ph, pw, pd, C) order
    w_flat = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
    linear_tokens = patchify(x, 8) @ w_flat.T + enc.patch_embed.proj.bias
    torch.testing.assert_close(conv_tokens, linear_tokens, rtol=1e-4, atol=1e-4)


def test_patchify_and_unpatchify_reject_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 10, 8, 8), 4)
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 8, 8, 8), 4)
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(torch.zeros(1, 7, 64), 4, (1, 8, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        unpatchify(torch.zeros(1, 8, 64), 4, (2, 1, 8, 8, 8))


# -- position embedding ---------------------------------------------------------------------------
def test_sincos_values_follow_token_order():
    dim, grid = 12, (2, 3, 4)
    pe = sincos_pos_embed_3d(dim, grid)[0]
    part = dim // 6
    omega = [1.0 / 10000 ** (k / part) for k in range(part)]
    ih, iw, id_ = 1, 2, 3
    row = pe[(ih * grid[1] + iw) * grid[2] + id_]
    expected = []
    for pos in (ih, iw, id_):
        expected += [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]
    torch.testing.assert_close(row, torch.tensor(expected), rtol=0, atol=1e-6)


def test_pos_embed_fixed_or_learnable():
    enc = micro()
    assert enc.pos_embed.shape == (1, enc.num_patches, 48) and not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed.data, sincos_pos_embed_3d(48, enc.grid_size))
    assert micro(pos_embed="learnable").pos_embed.requires_grad
    enc.set_pos_embed_learnable(True)
    assert enc.pos_embed.requires_grad and enc.config()["pos_embed"] == "learnable"


def test_resize_pos_embed():
    enc = micro(pos_embed="learnable")
    before = enc.pos_embed.detach().clone()
    enc.resize_pos_embed((16, 24, 8))  # same grid: unchanged
    assert torch.equal(enc.pos_embed, before)
    enc.resize_pos_embed((32, 24, 16))
    assert enc.img_size == (32, 24, 16) and enc.grid_size == (4, 3, 2) and enc.num_patches == 24
    assert enc.pos_embed.shape == (1, 24, 48) and enc.pos_embed.requires_grad
    tokens, _ = enc(torch.randn(1, 1, 32, 24, 16))
    assert tokens.shape == (1, 24, 48)
    # interpolating a grid that is constant along h keeps that constant
    grid = torch.arange(3.0).reshape(1, 1, 1, 3, 1).expand(1, 1, 2, 3, 1)  # varies along w only
    enc2 = ViTEncoder(img_size=(16, 24, 8), patch_size=8, embed_dim=6, depth=1, num_heads=1)
    enc2.pos_embed.data = grid.permute(0, 2, 3, 4, 1).reshape(1, 6, 1).expand(1, 6, 6).clone()
    enc2.resize_pos_embed((32, 24, 8))
    assert torch.allclose(enc2.pos_embed[0, :, 0].reshape(4, 3, 1)[:, :, 0], torch.arange(3.0).expand(4, 3))
    with pytest.raises(ValueError, match="img_size"):
        enc.resize_pos_embed((30, 24, 16))


# -- forward --------------------------------------------------------------------------------------
def test_forward_shapes_and_hidden_order():
    enc = micro()
    x = torch.randn(2, 1, 16, 24, 8)
    tokens, hidden = enc(x, return_hidden=(3, 1))
    assert tokens.shape == (2, enc.num_patches, 48) and len(hidden) == 2
    assert all(h.shape == (2, 6, 48) for h in hidden)
    # hidden are block outputs before the final norm: the last one normed is the tokens
    torch.testing.assert_close(enc.norm(hidden[0]), tokens)
    _, none = enc(x)
    assert none == []
    with pytest.raises(ValueError, match="return_hidden"):
        enc(x, return_hidden=(4,))
    with pytest.raises(ValueError, match="expects input"):
        enc(torch.randn(2, 1, 16, 16, 8))


def test_ids_keep_gathers_position_embedding_first():
    torch.manual_seed(2)
    enc = micro().eval()
    x = torch.randn(2, 1, 16, 24, 8)
    full, _ = enc(x)
    identity = torch.arange(6).expand(2, 6)
    torch.testing.assert_close(enc(x, ids_keep=identity)[0], full)
    # attention is permutation-equivariant, so a permuted keep-list must give permuted rows: this only
    # holds if every token carried its own position embedding into the gather
    perm = torch.stack([torch.randperm(6), torch.randperm(6)])
    out, _ = enc(x, ids_keep=perm)
    torch.testing.assert_close(out, torch.gather(full, 1, perm.unsqueeze(-1).expand(-1, -1, 48)), rtol=1e-4, atol=1e-5)
    sub, _ = enc(x, ids_keep=perm[:, :2])
    assert sub.shape == (2, 2, 48)


@pytest.mark.parametrize("chans", [1, 2])
def test_embedding_only_kept_patches_matches_embedding_all_then_gathering(chans):
    """The visible-token path (patches gathered, then a matrix product) against the plain reference:
    the Conv3d over the whole volume, plus the position embedding, gathered; outputs and gradients, whose
    strides are the parameters' own (DDP's gradient buckets copy, and warn about, any other layout)."""
    torch.manual_seed(4)
    enc = micro(in_chans=chans)
    enc.set_pos_embed_learnable(True)
    x = torch.randn(2, chans, 16, 24, 8)
    ids = torch.stack([torch.randperm(6)[:3], torch.randperm(6)[:3]])

    def reference(e):
        tokens = e.patch_embed.proj(x).flatten(2).transpose(1, 2) + e.pos_embed  # every patch
        tokens = torch.stack([tokens[b, ids[b]] for b in range(2)])  # then keep the listed ones
        for blk in e.blocks:
            tokens = blk(tokens)
        return e.norm(tokens)

    ref_enc = micro(in_chans=chans)
    ref_enc.set_pos_embed_learnable(True)
    ref_enc.load_state_dict(enc.state_dict())
    out, _ = enc(x, ids_keep=ids)
    ref = reference(ref_enc)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)  # not a sum of squares: after the final LayerNorm that is a constant
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
        got = dict(enc.named_parameters())[name].grad
        want = dict(ref_enc.named_parameters())[name].grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        assert got.stride() == dict(enc.named_parameters())[name].stride(), name
    # patches never kept get no gradient through the position embedding
    dropped = sorted(set(range(6)) - set(ids.flatten().tolist()))
    if dropped:
        assert enc.pos_embed.grad[0, dropped].abs().max() == 0


def test_grad_checkpointing_matches_plain():
    torch.manual_seed(3)
    enc = micro(grad_checkpointing=True)
    plain = micro()
    plain.load_state_dict(enc.state_dict())
    x = torch.randn(2, 1, 16, 24, 8)
    a, _ = enc(x)
    b, _ = plain(x)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(enc.blocks[0].attn.qkv.weight.grad, plain.blocks[0].attn.qkv.weight.grad)


def test_drop_path_per_sample():
    torch.manual_seed(4)
    dp = DropPath(0.5)
    x = torch.ones(400, 3)
    y = dp(x)
    rows = {tuple(r.tolist()) for r in y}
    assert rows <= {(0.0, 0.0, 0.0), (2.0, 2.0, 2.0)} and len(rows) == 2
    assert torch.equal(dp.eval()(x), x)
    enc = micro(drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_state_dict_names_are_stable():
    keys = set(micro(depth=1).state_dict())
    for k in [
        "patch_embed.proj.weight",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
    ]:
        assert k in keys


def test_config_round_trip():
    enc = micro(drop_path_rate=0.1, qkv_bias=False)
    cfg = json.loads(json.dumps(enc.config()))
    twin = ViTEncoder(**cfg)
    assert twin.config() == enc.config()
    assert twin.state_dict().keys() == enc.state_dict().keys()
    assert enc.embed_dim == 48 and enc.depth == 3 and enc.num_heads == 4 and enc.patch_size == 8


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(img_size=(16, 20, 8)), "img_size"),
        (dict(img_size=(16, 16)), "img_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(embed_dim=48, num_heads=5), "num_heads"),
        (dict(embed_dim=40, num_heads=4), "embed_dim"),
        (dict(pos_embed="rope"), "pos_embed"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(depth=0), "depth"),
    ],
)
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        micro(**kwargs)


# -- presets --------------------------------------------------------------------------------------
def test_presets():
    assert {"micro", "tiny", "small", "base"} <= set(PRESETS)
    tiny = build_encoder("tiny", 32, patch_size=16)
    assert tiny.embed_dim == 192 and tiny.depth == 12 and tiny.num_patches == 8
    micro_enc = build_encoder("micro", (32, 32, 32), patch_size=16, depth=2)
    assert micro_enc.depth == 2 and micro_enc.embed_dim == 96
    with pytest.raises(ValueError, match="tiny"):
        build_encoder("huge", 96)


def test_base_preset_shapes_on_meta_device():
    with torch.device("meta"):
        base = build_encoder("base", 96)
        tokens, hidden = base(torch.empty(2, 1, 96, 96, 96), return_hidden=(3, 6, 9))
    assert base.num_patches == 216 and base.grid_size == (6, 6, 6)
    assert tokens.shape == (2, 216, 768) and [h.shape for h in hidden] == [(2, 216, 768)] * 3
    assert base.blocks[0].mlp.fc1.out_features == 3072
