"""Loading encoder weights from every supported source into UNETR / ViTEncoder."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medhpm.models.transfer import detect_source_format, inflate_patch_embed_2d
from medhpm.models.unetr import UNETR, build_unetr
from medhpm.models.vit import ViTEncoder
from medhpm.runtime.files import sha256_file
from medhpm.runtime.weights import load_encoder_weights, read_encoder_sidecar

ROI = (32, 32, 32)


def make_encoder(seed=0, roi=ROI, depth=3, embed_dim=24, heads=2, **kw):
    torch.manual_seed(seed)
    enc = ViTEncoder(
        img_size=roi, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=2.0, **kw
    )
    with torch.no_grad():  # non-trivial values everywhere, so a wrong mapping cannot pass by accident
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def make_unetr(enc_args, **kw):
    return build_unetr(enc_args, out_channels=2, feature_size=4, skip_blocks=(1, 2, 3), **kw)


def tokens(enc, x):
    enc.eval()
    with torch.no_grad():
        return enc(x)[0]


@pytest.fixture
def x():
    torch.manual_seed(123)
    return torch.rand(2, 1, *ROI)


# ---------------------------------------------------------------------------------------------------
# our own formats
# ---------------------------------------------------------------------------------------------------
def export(enc, folder, **sidecar):
    weights = folder / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(weights))
    meta = {"preset": "custom", "encoder_args": enc.config(), "sha256": sha256_file(weights)} | sidecar
    (folder / "encoder.json").write_text(json.dumps(meta))
    return weights


def test_safetensors_roundtrip_gives_identical_encoder_outputs(tmp_path, x):
    enc = make_encoder()
    weights = export(enc, tmp_path)
    model = make_unetr(enc.config())
    report = load_encoder_weights(model, weights)
    assert report.source_format == "medhpm-safetensors"
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(enc.state_dict())
    assert torch.equal(tokens(model.encoder, x), tokens(enc, x))
    assert model.encoder.pos_embed.requires_grad  # loading keeps the fine-tuning embedding learnable
    assert "loaded" in report.message() and "missing 0" in report.message()
    assert read_encoder_sidecar(weights)["encoder_args"] == enc.config()


def test_sha256_mismatch_names_the_file(tmp_path):
    enc = make_encoder()
    weights = export(enc, tmp_path, sha256="0" * 64)
    with pytest.raises(ValueError, match=r"encoder\.safetensors.*sha256"):
        load_encoder_weights(make_unetr(enc.config()), weights)


def test_safetensors_without_sidecar_loads_with_a_note(tmp_path):
    enc = make_encoder()
    weights = export(enc, tmp_path)
    (tmp_path / "encoder.json").unlink()
    report = load_encoder_weights(make_encoder(seed=1), weights)
    assert any("not verified" in n for n in report.notes)


def pretrain_checkpoint(path, student, teacher):
    def hpm_state(enc):  # what HPMPretrainModel.state_dict() looks like: encoder.* plus decoder parts
        state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
        state |= {
            "mask_token": torch.zeros(1, 1, 12),
            "decoder_embed.weight": torch.randn(12, 24),
            "reconstructor.blocks.0.norm1.weight": torch.ones(12),
        }
        return state

    torch.save(
        {
            "model": hpm_state(student),
            "teacher": None if teacher is None else hpm_state(teacher),
            "model_args": {"encoder": student.config()},
            "config": {},
            "transforms": {},
            "epoch": 3,
        },
        path,
    )
    return path


def test_pretrain_checkpoint_student_and_teacher(tmp_path, x):
    student, teacher = make_encoder(0), make_encoder(1)
    ckpt = pretrain_checkpoint(tmp_path / "last.pt", student, teacher)

    model = make_unetr(student.config())
    report = load_encoder_weights(model, ckpt)
    assert report.source_format == "medhpm-pretrain"
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) == {"mask_token", "decoder_embed.weight", "reconstructor.blocks.0.norm1.weight"}
    assert torch.equal(tokens(model.encoder, x), tokens(student, x))

    report = load_encoder_weights(model, ckpt, use_teacher=True)
    assert torch.equal(tokens(model.encoder, x), tokens(teacher, x))
    assert any("teacher" in n for n in report.notes)


def test_real_hpm_model_state_dict_loads_with_its_decoders_ignored(tmp_path, x):
    from medhpm.pretrain.model import HPMPretrainModel

    enc = make_encoder()
    hpm = HPMPretrainModel(enc, decoder_dim=12, decoder_depth=1, decoder_heads=2)
    torch.save(
        {"model": hpm.state_dict(), "teacher": hpm.state_dict(), "model_args": {"encoder": enc.config()}, "config": {}},
        tmp_path / "last.pt",
    )
    model = make_unetr(enc.config())
    report = load_encoder_weights(model, tmp_path / "last.pt", use_teacher=True)
    assert report.missing == [] and report.unexpected == []
    assert {k for k in hpm.state_dict() if not k.startswith("encoder.")} == set(report.ignored)
    assert torch.equal(tokens(model.encoder, x), tokens(enc, x))


def test_use_teacher_without_teacher_is_refused(tmp_path):
    enc = make_encoder()
    ckpt = pretrain_checkpoint(tmp_path / "mae.pt", enc, None)
    with pytest.raises(ValueError, match="no EMA teacher"):
        load_encoder_weights(make_encoder(), ckpt, use_teacher=True)
    torch.save(enc.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="use_teacher needs"):
        load_encoder_weights(make_encoder(), tmp_path / "plain.pt", use_teacher=True)


def test_pos_embed_of_another_roi_is_interpolated(tmp_path):
    enc = make_encoder(roi=(48, 48, 32))  # pre-training ROI: grid (3, 3, 2)
    ckpt = pretrain_checkpoint(tmp_path / "last.pt", enc, None)
    model = make_unetr(enc.config(), img_size=ROI)  # fine-tuning ROI: grid (2, 2, 2)
    report = load_encoder_weights(model, ckpt)
    assert model.encoder.pos_embed.shape == (1, 8, 24)
    assert any("(3, 3, 2) interpolated to (2, 2, 2)" in c for c in report.converted)


def test_recorded_grid_of_the_same_token_count_is_still_interpolated(tmp_path):
    enc = make_encoder(roi=(64, 32, 32))  # grid (4, 2, 2): 16 tokens
    ckpt = pretrain_checkpoint(tmp_path / "last.pt", enc, None)
    model = make_unetr(enc.config(), img_size=(32, 32, 64))  # grid (2, 2, 4): 16 tokens too
    report = load_encoder_weights(model, ckpt)
    assert any("(4, 2, 2) interpolated to (2, 2, 4)" in c for c in report.converted)


def test_shape_mismatch_names_file_key_both_shapes_and_sizes(tmp_path):
    big = ViTEncoder(img_size=ROI, patch_size=16, embed_dim=96, depth=3, num_heads=4)
    torch.save(big.state_dict(), tmp_path / "big.pt")
    with pytest.raises(ValueError) as err:
        load_encoder_weights(make_encoder(), tmp_path / "big.pt")
    text = str(err.value)
    assert "big.pt" in text and "patch_embed.proj.weight" in text
    assert "(96, 1, 16, 16, 16)" in text and "(24, 1, 16, 16, 16)" in text
    assert "ViT-" in text and "the config asks for" in text


def test_recorded_config_mismatch_is_refused(tmp_path):
    enc = make_encoder(heads=2)
    ckpt = pretrain_checkpoint(tmp_path / "last.pt", enc, None)
    other = make_encoder(heads=4)  # same shapes, different computation
    with pytest.raises(ValueError, match="num_heads: file 2, model 4"):
        load_encoder_weights(other, ckpt)


def test_partial_load_refused_unless_allowed(tmp_path, x):
    enc = make_encoder()
    state = {k: v for k, v in enc.state_dict().items() if not k.startswith("blocks.2.")}
    state["blocks.7.norm1.weight"] = torch.ones(24)  # from a deeper encoder
    with pytest.raises(ValueError, match=r"blocks\.2\..*missing.*blocks\.7\.norm1\.weight"):
        load_encoder_weights(make_encoder(seed=5), state)
    target = make_encoder(seed=5)
    report = load_encoder_weights(target, state, allow_partial=True)
    assert sorted(report.missing) == sorted(k for k in enc.state_dict() if k.startswith("blocks.2."))
    assert report.unexpected == ["blocks.7.norm1.weight"]
    assert torch.equal(target.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert "missing 12" in report.message()  # 12 tensors per block


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="not a recognised encoder checkpoint"):
        load_encoder_weights(make_encoder(), {"conv.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="ViTEncoder"):
        load_encoder_weights(nn.Linear(2, 2), {"conv.weight": torch.ones(3)})


# ---------------------------------------------------------------------------------------------------
# MONAI UNETR
# ---------------------------------------------------------------------------------------------------
class _Rearrange(nn.Module):
    """The two einops patterns MONAI's SABlock uses (stand-in when einops is not installed)."""

    def __init__(self, pattern, **axes):
        super().__init__()
        self.pattern, self.axes = pattern, axes

    def forward(self, t):
        if self.pattern == "b h (qkv l d) -> qkv b l h d":
            b, n, f = t.shape
            heads = self.axes["l"]
            return t.reshape(b, n, 3, heads, f // (3 * heads)).permute(2, 0, 3, 1, 4)
        if self.pattern == "b l h d -> b h (l d)":
            b, heads, n, d = t.shape
            return t.permute(0, 2, 1, 3).reshape(b, n, heads * d)
        raise NotImplementedError(self.pattern)


def monai_unetr(monkeypatch, qkv_bias=True):
    if importlib.util.find_spec("einops") is None:
        monkeypatch.setattr("monai.networks.blocks.selfattention.Rearrange", _Rearrange)
    from monai.networks.nets import UNETR as MonaiUNETR

    torch.manual_seed(7)
    net = MonaiUNETR(
        in_channels=1,
        out_channels=2,
        img_size=ROI,
        feature_size=4,
        hidden_size=48,
        mlp_dim=96,
        num_heads=4,
        proj_type="conv",
        qkv_bias=qkv_bias,
    )
    with torch.no_grad():
        for p in net.vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_monai_unetr_maps_one_to_one(monkeypatch, x, qkv_bias):
    net = monai_unetr(monkeypatch, qkv_bias)
    state = {"state_dict": net.state_dict()}
    assert detect_source_format(state["state_dict"]) == "monai"
    enc = ViTEncoder(img_size=ROI, patch_size=16, embed_dim=48, depth=12, num_heads=4, mlp_ratio=2.0)
    model = UNETR(enc, out_channels=2, feature_size=4)
    report = load_encoder_weights(model, state)
    assert report.source_format == "monai" and report.missing == [] and report.unexpected == []
    assert any(k.startswith("decoder5.") for k in report.ignored)  # MONAI's decoder is not the encoder
    assert any(k.endswith("norm_cross_attn.weight") for k in report.ignored)
    assert any("qkv.bias" in c for c in report.converted) == (not qkv_bias)

    with torch.no_grad():
        ref_tokens, ref_hidden = net.vit(x)
        ours_eps6, _ = model.encoder.eval()(x)
        for m in model.encoder.modules():  # MONAI's LayerNorm eps is 1e-5, ours 1e-6: align it for the check
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-5
        ours, hidden = model.encoder(x, return_hidden=(3, 12))
    assert torch.allclose(ours, ref_tokens, atol=1e-5)
    assert torch.allclose(hidden[0], ref_hidden[2], atol=1e-5) and torch.allclose(hidden[1], ref_hidden[11], atol=1e-5)
    assert torch.allclose(ours_eps6, ref_tokens, atol=1e-3)  # the eps difference alone stays small
    # MONAI's token reshape (proj_feat) and ours agree
    assert torch.equal(model.tokens_to_grid(ref_tokens), net.proj_feat(ref_tokens))


def test_monai_perceptron_patch_embedding_is_converted_to_a_conv(x):
    enc = make_encoder()
    p = 16
    w = enc.patch_embed.proj.weight.detach()  # (D, 1, P, P, P)
    linear = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], p**3)  # MONAI perceptron: (p1 p2 p3 c) order
    state = {
        "vit.patch_embedding.patch_embeddings.1.weight": linear,
        "vit.patch_embedding.patch_embeddings.1.bias": enc.patch_embed.proj.bias.detach(),
        "vit.patch_embedding.position_embeddings": enc.pos_embed.detach(),
    }
    for k, v in enc.state_dict().items():
        if k.startswith(("blocks.", "norm.")):
            for ours, theirs in (
                ("attn.proj", "attn.out_proj"),
                ("mlp.fc1", "mlp.linear1"),
                ("mlp.fc2", "mlp.linear2"),
            ):
                k = k.replace(ours, theirs)
            state["vit." + k] = v
    target = make_encoder(seed=9)
    report = load_encoder_weights(target, state)
    assert any("perceptron" in c for c in report.converted)
    assert torch.equal(tokens(target, x), tokens(enc, x))


