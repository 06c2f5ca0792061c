"""UNETR around the medhpm ViT encoder: shapes, gradients, token reshape, argument checks."""

import pytest
import torch

from medhpm.models.unetr import UNETR, build_unetr, default_skip_blocks
from medhpm.models.vit import ViTEncoder


def micro_encoder(roi=32, patch=16, depth=3, **kw):
    return ViTEncoder(img_size=roi, patch_size=patch, embed_dim=24, depth=depth, num_heads=2, mlp_ratio=2.0, **kw)


@pytest.mark.parametrize("patch, roi, skips", [(16, (32, 32, 48), (1, 2, 3)), (8, (16, 16, 24), (2, 3))])
def test_forward_shapes_and_every_parameter_gets_a_gradient(patch, roi, skips):
    torch.manual_seed(0)
    model = UNETR(micro_encoder(roi, patch), out_channels=3, feature_size=4, skip_blocks=skips)
    x = torch.randn(1, 1, *roi)
    y = model(x)
    assert y.shape == (1, 3, *roi)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []


def test_pos_embed_becomes_learnable_from_its_sincos_values():
    enc = micro_encoder()
    before = enc.pos_embed.detach().clone()
    assert not enc.pos_embed.requires_grad
    model = UNETR(enc, out_channels=2, feature_size=4, skip_blocks=(1, 2, 3))
    assert model.encoder.pos_embed.requires_grad
    assert torch.equal(model.encoder.pos_embed.detach(), before)


def test_patch16_decoder_uses_monai_layout_names():
    model = UNETR(micro_encoder(), out_channels=2, feature_size=4, skip_blocks=(1, 2, 3))
    top = {k.split(".")[0] for k in model.state_dict()}
    assert top == {
        "encoder",
        "encoder1",
        "encoder2",
        "encoder3",
        "encoder4",
        "decoder5",
        "decoder4",
        "decoder3",
        "decoder2",
        "out",
    }
    assert set(model.encoder_state_dict()) == set(model.encoder.state_dict())


def test_tokens_to_grid_follows_the_token_order():
    model = UNETR(micro_encoder((32, 48, 64)), out_channels=2, feature_size=4, skip_blocks=(1, 2, 3))
    gh, gw, gd = model.encoder.grid_size
    idx = torch.arange(gh * gw * gd, dtype=torch.float32)
    grid = model.tokens_to_grid(idx.view(1, -1, 1))  # (1, 1, Gh, Gw, Gd)
    ih, iw, id_ = 1, 2, 3
    assert grid[0, 0, ih, iw, id_] == (ih * gw + iw) * gd + id_


def test_skips_are_the_requested_block_outputs(monkeypatch):
    enc = micro_encoder(depth=4)
    model = UNETR(enc, out_channels=2, feature_size=4, skip_blocks=(1, 3, 4))
    seen = {}
    original = enc.forward

    def spy(x, ids_keep=None, return_hidden=()):
        seen["hidden"] = tuple(return_hidden)
        return original(x, ids_keep, return_hidden)

    monkeypatch.setattr(enc, "forward", spy)
    model(torch.randn(1, 1, 32, 32, 32))
    assert seen["hidden"] == (1, 3, 4)


def test_default_skip_blocks():
    assert default_skip_blocks(12, 16) == (3, 6, 9)
    assert default_skip_blocks(12, 8) == (4, 8)
    model = UNETR(micro_encoder(depth=12), out_channels=2, feature_size=4)
    assert model.skip_blocks == (3, 6, 9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(out_channels=0), "out_channels"),
        (dict(feature_size=0), "feature_size"),
        (dict(skip_blocks=(1, 2, 4)), "within the encoder depth"),
        (dict(skip_blocks=(1, 2)), "exactly 3 skip blocks"),
        (dict(skip_blocks=(3, 2, 1)), "increasing"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(out_channels=2, feature_size=4, skip_blocks=(1, 2, 3)) | kwargs
    with pytest.raises(ValueError, match=match):
        UNETR(micro_encoder(), **args)


def test_unsupported_patch_size():
    with pytest.raises(ValueError, match="patch sizes"):
        UNETR(micro_encoder(roi=12, patch=4), out_channels=2, skip_blocks=(1,))


def test_build_unetr_sets_drop_path_and_resizes_pos_embed():
    args = micro_encoder().config()
    model = build_unetr(
        args, out_channels=2, feature_size=4, drop_path=0.1, skip_blocks=(1, 2, 3), img_size=(48, 32, 32)
    )
    assert model.encoder.config()["drop_path_rate"] == 0.1
    assert model.encoder.img_size == (48, 32, 32)
    assert model.encoder.pos_embed.shape == (1, 3 * 2 * 2, 24)
    assert model.encoder.pos_embed.requires_grad
    assert model(torch.randn(1, 1, 48, 32, 32)).shape == (1, 2, 48, 32, 32)
    with pytest.raises(ValueError, match="does not take"):
        build_unetr(args | {"hidden_size": 3}, out_channels=2)
