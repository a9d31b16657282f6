"""Encoders: timm DINOv2 loaded through the user-facing path from files the test creates."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed import resample_abs_pos_embed

from models.encoders import (ENCODERS, WeightsNotFoundError, encoder_resolution, load_encoder, load_encoders,
                             local_weights, parse_enc_type, resample_pos_embed)
from reg.utils import UserError

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


# ----------------------------------------------------------------------------- independent towers
# Each family's forward written from its published architecture with plain torch ops (no timm block), fed the
# weights in the family's own naming (OpenAI CLIP, torch.hub DINOv2 / DINOv3), and compared with what
# load_encoder builds from the same file: activation, norm eps, position table, mean/std and token choice.

CLIP_MEAN_STD = (torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1),
                 torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1))


def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _attention(x, sd, qkv, out, heads, rope=None, prefix=0):
    """Multi-head self-attention with packed q, k, v weights (OpenAI's in_proj, DINO's qkv: the same layout);
    rope = (sin, cos) rotates the queries and keys of the tokens after `prefix` (DINOv3)."""
    n, t, d = x.shape
    q, k, v = F.linear(x, sd[f"{qkv}weight"], sd[f"{qkv}bias"]).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if rope is not None:
        sin, cos = rope
        q, k = (torch.cat([z[:, :, :prefix], z[:, :, prefix:] * cos + _rotate_half(z[:, :, prefix:]) * sin], 2)
                for z in (q, k))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)  # (N, heads, T, T)
    return F.linear((a @ v).transpose(1, 2).reshape(n, t, d), sd[f"{out}.weight"], sd[f"{out}.bias"])


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


EMBED_STD = 3e-3  # the token embeddings' scale: the first LayerNorm sees variance ~1e-5, where its eps shows


def _random_like_naming(shapes: dict, seed: int) -> dict:
    """Random weights of the given shapes: norms near 1, layers at a scale that keeps activations O(1) and
    makes every nonlinearity count (QuickGELU and GELU differ visibly), and the token embeddings (patch
    projection, class token, positions) at EMBED_STD, so that the first norm's eps counts too."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) > 1 else 0.5
        if any(e in name for e in ("conv1", "patch_embed", "class_embedding", "cls_token", "positional_embedding",
                                   "pos_embed", "register_tokens", "storage_tokens")):
            scale = EMBED_STD / math.sqrt(fan_in) if len(shape) == 4 else EMBED_STD
        sd[name] = torch.randn(shape, generator=g) * scale
        if ("ln" in name or "norm" in name) and name.endswith("weight"):
            sd[name] = 1 + 0.2 * torch.randn(shape, generator=g)
    return sd


def openai_clip_visual(width: int, layers: int, grid: int, patch: int = 14, seed: int = 0) -> dict:
    """A random CLIP image tower in OpenAI's naming (`visual.*`, as clip.load's state_dict has it)."""
    shapes = {"conv1.weight": (width, 3, patch, patch), "class_embedding": (width,),
              "positional_embedding": (1 + grid * grid, width), "ln_pre.weight": (width,), "ln_pre.bias": (width,),
              "ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, width // 2)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "ln_2.weight": (width,),
                       b + "ln_2.bias": (width,), b + "attn.in_proj_weight": (3 * width, width),
                       b + "attn.in_proj_bias": (3 * width,), b + "attn.out_proj.weight": (width, width),
                       b + "attn.out_proj.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width),
                       b + "mlp.c_fc.bias": (4 * width,), b + "mlp.c_proj.weight": (width, 4 * width),
                       b + "mlp.c_proj.bias": (width,)})
    return {f"visual.{k}": v for k, v in _random_like_naming(shapes, seed).items()}


