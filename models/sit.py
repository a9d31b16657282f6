"""SiT with REG's entangled class token (docs/design.md#token-layout; REG models/sit.py).

One file, in sections: embedders, attention and blocks, the model, sin-cos position
embeddings, and the size registry `SiT_models`.

Parameter names follow the official REG / REPA checkpoints exactly, so their state_dicts load
with `strict=True`:

    x_embedder.proj.*, t_embedder.mlp.{0,2}.*, y_embedder.embedding_table.weight, pos_embed,
    blocks.{i}.attn.{qkv,proj}.*, blocks.{i}.mlp.{fc1,fc2}.*, blocks.{i}.adaLN_modulation.1.*,
    projectors.{k}.{0,2,4}.*, final_layer.{linear,linear_cls,adaLN_modulation.1}.*,
    cls_projectors2.*, wg_norm.*

Switches that give the paper's baselines:
    use_cls_token=False               -> a REPA SiT (no class token, no linear_cls/cls_projectors2/wg_norm)
    use_cls_token=False, z_dims=[]    -> a plain SiT (no projectors either)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

# Keys a Hub folder's config.json carries besides SiT's own keyword arguments (reg/export.py): what
# sampling needs and the weights do not fix. from_pretrained passes every key to SiT(**config): ignored there.
HUB_METADATA_KEYS = ("model", "path_type", "resolution", "latents_scale", "vae", "enc_type", "train_steps")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; shift/scale are (N, D) and broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                       Embedding layers for patches, time and labels           #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a stride-p convolution (T = (H/p)(W/p))."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (no x1000 scaling: t in [0, 1] is used as is), then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) -> (N, dim): [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


# Label dropout for classifier-free guidance. REG's and REPA's SiT always use 0.1: their train.py passes
# --cfg-prob only to the model's unused `use_cfg` and to --legacy's extra drop.
CLASS_DROPOUT_PROB = 0.1


class LabelEmbedder(nn.Module):
    """Class-label table with an extra null row (index num_classes) for classifier-free guidance.

    The null row is always built, also with dropout_prob 0 (where DiT leaves it out; REG's and REPA's
    SiT always train with dropout CLASS_DROPOUT_PROB, whatever --cfg-prob says, so they always have
    it): guidance needs it, and a checkpoint's class count is never ambiguous.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                Attention and blocks                           #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention; names match timm's Attention (qkv, q_norm, k_norm, proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        # Rows of the query that get their own SDPA call (0: one call). 1 with REG's class token: 257 query
        # rows do not tile (flash/cuDNN pad them to 3 x 128), 1 + 256 do. A runtime switch, not a weight.
        self.split_rows = 0
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # timm's default qk-norm layer is nn.LayerNorm(head_dim), which is what REPA checkpoints hold.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn and 0 < self.split_rows < T:
            x = split_sdpa(q, k, v, self.split_rows)
        elif self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (N, H, T, T)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(N, T, D)
        return self.proj(x)


def split_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """SDPA with the first `rows` query rows in a call of their own; every row still attends to all keys,
    so the result is the plain call's (the softmax is per row). q, k, v: (N, H, T, Dh) -> (N, H, T, Dh)."""
    head = F.scaled_dot_product_attention(q[:, :, :rows], k, v)  # (N, H, rows, Dh)
    tail = F.scaled_dot_product_attention(q[:, :, rows:], k, v)  # (N, H, T - rows, Dh)
    return torch.cat([head, tail], dim=2)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (names match timm's Mlp)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, 1+T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, 1+T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then `linear` for the patch tokens and `linear_cls` for token 0."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_dim: int | None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        # Built at the model's own width (the original used a fixed 768, which broke SiT-S).
        self.linear_cls = nn.Linear(hidden_size, cls_dim, bias=True) if cls_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if self.linear_cls is None:
            return self.linear(x), None  # (N, T, p*p*C)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])  # (N, T, p*p*C), (N, Z)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear -> SiLU -> Linear -> SiLU -> Linear (keys 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


#################################################################################
#                                 Core SiT model                                #
#################################################################################

# No paper_url= here: huggingface_hub 0.25.2, our lower bound, refuses it; the model card that
# `python -m reg.export` writes links the paper.
class SiT(nn.Module, PyTorchModelHubMixin, library_name="reg",
          tags=["image-generation", "diffusion", "sit", "reg", "imagenet"]):
    """SiT + REPA projectors + REG class token.

    forward(x, t, y, cls_token) -> (velocity (N, C, H, W), zs [(N, 1+T, z)] per encoder, cls_velocity (N, Z))
    Without the class token the token count is T instead of 1+T and cls_velocity is None.

    huggingface_hub's PyTorchModelHubMixin adds save_pretrained(dir) / from_pretrained(dir or repo id) /
    push_to_hub: config.json holds the keyword arguments the model was built with (recorded at construction,
    all JSON values) and model.safetensors the state_dict, whose keys are unchanged. from_pretrained loads
    strictly here (the mixin's default is not strict). reg/export.py writes such folders from our checkpoints,
    with the sampling metadata (HUB_METADATA_KEYS) and a model card.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = CLASS_DROPOUT_PROB,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        use_cls_token: bool = True,
        cls_token_dim: int | None = None,
        qk_norm: bool = False,
        fused_attn: bool = True,
        **unused,
    ):
        super().__init__()
        # Accept (and ignore) the original's extra keywords (path_type, use_cfg, decoder_hidden_size, ...)
        # so configs written for it still build; anything else is a typo worth reporting.
        ignorable = {"path_type", "use_cfg", "decoder_hidden_size", "learn_sigma", "bn_momentum", *HUB_METADATA_KEYS}
        unknown = set(unused) - ignorable
        if unknown:
            raise TypeError(f"SiT got unexpected keyword arguments: {sorted(unknown)}")
        z_dims = [int(z) for z in z_dims]
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} (latent side) is not divisible by patch size {patch_size}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}], got {encoder_depth}")
        if use_cls_token and not z_dims and cls_token_dim is None:
            raise ValueError("the class token needs its dimension: give z_dims or cls_token_dim")

        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.num_classes = num_classes
        self.z_dims = z_dims
        self.encoder_depth = encoder_depth
        self.use_cls_token = use_cls_token
        # The class token's width Z (768 for DINOv2-B): train.py gives the last encoder's, whose class token
        # REG uses; without it z_dims[0], as the authors' SiT (which so fails for several encoders of other widths).
        self.cls_dim = (cls_token_dim or z_dims[0]) if use_cls_token else None

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_tokens = self.x_embedder.num_patches + int(use_cls_token)
        # Fixed sin-cos embedding; a buffer-like parameter (requires_grad=False) so it is in the state_dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
            for _ in range(depth)
        ])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, self.cls_dim)
        if use_cls_token:
            self.cls_projectors2 = nn.Linear(self.cls_dim, hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.initialize_weights()

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        """The mixin's loader, strict by default: a folder whose weights do not fit its config is an error."""
        return super()._from_pretrained(strict=strict, **kwargs)

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[1]

    @property
    def attn_split(self) -> bool:
        """True: the class token's query row gets its own SDPA call (train.py --attn-split). Only a
        runtime switch (no parameter, no state_dict key); a no-op without the class token."""
        return any(b.attn.split_rows for b in self.blocks)

    @attn_split.setter
    def attn_split(self, on: bool) -> None:
        for block in self.blocks:
            block.attn.split_rows = int(bool(on) and self.use_cls_token)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but a strict load that cannot succeed says exactly which keys and shapes differ."""
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        pos = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size, extra_tokens=int(self.use_cls_token))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # patch-embed initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every residual branch and the outputs start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        fl = self.final_layer
        for layer in (fl.adaLN_modulation[-1], fl.linear, fl.linear_cls):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_token: torch.Tensor | None = None,
                return_projections: bool = True):
        """x: (N, C, H, W) noisy latents; t: (N,) in [0, 1]; y: (N,) labels (num_classes = null);
        cls_token: (N, Z) noisy class token (required iff use_cls_token).
        return_projections=False skips the REPA projectors (zs = []): the samplers do not need them."""
        if self.use_cls_token and cls_token is None:
            raise ValueError("this model was built with the REG class token: pass cls_token=(N, Z)")
        if not self.use_cls_token and cls_token is not None:
            raise ValueError("this model has no class token (REPA/SiT mode): pass cls_token=None")
        x = self.x_embedder(x)  # (N, T, D)
        N, T, D = x.shape
        if self.use_cls_token:
            c_tok = self.wg_norm(self.cls_projectors2(cls_token.to(x.dtype)))  # (N, D)
            x = torch.cat([c_tok.unsqueeze(1), x], dim=1)  # (N, 1+T, D)
        x = x + self.pos_embed  # (N, 1+T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)

        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (N, 1+T, D)
            if return_projections and i + 1 == self.encoder_depth:
                zs = [proj(x) for proj in self.projectors]  # [(N, 1+T, z)]
        x, cls_out = self.final_layer(x, c)  # (N, T, p*p*C), (N, Z)
        return self.unpatchify(x), zs, cls_out  # (N, C, H, W), [(N, 1+T, z)], (N, Z)


def check_state_dict(model: nn.Module, state_dict) -> None:
    """Raise a ValueError naming the missing/unexpected keys and shape mismatches, if any."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def fmt(items):
            return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")
        parts = []
        if shapes:
            parts.append(f"shape mismatches [{fmt(shapes)}]")
        if missing:
            parts.append(f"missing keys [{fmt(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{fmt(unexpected)}]")
        raise ValueError("state_dict does not fit this model (wrong size or mode?): " + "; ".join(parts))


#################################################################################
#                         Sine/cosine positional embedding                      #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, extra_tokens: int = 0) -> np.ndarray:
    """MAE-style fixed 2-D sin-cos table, (extra_tokens + grid_size**2, embed_dim); extra rows are zeros."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])  # (T, D/2)
    emb_w = _1d_sincos(embed_dim // 2, grid[1])  # (T, D/2)
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if extra_tokens:
        emb = np.concatenate([np.zeros((extra_tokens, embed_dim), dtype=emb.dtype), emb], axis=0)
    return emb


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                 SiT configs                                   #
#################################################################################

SIZES = {  # name: (depth, hidden_size, num_heads)
    "T": (6, 192, 3),     # tiny: tests and the CPU quick start only
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _make(size: str, patch: int):
    depth, hidden, heads = SIZES[size]

    def build(**kwargs) -> SiT:
        return SiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)
    build.__name__ = f"SiT_{size}_{patch}"
    return build


SiT_models = {f"SiT-{size}/{patch}": _make(size, patch) for size in SIZES for patch in (2, 4, 8)}


def parse_model_name(name: str) -> tuple[str, int]:
    """'SiT-XL/2' -> ('XL', 2), with a clear error for names outside the registry."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(SiT_models)}")
    size, patch = name[len("SiT-"):].split("/")
    return size, int(patch)


# The block whose output is aligned to the encoder (REG, arXiv 2507.01467 Sec. 4.1, after REPA): 8 for L and XL,
# 4 for B; S and the tiny T (6 blocks) use B's 4.
ENCODER_DEPTH = {"T": 4, "S": 4, "B": 4, "L": 8, "XL": 8}


def default_encoder_depth(name: str) -> int:
    """The paper's alignment depth for a registry model, e.g. default_encoder_depth('SiT-B/2') == 4."""
    return ENCODER_DEPTH[parse_model_name(name)[0]]


def model_depth(name: str) -> int:
    """Number of transformer blocks of a registry model, e.g. model_depth('SiT-XL/2') == 28."""
    return SIZES[parse_model_name(name)[0]][0]


def build_model(name: str, **kwargs) -> SiT:
    """SiT_models[name](**kwargs) with a clear error for unknown names."""
    parse_model_name(name)
    return SiT_models[name](**kwargs)