# ---------------------------------------------------------------------------------------------------
# SelfMedMAE
# ---------------------------------------------------------------------------------------------------
def test_selfmedmae_pretraining_checkpoint(tmp_path, x):
    enc = make_encoder()
    state = {f"module.encoder.{k}": v for k, v in enc.state_dict().items() if k != "pos_embed"}
    state |= {
        "module.encoder.cls_token": torch.randn(1, 1, 24),
        "module.encoder_pos_embed": enc.pos_embed.detach(),
        "module.decoder_pos_embed": torch.randn(1, 8, 12),
        "module.mask_token": torch.randn(1, 1, 12),
        "module.encoder_to_decoder.weight": torch.randn(12, 24),
        "module.decoder.norm.weight": torch.ones(12),
    }
    torch.save({"state_dict": state, "epoch": 10, "optimizer": {}}, tmp_path / "checkpoint_0009.pth.tar")
    target = make_unetr(enc.config())
    report = load_encoder_weights(target, tmp_path / "checkpoint_0009.pth.tar")
    assert report.source_format == "selfmedmae"
    assert report.missing == [] and report.unexpected == []
    assert any("encoder.cls_token" in c and "dropped" in c for c in report.converted)
    assert "decoder_pos_embed" in report.ignored and "mask_token" in report.ignored
    assert torch.equal(tokens(target.encoder, x), tokens(enc, x))


