"""Encoders: timm DINOv2 loaded through the user-facing path from files the test creates."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed import resample_abs_pos_embed

from models.encoders import (ENCODERS, WeightsNotFoundError, encoder_resolution, load_encoder, load_encoders,
                             local_weights, parse_enc_type, resample_pos_embed)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def smooth_table(dim: int, seed: int) -> torch.Tensor:
    """A (1, 1 + 37*37, dim) position table like DINOv2's: a class row plus a smooth 37x37 grid
    (a random 6x6 field upsampled), so that resampling methods give visibly different results."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dim, 6, 6, generator=g)
    grid = F.interpolate(coarse, size=(37, 37), mode="bicubic", align_corners=True).flatten(2).transpose(1, 2)
    return torch.cat([torch.randn(1, 1, dim, generator=g), grid], dim=1)


@pytest.fixture(scope="module")
def dino_s_files(tmp_path_factory):
    """A randomly initialised DINOv2-S saved in official torch.hub naming (mask_token, 37x37 table,
    as torch.hub.load caches it) and in timm naming as safetensors."""
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    sd = vit.state_dict()
    for k in sd:  # LayerScale gammas start at 1e-5: make them count so the test sees every block
        if k.endswith("gamma"):
            sd[k] = torch.ones_like(sd[k]) * 0.5
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    sd["pos_embed"] = smooth_table(384, seed=1)
    official = dict(sd, mask_token=torch.zeros(1, 384))
    torch.save(official, d / "dinov2_vits14_pretrain.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d, sd


def reg_features(sd: dict, images: torch.Tensor, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """REG's encoder by hand: the table resampled once with timm's resample_abs_pos_embed to
    16*res/256 a side (REG utils.py load_encoders), a plain timm ViT at 224*res/256, and REG's
    preprocessing (train.py preprocess_raw_image: /255, ImageNet mean/std, then bicubic)."""
    grid, size = 16 * res // 256, 224 * res // 256
    ref = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=size)
    ref.load_state_dict(dict(sd, pos_embed=resample_abs_pos_embed(sd["pos_embed"], [grid, grid])))
    x = F.interpolate((images / 255.0 - MEAN) / STD, size, mode="bicubic")
    with torch.no_grad():
        tokens = ref.eval().forward_features(x)
    return tokens[:, 0], tokens[:, 1:]


@pytest.mark.parametrize("res", [256, 512])
def test_torch_hub_file_gives_regs_position_table_and_features(dino_s_files, res):
    d, sd = dino_s_files
    enc = load_encoder("dinov2-vit-s", weights=str(d / "dinov2_vits14_pretrain.pth"), resolution=res)
    grid = 16 * res // 256
    want_pos = resample_abs_pos_embed(sd["pos_embed"], [grid, grid])  # bicubic + antialias, class row kept
    pos_diff = (enc.vit.pos_embed - want_pos).abs().max().item()
    # DINOv2's own run-time interpolation (no antialias, scale (grid + 0.1) / 37) is NOT what REG uses
    runtime = F.interpolate(sd["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
                            scale_factor=((grid + 0.1) / 37,) * 2, mode="bicubic", antialias=False)
    runtime_gap = (enc.vit.pos_embed[:, 1:] - runtime.flatten(2).transpose(1, 2)).abs().max().item()

    images = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(res))
    cls, patches = enc(images)
    ref_cls, ref_patches = reg_features(sd, images, res)
    cls_diff = (cls - ref_cls).abs().max().item()
    patch_diff = (patches - ref_patches).abs().max().item()
    print(f"\nres {res}: max|pos_embed - REG's| = {pos_diff:.3g} (run-time interpolation differs by "
          f"{runtime_gap:.3g}); max|cls diff| = {cls_diff:.3g}, max|patch diff| = {patch_diff:.3g}")
    assert enc.vit.pos_embed.shape == (1, 1 + grid * grid, 384)
    assert pos_diff <= 1e-6 and runtime_gap > 1e-3
    assert patches.shape == (2, grid * grid, 384)
    assert cls_diff <= 1e-6 and patch_diff <= 1e-6


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
    ref_cls, ref_patches = reg_features(sd, images, 64)
    assert torch.allclose(cls, ref_cls, atol=1e-6) and torch.allclose(patches, ref_patches, atol=1e-6)
    # the final norm is applied: per-token features are layer-normed then affine (weight 1, bias 0 here)
    assert torch.allclose(cls.mean(-1), torch.zeros(2), atol=1e-4)

    # random weights give different features (so the load above really loaded)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        rnd = load_encoder("dinov2-vit-s", weights="random", resolution=64)
    assert not torch.allclose(rnd(images)[0], cls)


def test_torch_hub_cache_is_used_before_the_hf_hub(dino_s_files, tmp_path, monkeypatch):
    d, sd = dino_s_files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("REG_ENC_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFoundError):
        load_encoder("dinov2-vit-s", resolution=32)
    assert local_weights("dinov2-vit-s") is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes((d / "dinov2_vits14_pretrain.pth").read_bytes())
    assert local_weights("dinov2-vit-s") == str(cached) and local_weights("dinov2-vit-b") is None
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    for enc in (load_encoder("dinov2-vit-s", resolution=32), load_encoders("dinov2-vit-s", resolution=32)[0]):
        cls, _ = enc(images)
        assert torch.allclose(cls, reg_features(sd, images, 32)[0], atol=1e-6)


def test_resample_pos_embed_is_timms_with_class_row():
    pos = smooth_table(8, seed=0)
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, 0], pos[:, 0])
    assert torch.equal(out, resample_abs_pos_embed(pos, [16, 16], num_prefix_tokens=1))
    assert torch.equal(resample_pos_embed(pos, 37), pos)
    reg = pos[:, 1:]  # timm register variants keep no class row in the table
    assert torch.equal(resample_pos_embed(reg, 4), resample_abs_pos_embed(reg, [4, 4], num_prefix_tokens=0))


