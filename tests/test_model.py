"""SiT + REG model: official names, shapes, sizes, numerics against a plain reference forward."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.sit import SiT, SiT_models, build_model, get_2d_sincos_pos_embed, model_depth

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
            num_classes=10, z_dims=[32], encoder_depth=2, projector_dim=48)


def official_keys(depth: int, n_proj: int, cls: bool = True, qk_norm: bool = False) -> set[str]:
    """The official REG/REPA state_dict names, as in REG models/sit.py (docs/design.md#token-layout)."""
    keys = {"x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight", "pos_embed",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    keys |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
        if qk_norm:
            keys |= {f"blocks.{i}.attn.{n}.{w}" for n in ("q_norm", "k_norm") for w in ("weight", "bias")}
    for k in range(n_proj):
        keys |= {f"projectors.{k}.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")}
    if cls:
        keys |= {"final_layer.linear_cls.weight", "final_layer.linear_cls.bias",
                 "cls_projectors2.weight", "cls_projectors2.bias", "wg_norm.weight", "wg_norm.bias"}
    return keys


# ----------------------------------------------------------------------------- reference forward

def reference_forward(sd, x, t, y, cls, *, depth, heads, patch, encoder_depth):
    """The forward of REG models/sit.py written out with plain tensor ops on an official-name state_dict."""
    lin = lambda h, name: F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])
    N, C, H, W = x.shape
    D = sd["x_embedder.proj.weight"].shape[0]
    # patchify: conv with stride p == linear on flattened (C, p, p) patches
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (N, C, h, w, p, p)
    h, w = patches.shape[2], patches.shape[3]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(N, h * w, C * patch * patch)
    tok = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"]
    c_tok = F.layer_norm(lin(cls, "cls_projectors2"), (D,), sd["wg_norm.weight"], sd["wg_norm.bias"], eps=1e-6)
    tok = torch.cat([c_tok[:, None], tok], 1) + sd["pos_embed"]
    half = 128
    # the sinusoidal features in float32 whatever the model's dtype, as the authors' TimestepEmbedder does
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    temb = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], -1).to(t.dtype)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda h: F.layer_norm(h, (D,), eps=1e-6)
    dh = D // heads
    zs = None
    for i in range(depth):
        b = f"blocks.{i}"
        mod = lin(F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, -1)
        hmod = ln(tok) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = lin(hmod, f"{b}.attn.qkv").reshape(N, -1, 3, heads, dh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
        att = lin(att.transpose(1, 2).reshape(N, -1, D), f"{b}.attn.proj")
        tok = tok + mod[2][:, None] * att
        hmod = ln(tok) * (1 + mod[4][:, None]) + mod[3][:, None]
        mlp = lin(F.gelu(lin(hmod, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        tok = tok + mod[5][:, None] * mlp
        if i + 1 == encoder_depth:
            zs = lin(F.silu(lin(F.silu(lin(tok, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    tok = ln(tok) * (1 + scale[:, None]) + shift[:, None]
    cls_out = lin(tok[:, 0], "final_layer.linear_cls")
    out = lin(tok[:, 1:], "final_layer.linear").reshape(N, h, w, patch, patch, C)
    out = out.permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
    return out, zs, cls_out


def test_official_names_strict_load_and_reference_numerics():
    """In float64, so that the tolerance leaves no room for a changed layer: exact instead of tanh GELU
    moves the output by ~1e-3, float32 rounding alone by ~1e-6; float64 rounding stays below 1e-12."""
    torch.manual_seed(0)
    depth, heads, patch = 4, 4, 2  # SiT-B/2's structure, narrower (a 130M-parameter init costs seconds)
    model = SiT(input_size=8, hidden_size=96, depth=depth, num_heads=heads, encoder_depth=2, z_dims=[64],
                projector_dim=80, cls_token_dim=64).eval().double()
    assert set(model.state_dict()) == official_keys(depth, n_proj=1)
    # A state_dict made only from the official names, with random values everywhere
    # (adaLN-Zero init would hide most of the network behind zeros).
    sd = {k: torch.randn(v.shape, dtype=torch.float64) * (0.5 / math.sqrt(v.shape[-1]) if v.dim() > 1 else 0.1)
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    y, cls = torch.tensor([3, 1000]), torch.randn(2, 64, dtype=torch.float64)
    with torch.no_grad():
        v, zs, cv = model(x, t, y, cls_token=cls)
        rv, rz, rc = reference_forward(sd, x, t, y, cls, depth=depth, heads=heads, patch=patch, encoder_depth=2)
    assert v.dtype == zs[0].dtype == cv.dtype == torch.float64
    err = max((v - rv).abs().max(), (zs[0] - rz).abs().max(), (cv - rc).abs().max()).item()
    print(f"official-name forward vs the plain-ops reference (float64): max abs diff {err:.3g}")
    assert err < 1e-10
    assert v.abs().mean() > 1e-2  # not trivially zero


def test_repa_and_plain_names():
    repa = SiT(**{**TINY, "use_cls_token": False})
    assert set(repa.state_dict()) == official_keys(TINY["depth"], 1, cls=False)
    plain = SiT(**{**TINY, "use_cls_token": False, "z_dims": []})
    assert set(plain.state_dict()) == official_keys(TINY["depth"], 0, cls=False)
    qk = SiT(**{**TINY, "qk_norm": True})
    assert set(qk.state_dict()) == official_keys(TINY["depth"], 1, qk_norm=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    v, zs, cv = repa.eval()(x, t, y)
    assert v.shape == x.shape and zs[0].shape == (2, 16, 32) and cv is None
    v, zs, cv = plain.eval()(x, t, y)
    assert v.shape == x.shape and zs == [] and cv is None


@pytest.mark.parametrize("name", list(SiT_models))
def test_registry_forward_shapes(name):
    patch = int(name.split("/")[1])
    size = 16 if patch == 8 else 8
    kwargs = dict(input_size=size, encoder_depth=2, z_dims=[768, 1024])
    if name.startswith(("SiT-T", "SiT-S")):
        model = SiT_models[name](**kwargs).eval()  # real tensors: check values are finite too
    else:
        with torch.device("meta"):  # shape propagation only; building XL for real costs seconds and GBs
            model = SiT_models[name](**kwargs).eval()
    dev = next(model.parameters()).device
    T = (size // patch) ** 2
    x = torch.randn(2, 4, size, size, device=dev)
    v, zs, cv = model(x, torch.rand(2, device=dev), torch.tensor([1, 2], device=dev),
                      cls_token=torch.randn(2, 768, device=dev))
    assert v.shape == (2, 4, size, size)
    assert [tuple(z.shape) for z in zs] == [(2, 1 + T, 768), (2, 1 + T, 1024)]
    assert cv.shape == (2, 768)
    if dev.type == "cpu":
        assert torch.isfinite(v).all() and torch.isfinite(zs[0]).all()


@pytest.mark.parametrize("name,without,with_", [
    ("SiT-S/2", 33_549_328, 40_107_792),
    ("SiT-B/2", 131_683_600, 139_028_496),
    ("SiT-L/2", 459_664_144, 467_533_328),
    ("SiT-XL/2", 676_886_032, 685_017_360),
])
def test_parameter_counts_match_the_official_models(name, without, with_):
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, encoder_depth=4, z_dims=[768])
    total = sum(p.numel() for p in model.parameters())
    proj = sum(p.numel() for p in model.projectors.parameters())
    print(f"{name}: {total - proj:,} without projector, {total:,} with")
    assert (total - proj, total) == (without, with_)


def test_initialisation():
    model = SiT(**TINY)
    sd = model.state_dict()
    zero = [k for k in sd if re.match(r"(blocks\.\d+\.|final_layer\.)adaLN_modulation\.1\.", k)]
    zero += [f"final_layer.{n}.{w}" for n in ("linear", "linear_cls") for w in ("weight", "bias")]
    for k in zero:
        assert torch.count_nonzero(sd[k]) == 0, k
    assert abs(sd["y_embedder.embedding_table.weight"].std().item() - 0.02) < 0.005
    assert abs(sd["t_embedder.mlp.0.weight"].std().item() - 0.02) < 0.005
    w = sd["blocks.0.attn.qkv.weight"]  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape)) + 1e-6 and w.abs().max() > 0.8 * math.sqrt(6 / sum(w.shape))
    assert torch.count_nonzero(sd["blocks.0.attn.qkv.bias"]) == 0
    # pos_embed: row 0 (class token) zeros, the rest the MAE 2-D sin-cos table
    pe = sd["pos_embed"][0]
    assert torch.count_nonzero(pe[0]) == 0
    D, g = TINY["hidden_size"], TINY["input_size"] // TINY["patch_size"]
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    i, j = 1, 2  # token (row 1, col 2): first half encodes the column, second half the row (MAE order)
    expect = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
    np.testing.assert_allclose(pe[1 + i * g + j].numpy(), expect, atol=1e-6)
    assert get_2d_sincos_pos_embed(D, g).shape == (g * g, D)


def test_label_dropout_only_in_training():
    model = SiT(**TINY)
    y = torch.zeros(4000, dtype=torch.long)
    emb = model.y_embedder
    dropped = (emb.token_drop(y) == TINY["num_classes"]).float().mean().item()
    assert 0.08 < dropped < 0.12
    table = emb.embedding_table.weight
    assert torch.equal(emb(y[:8], train=False), table[y[:8]])


def test_fused_attention_matches_plain():
    torch.manual_seed(1)
    model = SiT(**TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y, c = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]), torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x, t, y, cls_token=c)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        plain = model(x, t, y, cls_token=c)
    assert (ref[0] - plain[0]).abs().max() < 1e-5
    assert (ref[2] - plain[2]).abs().max() < 1e-5


def test_bf16_autocast_forward_close_to_fp32():
    torch.manual_seed(2)
    model = SiT(**TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), torch.randn(2, 32)
    with torch.no_grad():
        ref, _, _ = model(x, t, y, cls_token=c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, zs, cv = model(x, t, y, cls_token=c)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'SiT-M/2'"):
        build_model("SiT-M/2", input_size=8)
    with pytest.raises(ValueError, match="encoder_depth"):
        SiT(**{**TINY, "encoder_depth": 4})
    with pytest.raises(ValueError, match="not divisible by patch size"):
        SiT(**{**TINY, "input_size": 9})
    with pytest.raises(TypeError, match="unexpected keyword"):
        SiT(**TINY, hiden_size=3)
    model = SiT(**TINY)
    with pytest.raises(ValueError, match="pass cls_token"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    # a state_dict of the wrong size names the keys and both shapes
    bigger = SiT(**{**TINY, "z_dims": [48]}).state_dict()
    with pytest.raises(ValueError, match=r"projectors\.0\.4\.weight: checkpoint \(48, 48\) vs model \(32, 48\)"):
        model.load_state_dict(bigger)
    sd = model.state_dict()
    sd.pop("wg_norm.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \[wg_norm.bias\].*unexpected keys \[extra.weight\]"):
        model.load_state_dict(sd)


@pytest.mark.slow
def test_torch_compile_forward_matches_eager():
    torch.manual_seed(3)
    model = SiT(**{**TINY, "depth": 2, "encoder_depth": 1}).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), torch.randn(2, 32)
    with torch.no_grad():
        ref = model(x, t, y, cls_token=c)[0]
        out = torch.compile(model)(x, t, y, cls_token=c)[0]
    assert (out - ref).abs().max() < 1e-4


def test_null_row_exists_without_label_dropout():
    """--cfg-prob 0 still builds num_classes + 1 rows, so such checkpoints can be guided and their class
    count is read unambiguously (rows - 1)."""
    from reg.loading import infer_config

    y = torch.zeros(1000, dtype=torch.long)
    for prob in (0.0, 0.1):
        model = SiT_models["SiT-T/2"](input_size=4, num_classes=5, z_dims=[16], encoder_depth=1, projector_dim=16,
                                      class_dropout_prob=prob)
        assert model.y_embedder.embedding_table.num_embeddings == 5 + 1
        assert infer_config(model.state_dict())["num_classes"] == 5
        table = model.y_embedder.embedding_table.weight
        dropped = (model.y_embedder(y, train=True) == table[5]).all(-1).float().mean().item()  # the null row
        if prob == 0.0:  # training never drops a label
            assert torch.equal(model.y_embedder(y, train=True), table[y])
        else:  # about 100 of 1000 labels become the null label
            assert 0.05 < dropped < 0.15


def test_projections_skipped_for_sampling_training_output_unchanged():
    from samplers import euler_maruyama_sampler, euler_sampler

    torch.manual_seed(3)
    model = SiT(**TINY)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y, c = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]), torch.randn(3, 32)
    calls = []
    model.projectors[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        v, zs, cv = model.eval()(x, t, y, cls_token=c)  # default: the training output, projections included
        assert len(zs) == 1 and zs[0].shape == (3, 1 + 16, 32) and len(calls) == 1
        v2, zs2, cv2 = model(x, t, y, cls_token=c, return_projections=False)
        assert zs2 == [] and len(calls) == 1
        assert torch.equal(v, v2) and torch.equal(cv, cv2)
        # the samplers ask for no projections, also through torch.compile's wrapper
        euler_maruyama_sampler(model, x, y, cls_latents=c, num_steps=3, cfg_scale=2.0)
        euler_sampler(model, x, y, cls_latents=c, num_steps=2)
        assert len(calls) == 1


def test_model_depth():
    assert [model_depth(n) for n in ("SiT-T/2", "SiT-S/4", "SiT-B/2", "SiT-L/8", "SiT-XL/2")] == [6, 12, 12, 24, 28]
    with pytest.raises(ValueError, match="unknown model 'SiT-M/2'"):
        model_depth("SiT-M/2")