def test_selfmedmae_unetr3d_pos_embed_with_class_slot(x):
    enc = make_encoder()
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["encoder.pos_embed"] = torch.cat([torch.zeros(1, 1, 24), enc.pos_embed.detach()], dim=1)  # (1, 1+N, D)
    state["encoder.cls_token"] = torch.zeros(1, 1, 24)
    target = make_encoder(seed=3)
    report = load_encoder_weights(target, {"state_dict": state})
    assert any("class-token slot dropped" in c for c in report.converted)
    assert torch.equal(tokens(target, x), tokens(enc, x))


# ---------------------------------------------------------------------------------------------------
# 2D ViT (timm / MAE) inflated to 3D
# ---------------------------------------------------------------------------------------------------
def timm_2d_state(width=24, depth=3, grid=14, mae=False):
    torch.manual_seed(11)
    state = {
        "cls_token": torch.randn(1, 1, width),
        "pos_embed": torch.randn(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": torch.randn(width, 3, 16, 16),
        "patch_embed.proj.bias": torch.randn(width),
        "norm.weight": torch.rand(width),
        "norm.bias": torch.randn(width),
    }
    for i in range(depth):
        for name, shape in [
            ("norm1", (width,)),
            ("attn.qkv", (3 * width, width)),
            ("attn.proj", (width, width)),
            ("norm2", (width,)),
            ("mlp.fc1", (2 * width, width)),
            ("mlp.fc2", (width, 2 * width)),
        ]:
            state[f"blocks.{i}.{name}.weight"] = torch.randn(shape)
            state[f"blocks.{i}.{name}.bias"] = torch.randn(shape[0])
    if mae:
        state |= {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, width)}
        return {"model": state}
    state |= {"head.weight": torch.randn(10, width), "head.bias": torch.randn(10)}
    return state