def test_register_variant_drops_register_tokens():
    enc = load_encoder("dinov2reg-vit-s", weights="random", resolution=32)
    cls, patches = enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert enc.num_prefix_tokens == 5 and patches.shape == (1, 4, 384)


def test_names_and_errors(tmp_path, monkeypatch):
    assert set(ENCODERS) >= {"dinov2-vit-s", "dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g",
                             "dinov2reg-vit-b", "clip-vit-L"}
    assert parse_enc_type("dinov2-vit-b,clip-vit-L") == ["dinov2-vit-b", "clip-vit-L"]
    assert encoder_resolution(256) == 224 and encoder_resolution(512) == 448 and encoder_resolution(32) == 28
    with pytest.raises(ValueError, match="unknown encoder 'dinov4-vit-b'"):
        parse_enc_type("dinov4-vit-b")
    with pytest.raises(ValueError, match="multiple of 16"):
        load_encoder("dinov2-vit-s", weights="random", resolution=100)
    with pytest.raises(WeightsNotFoundError, match="do not exist"):
        load_encoder("dinov2-vit-s", weights=str(tmp_path / "nope.pth"), resolution=32)
    # nothing cached and offline: the message names the hub repo, the official file and the flag
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torch.hub cache file either
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFoundError) as e:
        load_encoder("dinov2-vit-b", resolution=32)
    msg = str(e.value)
    assert "timm/vit_base_patch14_dinov2.lvd142m" in msg and "dinov2_vitb14_pretrain.pth" in msg
    assert "--enc-weights" in msg and "hf download timm/vit_base_patch14_dinov2.lvd142m model.safetensors" in msg
    assert e.value.__cause__ is not None and type(e.value.__cause__).__name__ in msg  # the hub's reason is kept
    assert "huggingface-cli" not in msg
    # an unreadable file names itself and the reason, without torch's advice to load unsafely
    bad = tmp_path / "bad.pth"
    import argparse
    torch.save({"x": argparse.ArgumentParser}, bad)
    with pytest.raises(ValueError, match="bad.pth") as e:
        load_encoder("dinov2-vit-s", weights=str(bad), resolution=32)
    assert "weights_only" not in str(e.value) and "argparse" in str(e.value)
    with pytest.raises(ValueError, match="2 encoders but 3"):
        load_encoders("dinov2-vit-s,dinov2-vit-s", weights="a,b,c", resolution=32)


TINY = dict(depth=2, embed_dim=64, num_heads=2)  # timm overrides: the real layouts, tiny widths


def _random(name: str, res: int, **kw):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return load_encoder(name, weights="random", resolution=res, timm_kwargs={**TINY, **kw})


