"""Encoders: timm DINOv2 loaded through the user-facing path from files the test creates."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from models.encoders import (ENCODERS, WeightsNotFoundError, encoder_resolution, load_encoder, load_encoders,
                             parse_enc_type, resample_pos_embed)


@pytest.fixture(scope="module")
def dino_s_files(tmp_path_factory):
    """A randomly initialised DINOv2-S saved in official torch.hub naming (mask_token, 37x37 grid)
    and in timm naming as safetensors."""
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    sd = vit.state_dict()
    for k in sd:  # LayerScale gammas start at 1e-5: make them count so the test sees every block
        if k.endswith("gamma"):
            sd[k] = torch.ones_like(sd[k]) * 0.5
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    official = dict(sd, mask_token=torch.zeros(1, 384))
    torch.save(official, d / "dinov2_vits14_pretrain.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d, sd


def test_official_file_and_safetensors_dir_give_same_features(dino_s_files):
    d, sd = dino_s_files
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    enc_official = load_encoder("dinov2-vit-s", weights=str(d / "dinov2_vits14_pretrain.pth"), resolution=64)
    enc_dir = load_encoders("dinov2-vit-s", weights=str(d), resolution=64)[0]
    cls, patches = enc_official(images)
    assert cls.shape == (2, 384) and patches.shape == (2, 16, 384)  # T = (64/16)^2 = 1 + T SiT tokens - 1
    cls2, patches2 = enc_dir(images)
    assert torch.equal(cls, cls2) and torch.equal(patches, patches2)
    assert not enc_official.training and not any(p.requires_grad for p in enc_official.parameters())
    enc_official.train()
    assert not enc_official.vit.training  # stays frozen in eval mode

    # Reference: the same weights in a timm model at the encoder's input size, run by hand.
    ref = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=56).eval()
    ref_sd = dict(sd, pos_embed=resample_pos_embed(sd["pos_embed"], 4))
    ref.load_state_dict(ref_sd)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate((images / 255.0 - mean) / std, size=(56, 56), mode="bicubic")
    with torch.no_grad():
        tokens = ref.forward_features(x)
    assert torch.allclose(cls, tokens[:, 0], atol=1e-5)
    assert torch.allclose(patches, tokens[:, 1:], atol=1e-5)
    # and the final norm is applied: per-token features are layer-normed then affine (weight 1, bias 0 here)
    assert torch.allclose(cls.mean(-1), torch.zeros(2), atol=1e-4)

    # random weights give different features (so the load above really loaded)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        rnd = load_encoder("dinov2-vit-s", weights="random", resolution=64)
    assert not torch.allclose(rnd(images)[0], cls)


def test_resample_pos_embed_matches_dinov2_runtime_interpolation():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.allclose(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 8))
    assert torch.equal(resample_pos_embed(pos, 37), pos)
    reg = torch.randn(1, 37 * 37, 8)  # timm register variants keep no class row in the table
    assert resample_pos_embed(reg, 4).shape == (1, 16, 8)


def test_register_variant_drops_register_tokens():
    enc = load_encoder("dinov2reg-vit-s", weights="random", resolution=32)
    cls, patches = enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert enc.num_prefix_tokens == 5 and patches.shape == (1, 4, 384)


def test_names_and_errors(tmp_path, monkeypatch):
    assert set(ENCODERS) >= {"dinov2-vit-s", "dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g",
                             "dinov2reg-vit-b", "clip-vit-L"}
    assert parse_enc_type("dinov2-vit-b,clip-vit-L") == ["dinov2-vit-b", "clip-vit-L"]
    assert encoder_resolution(256) == 224 and encoder_resolution(512) == 448 and encoder_resolution(32) == 28
    with pytest.raises(ValueError, match="unknown encoder 'dinov3-vit-b'"):
        parse_enc_type("dinov3-vit-b")
    with pytest.raises(ValueError, match="multiple of 16"):
        load_encoder("dinov2-vit-s", weights="random", resolution=100)
    with pytest.raises(WeightsNotFoundError, match="do not exist"):
        load_encoder("dinov2-vit-s", weights=str(tmp_path / "nope.pth"), resolution=32)
    # nothing cached and offline: the message names the hub repo, the official file and the flag
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFoundError) as e:
        load_encoder("dinov2-vit-b", resolution=32)
    msg = str(e.value)
    assert "timm/vit_base_patch14_dinov2.lvd142m" in msg and "dinov2_vitb14_pretrain.pth" in msg
    assert "--enc-weights" in msg
    with pytest.raises(ValueError, match="2 encoders but 3"):
        load_encoders("dinov2-vit-s,dinov2-vit-s", weights="a,b,c", resolution=32)
