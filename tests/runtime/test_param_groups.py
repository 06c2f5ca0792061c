"""Layer-wise lr decay groups (docs/method.md, "Transfer to UNETR") and the pre-training weight-decay split."""

import pytest
import torch

from medhpm.models.unetr import UNETR
from medhpm.models.vit import ViTEncoder
from medhpm.runtime.param_groups import param_groups_layer_decay, param_groups_weight_decay


@pytest.fixture(scope="module")
def model():
    enc = ViTEncoder(img_size=32, patch_size=16, embed_dim=24, depth=12, num_heads=2, mlp_ratio=2.0)
    return UNETR(enc, out_channels=2, feature_size=4)


def expected_id(name):
    if name.startswith(("encoder.patch_embed.", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return 13  # final norm and the whole decoder


def test_every_parameter_once_with_the_formula_scale(model):
    decay = 0.75
    groups = param_groups_layer_decay(model, lr=8e-4, weight_decay=0.05, layer_decay=decay)
    seen = {}
    for g in groups:
        assert g["lr"] == pytest.approx(8e-4 * g["lr_scale"])
        assert g["name"] == f"layer_{g['layer_id']}_{'decay' if g['weight_decay'] else 'no_decay'}"
        for name, p in zip(g["param_names"], g["params"], strict=True):
            assert name not in seen
            seen[name] = g
            assert g["layer_id"] == expected_id(name), name
            assert g["lr_scale"] == pytest.approx(decay ** (13 - expected_id(name))), name
    assert set(seen) == {n for n, p in model.named_parameters() if p.requires_grad}
    # the families the paper names
    assert seen["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(decay**13)
    assert seen["encoder.pos_embed"]["lr_scale"] == pytest.approx(decay**13)
    assert seen["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(decay**12)
    assert seen["encoder.blocks.11.mlp.fc2.weight"]["lr_scale"] == pytest.approx(decay**1)
    assert seen["encoder.norm.weight"]["lr_scale"] == 1.0
    assert seen["out.conv.conv.weight"]["lr_scale"] == 1.0
    # weight-decay exclusions: biases, 1-D parameters, position embedding
    for name in (
        "encoder.pos_embed",
        "encoder.norm.weight",
        "encoder.blocks.3.attn.qkv.bias",
        "encoder.patch_embed.proj.bias",
        "out.conv.conv.bias",
    ):
        assert seen[name]["weight_decay"] == 0.0, name
    decayed = (
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.3.attn.qkv.weight",
        "decoder5.transp_conv.conv.weight",
    )
    for name in decayed:
        assert seen[name]["weight_decay"] == 0.05, name
    # groups keyed by (layer id, decay): at most two per id
    keys = [(g["layer_id"], g["weight_decay"] > 0) for g in groups]
    assert len(keys) == len(set(keys))
    torch.optim.AdamW(groups)  # accepted as is


def test_frozen_parameters_are_left_out_and_bad_decay_refused():
    enc = ViTEncoder(img_size=32, patch_size=16, embed_dim=24, depth=3, num_heads=2)
    names = {n for g in param_groups_layer_decay(enc, 1e-3, 0.05) for n in g["param_names"]}
    assert "pos_embed" not in names  # sin-cos, frozen
    assert "patch_embed.proj.weight" in names
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(enc, 1e-3, 0.05, layer_decay=0.0)
    with pytest.raises(ValueError, match="ViTEncoder"):
        param_groups_layer_decay(torch.nn.Linear(2, 2), 1e-3, 0.05)


def test_weight_decay_groups_for_pretraining():
    class Wrapper(torch.nn.Module):  # stands in for the HPM model: encoder + decoder parts
        def __init__(self):
            super().__init__()
            self.encoder = ViTEncoder(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=2)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 12))
            self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, 8, 12))
            self.decoder_embed = torch.nn.Linear(24, 12)

    groups = {g["name"]: g for g in param_groups_weight_decay(Wrapper(), lr=1.5e-4, weight_decay=0.05)}
    no_decay, decay = set(groups["no_decay"]["param_names"]), set(groups["decay"]["param_names"])
    assert {"mask_token", "decoder_pos_embed", "decoder_embed.bias", "encoder.norm.weight"} <= no_decay
    assert {"decoder_embed.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight"} <= decay
    assert "encoder.pos_embed" not in no_decay | decay  # frozen sin-cos
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    assert all(g["lr_scale"] == 1.0 for g in groups.values())