@pytest.mark.parametrize("mae", [False, True])
def test_timm_2d_checkpoint_is_inflated(tmp_path, mae):
    torch.save(timm_2d_state(mae=mae), tmp_path / "vit2d.pth")
    target = make_encoder(roi=(32, 48, 64))  # grid (2, 3, 4)
    report = load_encoder_weights(target, tmp_path / "vit2d.pth")
    assert report.source_format == "timm-2d"
    assert report.missing == [] and report.unexpected == []
    assert target.patch_embed.proj.weight.shape == (24, 1, 16, 16, 16)
    assert target.pos_embed.shape == (1, 2 * 3 * 4, 24)
    # the depth copies of the 2D grid are identical (no depth information in a 2D embedding)
    pe = target.pos_embed.detach().reshape(2, 3, 4, 24)
    assert torch.equal(pe[:, :, 0], pe[:, :, 3])
    assert any("cls_token" in c for c in report.converted)
    assert ("decoder_embed.weight" in report.ignored) == mae


def test_inflated_patch_embedding_keeps_the_response_to_a_constant_input():
    w2d = torch.randn(24, 3, 16, 16)
    w3d = inflate_patch_embed_2d(w2d, in_chans=1)
    assert w3d.shape == (24, 1, 16, 16, 16)
    const = torch.full((1, 1, 16, 16, 16), 0.7)
    resp3d = nn.functional.conv3d(const, w3d, stride=16).flatten()
    resp2d = nn.functional.conv2d(torch.full((1, 3, 16, 16), 0.7), w2d, stride=16).flatten()  # grey image
    assert torch.allclose(resp3d, resp2d, rtol=1e-4, atol=1e-4)
    assert torch.allclose(resp3d, 0.7 * w2d.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)
    # two input channels share the colour sum
    w3d2 = inflate_patch_embed_2d(w2d, in_chans=2)
    assert torch.allclose(w3d2.sum(dim=(1, 2, 3, 4)), w2d.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_timm_2d_width_mismatch_gets_a_hint(tmp_path):
    torch.save(timm_2d_state(width=48), tmp_path / "vit2d_wide.pth")
    with pytest.raises(ValueError, match=r"vit2d_wide\.pth.*\(48, .*\(24, .*config asks for"):
        load_encoder_weights(make_encoder(), tmp_path / "vit2d_wide.pth")


def test_detect_source_format():
    enc = make_encoder()
    assert detect_source_format(enc.state_dict()) == "medhpm"
    assert detect_source_format({f"module.encoder.{k}": v for k, v in enc.state_dict().items()}) == "medhpm"
    assert detect_source_format(timm_2d_state()) == "timm-2d"
    assert detect_source_format({"encoder_pos_embed": torch.zeros(1)}) == "selfmedmae"
    assert detect_source_format({"vit.patch_embedding.position_embeddings": torch.zeros(1)}) == "monai"
    assert detect_source_format({"x": torch.zeros(1)}) == "unknown"