def test_clip_tokens_are_repas_without_ln_post():
    """REPA's CLIP wrapper (models/clip_vit.py UpdatedVisionTransformer, REG's copy the same): conv1, class
    embedding, positional embedding, ln_pre, the blocks, then the tokens as they are (ln_post commented
    out). Computed by hand from the encoder's own parameters, at REPA's input 224 * (res // 256)."""
    enc = _random("clip-vit-L", 256)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    x = (F.interpolate(images / 255.0, 224 * (256 // 256), mode="bicubic") - mean) / std  # REPA preprocess_raw_image
    v = enc.vit
    with torch.no_grad():
        v.blocks[-1].mlp.fc2.bias.add_(3.0)  # random init leaves tokens near-normed: make ln_post visible
        h = v.patch_embed.proj(x).flatten(2).transpose(1, 2)  # conv1: (N, 256, D)
        h = torch.cat([v.cls_token.expand(2, -1, -1), h], dim=1) + v.pos_embed
        h = v.blocks(v.norm_pre(h))  # ln_pre, transformer
    cls, patches = enc(images)
    assert patches.shape == (2, 256, 64)
    assert torch.allclose(patches, h[:, 1:], atol=1e-5) and torch.allclose(cls, h[:, 0], atol=1e-5)
    normed = F.layer_norm(h[:, 1:], (64,))  # what timm's ln_post would give (weight 1, bias 0 at init)
    assert (patches - normed).abs().max() > 0.1


def test_dinov3_patch_tokens_exclude_registers_and_hub_file_is_found(tmp_path, monkeypatch):
    """DINOv3 ViT/16 (timm Eva): [class, 4 registers, patches]; at 256 px the image goes in as it is (16 x 16
    patches = SiT's tokens). The torch.hub cache file (name with its hash) is found as DINOv2's is."""
    enc = _random("dinov3-vit-s", 256)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert enc.input_size == 256 and enc.num_prefix_tokens == 5
    x = enc.preprocess(images)
    assert torch.equal(x, (images / 255.0 - MEAN) / STD)  # ImageNet mean/std, no resize
    with torch.no_grad():
        tokens = enc.vit.forward_features(x)  # (N, 1 + 4 + 256, D)
    cls, patches = enc(images)
    assert tokens.shape == (2, 261, 64) and patches.shape == (2, 256, 64)
    assert torch.equal(cls, tokens[:, 0]) and torch.equal(patches, tokens[:, 5:])
    for r in range(1, 5):  # no register token among the patch tokens
        assert (patches - tokens[:, r:r + 1]).abs().amax(-1).min() > 1e-3

    # weights from the torch.hub cache, named as the official download (with its hash)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    cached.parent.mkdir(parents=True)
    torch.save(enc.vit.state_dict(), cached)
    assert local_weights("dinov3-vit-s") == str(cached)
    small = load_encoder("dinov3-vit-s", resolution=32, timm_kwargs=TINY)  # RoPE: any grid, here 2 x 2
    img32 = images[:, :, :32, :32].contiguous()
    with torch.no_grad():
        want = enc.vit.forward_features((img32 / 255.0 - MEAN) / STD)
    got_cls, got = small(img32)
    assert got.shape == (2, 4, 64) and torch.allclose(got, want[:, 5:], atol=1e-5)


def test_siglip2_token_is_the_map_head_output(tmp_path):
    """SigLIP 2 has no class token: every token is a patch, and REG's token is the attention-pooled (MAP head)
    image embedding. Its 16 x 16 position table is resampled once to 16 * res / 256, as DINOv2's."""
    from safetensors.torch import save_file
    enc = _random("siglip2-vit-b", 256)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert enc.num_prefix_tokens == 0 and enc.vit.global_pool == "map"
    x = enc.preprocess(images)
    assert torch.equal(x, (images / 255.0 - 0.5) / 0.5)
    with torch.no_grad():
        tokens = enc.vit.forward_features(x)
        pooled = enc.vit.attn_pool(tokens)
    cls, patches = enc(images)
    assert patches.shape == (2, 256, 64) and torch.equal(patches, tokens)
    assert cls.shape == (2, 64) and torch.allclose(cls, pooled, atol=1e-6)
    assert not torch.allclose(cls, tokens.mean(1), atol=1e-3)

    sd = {k: v.contiguous() for k, v in enc.vit.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    small = load_encoder("siglip2-vit-b", weights=str(tmp_path), resolution=32, timm_kwargs=TINY)
    assert torch.equal(small.vit.pos_embed, resample_abs_pos_embed(sd["pos_embed"], [2, 2], num_prefix_tokens=0))
    assert small(images[:, :, :32, :32].contiguous())[1].shape == (2, 4, 64)