def repa_clip_tokens(visual: dict, images: torch.Tensor, quick_gelu: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """REPA's CLIP target: preprocess_raw_image (/255, bicubic to 224 * (R // 256), CLIP mean/std), then
    OpenAI's VisionTransformer as REPA's UpdatedVisionTransformer runs it: conv1, class embedding, positional
    embedding, ln_pre, the residual blocks (LayerNorm eps 1e-5, QuickGELU x sigmoid(1.702 x), heads = width/64),
    and the tokens without ln_post. Returns all 1 + T tokens (REPA keeps [:, 1:])."""
    sd = {k[len("visual."):]: v for k, v in visual.items()}
    mean, std = CLIP_MEAN_STD
    x = (F.interpolate(images / 255.0, 224 * (images.shape[-1] // 256), mode="bicubic") - mean) / std
    w = sd["conv1.weight"]
    h = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # (N, G*G, D)
    h = torch.cat([sd["class_embedding"].expand(len(x), 1, -1), h], dim=1) + sd["positional_embedding"]
    h = _ln(h, sd, "ln_pre", eps)
    heads = h.shape[-1] // 64
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        h = h + _attention(_ln(h, sd, b + "ln_1", eps), sd, b + "attn.in_proj_", b + "attn.out_proj", heads)
        u = F.linear(_ln(h, sd, b + "ln_2", eps), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        u = u * torch.sigmoid(1.702 * u) if quick_gelu else F.gelu(u)
        h = h + F.linear(u, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return h


def test_clip_is_repas_openai_tower(tmp_path):
    """clip-vit-L from an OpenAI-format file equals REPA's tower written from the CLIP architecture
    (QuickGELU, eps 1e-5, no ln_post, CLIP mean/std after the resize), to float rounding; with GELU in the
    reference instead, the tokens are visibly off (the activation matters at these weights)."""
    visual = openai_clip_visual(width=128, layers=2, grid=16)
    torch.save(visual, tmp_path / "clip_visual.pt")
    enc = load_encoder("clip-vit-L", weights=str(tmp_path / "clip_visual.pt"), resolution=256,
                       timm_kwargs=dict(depth=2, embed_dim=128, num_heads=2))
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cls, patches = enc(images)
    want = repa_clip_tokens(visual, images)
    assert patches.shape == (2, 256, 128) and cls.shape == (2, 128)
    assert_close_tokens(patches, want[:, 1:])  # REPA's target: tokens 1.., no ln_post
    assert_close_tokens(cls, want[:, 0])  # REG's token: token 0 of the same output
    # the comparison sees each choice: GELU for QuickGELU, another eps (the tokens start small), ln_post applied
    wrong = {"GELU": repa_clip_tokens(visual, images, quick_gelu=False), "eps 1e-6": repa_clip_tokens(visual, images, eps=1e-6)}
    for what, tokens in wrong.items():
        assert (tokens[:, 1:] - patches).abs().max() > 10 * TOKEN_RTOL * patches.abs().max(), what
    ln_post = _ln(want, {k[7:]: v for k, v in visual.items()}, "ln_post", 1e-5)
    assert (ln_post[:, 1:] - patches).abs().max() > 0.1
    # at 512 px (which REPA refuses for CLIP) the 16 x 16 table is resampled to 32 x 32 as DINOv2's is
    big = load_encoder("clip-vit-L", weights=str(tmp_path / "clip_visual.pt"), resolution=512,
                       timm_kwargs=dict(depth=2, embed_dim=128, num_heads=2))
    table = visual["visual.positional_embedding"][None]
    assert torch.allclose(big.vit.pos_embed, resample_abs_pos_embed(table, [32, 32], num_prefix_tokens=1), atol=1e-7)
    print(f"\nCLIP: max|ours - REPA's tower| = {(patches - want[:, 1:]).abs().max():.1e}; "
          f"GELU moves tokens by {(wrong['GELU'] - want).abs().max():.1e} at token scale {want.abs().max():.1f}")


TOKEN_RTOL = 3e-6  # float32 through two blocks: measured up to 6e-7


def assert_close_tokens(got: torch.Tensor, want: torch.Tensor) -> None:
    gap, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert gap <= TOKEN_RTOL * scale, f"max |ours - reference| = {gap:.3g} at token scale {scale:.3g}"


def dinov2_hub_state_dict(width: int, layers: int, registers: int = 0, swiglu: bool = False, seed: int = 0) -> dict:
    """A random DINOv2 in the torch.hub file's naming (37 x 37 position table with its class row, mask_token,
    LayerScale ls1/ls2, `register_tokens` for the _reg4 models, w12/w3 SwiGLU for ViT-g)."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + 37 * 37, width), "mask_token": (1, width),
              "patch_embed.proj.weight": (width, 3, 14, 14), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    if registers:
        shapes["register_tokens"] = (1, registers, width)
    hidden = (int(4 * width * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * width  # DINOv2's SwiGLUFFNFused
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "norm2.weight": (width,),
                       b + "norm2.bias": (width,), b + "attn.qkv.weight": (3 * width, width),
                       b + "attn.qkv.bias": (3 * width,), b + "attn.proj.weight": (width, width),
                       b + "attn.proj.bias": (width,), b + "ls1.gamma": (width,), b + "ls2.gamma": (width,)})
        mlp = ({"mlp.w12.weight": (2 * hidden, width), "mlp.w12.bias": (2 * hidden,), "mlp.w3.weight": (width, hidden),
                "mlp.w3.bias": (width,)} if swiglu else
               {"mlp.fc1.weight": (hidden, width), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden),
                "mlp.fc2.bias": (width,)})
        shapes.update({b + k: v for k, v in mlp.items()})
    sd = _random_like_naming(shapes, seed)
    sd["pos_embed"] = EMBED_STD * smooth_table(width, seed=seed + 1)  # smooth: resampling methods differ visibly
    return sd


def repa_dinov2_tokens(sd: dict, images: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """REPA's DINOv2 (utils.py load_encoders, train.py preprocess_raw_image), written from DINOv2's code:
    the position table resampled once with timm's resample_abs_pos_embed to 16 (R // 256) a side; /255,
    ImageNet mean/std, bicubic to 224 (R // 256); patch embedding, class token, the table added as it is
    (its size matches, so DINOv2's run-time interpolation returns it unchanged), the registers inserted after
    the class token; blocks x + ls1 attn(norm1 x), x + ls2 mlp(norm2 x) with LayerNorm eps 1e-6 and exact GELU
    (SwiGLU silu(x1) x2 for ViT-g); the final norm. Returns (x_norm_clstoken, x_norm_patchtokens)."""
    grid, size = 16 * (images.shape[-1] // 256), 224 * (images.shape[-1] // 256)
    pos = resample_abs_pos_embed(sd["pos_embed"], [grid, grid])
    x = F.interpolate((images / 255.0 - MEAN) / STD, size, mode="bicubic")
    w = sd["patch_embed.proj.weight"]
    h = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    h = torch.cat([sd["cls_token"].expand(len(x), -1, -1), h], 1) + pos
    regs = sd.get("register_tokens")
    if regs is not None:
        h = torch.cat([h[:, :1], regs.expand(len(x), -1, -1), h[:, 1:]], 1)
    heads = h.shape[-1] // 64
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        b = f"blocks.{i}."
        h = h + sd[b + "ls1.gamma"] * _attention(_ln(h, sd, b + "norm1", eps), sd, b + "attn.qkv.", b + "attn.proj", heads)
        u = _ln(h, sd, b + "norm2", eps)
        if b + "mlp.w12.weight" in sd:
            x1, x2 = F.linear(u, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            u = F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            u = F.linear(F.gelu(F.linear(u, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        h = h + sd[b + "ls2.gamma"] * u
    h = _ln(h, sd, "norm", eps)
    return h[:, 0], h[:, 1 + (0 if regs is None else regs.shape[1]):]


@pytest.mark.parametrize("name, width, registers, swiglu", [
    ("dinov2-vit-s", 128, 0, False), ("dinov2reg-vit-s", 128, 4, False), ("dinov2-vit-g", 96, 0, True)])
@pytest.mark.parametrize("res", [256, 512])
def test_dinov2_is_repas_torch_hub_tower(tmp_path, name, width, registers, swiglu, res):
    """Each DINOv2 family from a torch.hub-format file equals REPA's DINOv2 written from DINOv2's code (the
    table resampled once, eps 1e-6, GELU / SwiGLU, LayerScale, registers after the class token and out of the
    patch tokens, ImageNet mean/std before the resize), at 256 and 512 px."""
    sd = dinov2_hub_state_dict(width, layers=2, registers=registers, swiglu=swiglu)
    torch.save(sd, tmp_path / "hub.pth")
    heads = width // 64
    enc = load_encoder(name, weights=str(tmp_path / "hub.pth"), resolution=res,
                       timm_kwargs=dict(depth=2, embed_dim=width, num_heads=heads))
    images = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(res))
    cls, patches = enc(images)
    want_cls, want_patches = repa_dinov2_tokens(sd, images)
    grid = 16 * res // 256
    assert patches.shape == (2, grid * grid, width) and cls.shape == (2, width)
    assert_close_tokens(patches, want_patches)
    assert_close_tokens(cls, want_cls)
    other_eps = repa_dinov2_tokens(sd, images, eps=1e-5)[1]  # the tokens start small (variance ~1e-5): eps is seen
    assert (other_eps - patches).abs().max() > 10 * TOKEN_RTOL * patches.abs().max()


def dinov3_hub_state_dict(width: int, layers: int, heads: int, qv_bias: float = 0.0, seed: int = 0) -> dict:
    """A random DINOv3 ViT/16 in the torch.hub file's naming: class and 4 storage (register) tokens, no position
    table (RoPE: `rope_embed.periods`), LayerScale ls1/ls2, a q, k, v bias with its k-masking `bias_mask`
    (k bias random here: the mask must remove it; q and v biases `qv_bias` times random)."""
    shapes = {"cls_token": (1, 1, width), "storage_tokens": (1, 4, width), "mask_token": (1, width),
              "patch_embed.proj.weight": (width, 3, 16, 16), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "norm2.weight": (width,),
                       b + "norm2.bias": (width,), b + "attn.qkv.weight": (3 * width, width),
                       b + "attn.qkv.bias": (3 * width,), b + "attn.proj.weight": (width, width),
                       b + "attn.proj.bias": (width,), b + "ls1.gamma": (width,), b + "ls2.gamma": (width,),
                       b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                       b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,)})
    sd = _random_like_naming(shapes, seed)
    mask = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
    for i in range(layers):
        sd[f"blocks.{i}.attn.qkv.bias"] *= torch.where(mask == 1, qv_bias, 1.0)
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    head = width // heads
    sd["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head // 4) / (head // 2))  # DINOv3's base 100
    return sd


def dinov3_tokens(sd: dict, images: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3 written from Meta's code (dinov3/models/vision_transformer.py, layers/): /255, ImageNet mean/std,
    the image at R px (patch 16); [class, 4 storage tokens, patches] with no position table; in each block
    RoPE on the patch tokens' queries and keys (coordinates the patch centres in [-1, 1] per axis, angles
    2 pi c / periods, the two axes concatenated and tiled, rotate-half), the k bias masked, LayerScale,
    LayerNorm eps 1e-5, exact GELU; the final norm. Returns (x_norm_clstoken, x_norm_patchtokens)."""
    x = (images / 255.0 - MEAN) / STD
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    side = h.shape[-1]
    h = torch.cat([(sd["cls_token"] + 0 * sd["mask_token"]).expand(len(x), -1, -1),
                   sd["storage_tokens"].expand(len(x), -1, -1), h.flatten(2).transpose(1, 2)], 1)
    centres = torch.arange(0.5, side) / side
    coords = 2 * torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).flatten(0, 1) - 1  # (HW, 2)
    angles = (2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"]).flatten(1, 2).tile(2)  # (HW, head dim)
    rope = (torch.sin(angles), torch.cos(angles))
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        b = f"blocks.{i}."
        qkv = {f"{b}attn.qkv.weight": sd[b + "attn.qkv.weight"],
               f"{b}attn.qkv.bias": sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]}
        h = h + sd[b + "ls1.gamma"] * _attention(_ln(h, sd, b + "norm1", 1e-5), {**sd, **qkv}, b + "attn.qkv.",
                                                 b + "attn.proj", heads, rope=rope, prefix=5)
        u = F.gelu(F.linear(_ln(h, sd, b + "norm2", 1e-5), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        h = h + sd[b + "ls2.gamma"] * F.linear(u, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    h = _ln(h, sd, "norm", 1e-5)
    return h[:, 0], h[:, 5:]


@pytest.mark.parametrize("res", [256, 512])
def test_dinov3_is_metas_tower(tmp_path, res):
    """dinov3-vit-s from a file in Meta's naming equals DINOv3 written from Meta's code: RoPE, storage tokens
    out of the patch tokens, eps 1e-5, ImageNet mean/std, the image at R px. A file whose q/v bias is not zero
    (timm's DINOv3 has none: it would be dropped) is refused, naming it."""
    sd = dinov3_hub_state_dict(width=64, layers=2, heads=2)
    torch.save(sd, tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    enc = load_encoder("dinov3-vit-s", weights=str(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
                       resolution=res, timm_kwargs=TINY)
    images = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    cls, patches = enc(images)
    want_cls, want_patches = dinov3_tokens(sd, images, heads=2)
    assert patches.shape == (2, (res // 16) ** 2, 64)
    assert_close_tokens(patches, want_patches)
    assert_close_tokens(cls, want_cls)

    torch.save(dinov3_hub_state_dict(width=64, layers=2, heads=2, qv_bias=1.0), tmp_path / "biased.pth")
    with pytest.raises(ValueError, match=r"biased.pth have a non-zero attention bias \(blocks.0.attn.qkv.bias"):
        load_encoder("dinov3-vit-s", weights=str(tmp_path / "biased.pth"), resolution=res, timm_kwargs=TINY)


def siglip_tokens(sd: dict, images: torch.Tensor, heads: int, gelu_tanh: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP 2's image tower written from big_vision's ViT (models/vit.py): x / 255 in [-1, 1], the image at R px
    (patch 16), a learned position table and no class token; blocks x + attn(LN x), x + MLP(LN x) with flax's
    LayerNorm (eps 1e-6) and nn.gelu (the tanh approximation); the encoder norm; then the MAP head: a learned
    probe attends over the tokens, LN, x + MLP. In timm's naming, where these weights are published. Returns
    (MAP-head output, tokens)."""
    act = (lambda u: F.gelu(u, approximate="tanh")) if gelu_tanh else F.gelu
    x = (images / 255.0 - 0.5) / 0.5
    side = images.shape[-1] // 16
    pos = resample_abs_pos_embed(sd["pos_embed"], [side, side], num_prefix_tokens=0)
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    h = h + pos

    def mlp(u, b):
        return F.linear(act(F.linear(u, sd[b + "fc1.weight"], sd[b + "fc1.bias"])), sd[b + "fc2.weight"], sd[b + "fc2.bias"])

    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        b = f"blocks.{i}."
        h = h + _attention(_ln(h, sd, b + "norm1", 1e-6), sd, b + "attn.qkv.", b + "attn.proj", heads)
        h = h + mlp(_ln(h, sd, b + "norm2", 1e-6), b + "mlp.")
    h = _ln(h, sd, "norm", 1e-6)
    n, t, d = h.shape
    q = F.linear(sd["attn_pool.latent"], sd["attn_pool.q.weight"], sd["attn_pool.q.bias"]).reshape(1, heads, 1, d // heads)
    k, v = (z.reshape(n, t, heads, d // heads).transpose(1, 2)
            for z in F.linear(h, sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"]).chunk(2, dim=-1))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    p = F.linear((a @ v).transpose(1, 2).reshape(n, 1, d), sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"])
    p = p + mlp(_ln(p, sd, "attn_pool.norm", 1e-6), "attn_pool.mlp.")
    return p[:, 0], h


@pytest.mark.parametrize("res", [256, 512])
def test_siglip2_is_big_visions_tower(tmp_path, res):
    """siglip2-vit-b equals SigLIP's image tower written from big_vision: tanh GELU (timm's own SigLIP uses the
    exact one, visibly different here), eps 1e-6, mean/std 0.5, no class token (every token a patch), REG's
    token the MAP head's output; at 512 px its 16 x 16 table resampled as DINOv2's."""
    from safetensors.torch import save_file
    shapes = {k: tuple(v.shape) for k, v in _random("siglip2-vit-b", 256).vit.state_dict().items()}
    sd = _random_like_naming(shapes, seed=5)
    save_file(sd, str(tmp_path / "model.safetensors"))
    enc = load_encoder("siglip2-vit-b", weights=str(tmp_path), resolution=res, timm_kwargs=TINY)
    images = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    cls, patches = enc(images)
    want_cls, want_patches = siglip_tokens(sd, images, heads=2)
    assert patches.shape == (2, (res // 16) ** 2, 64) and cls.shape == (2, 64)
    assert_close_tokens(patches, want_patches)
    assert_close_tokens(cls, want_cls)
    exact_gelu = siglip_tokens(sd, images, heads=2, gelu_tanh=False)[1]
    assert (exact_gelu - patches).abs().max() > 10 * TOKEN_RTOL * patches.abs().max()


def test_a_weights_list_of_the_wrong_length_names_where_it_came_from(monkeypatch):
    """--enc-weights, or REG_ENC_WEIGHTS when the flag is not given: refused before any encoder is built,
    naming the one the value came from."""
    monkeypatch.setenv("REG_ENC_WEIGHTS", "a.pth,b.pth,c.pth")
    with pytest.raises(UserError, match=r"2 encoders but 3 REG_ENC_WEIGHTS entries \('a.pth,b.pth,c.pth'\)"):
        load_encoders("dinov2-vit-s,dinov2-vit-b")
    with pytest.raises(UserError, match=r"2 encoders but 1 --enc-weights entries \('a.pth'\)"):
        load_encoders("dinov2-vit-s,dinov2-vit-b", weights="a.pth")
