"""Frozen vision encoders built with timm: DINOv2 (+ registers), CLIP ViT-L, DINOv3, SigLIP 2.

`load_encoders("dinov2-vit-b", weights=None, resolution=256)` returns a list of `VisionEncoder`s.
Each maps raw uint8 images (N, 3, R, R) to
    cls:     (N, Z)     the class token         -> REG's entangled token (the LAST encoder's, as REG)
    patches: (N, T, Z)  the patch tokens        -> REPA's alignment target (registers excluded)
with T = (16 R / 256)^2, so that [cls, patches] lines up with the SiT's 1+T tokens at patch size 2.
Per-encoder preprocessing, token layouts and weights: docs/encoders.md.

DINOv2 equals the torch.hub DINOv2 that REG trains with (REG utils.py `load_encoders`): the
pretrained 37x37 position table is resampled ONCE, at load time, with
`timm.layers.pos_embed.resample_abs_pos_embed(pos, [16 * res / 256] * 2)` (bicubic with antialias, the
class row kept), so DINOv2's own run-time interpolation never runs. Inputs are preprocessed as REG's
train.py `preprocess_raw_image`: x / 255, ImageNet mean/std, then bicubic to 224 * res / 256
(CLIP: resize first, then CLIP's mean/std; OpenAI's QuickGELU; its tokens WITHOUT the final norm, as REPA's
CLIP wrapper).
DINOv3 and SigLIP 2 have patch 16: the image goes in at R px as it is (16 R / 256 patches a side).
SigLIP has no class token: its `cls` is the model's pooled output (the MAP head); its GELU is big_vision's tanh one.
Where timm's default activation is not the original's, EncoderSpec.act_layer sets it (tests/test_encoders.py
checks every family against the original architecture written out by hand).

Weights (`weights` argument / `--enc-weights`, else the REG_ENC_WEIGHTS environment variable):
    None / "hub"  first the file REG users already have in the torch.hub cache,
                  `torch.hub.get_dir()/checkpoints/dinov2_vitb14_pretrain.pth` (`_reg4_` for registers,
                  `dinov3_vitb16_pretrain_lvd1689m-*.pth` for DINOv3),
                  then the timm weights on the HF hub (HF cache first; HF_HUB_OFFLINE is honoured)
    PATH          a local file (.safetensors / .pth / .pt, timm or official torch.hub naming)
                  or a directory holding model.safetensors / pytorch_model.bin
    "random"      random initialisation, for smoke tests only (loudly warned)
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from reg.hub import hub_offline
from reg.utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str
    mean: tuple
    std: tuple
    official_url: str  # where the original weights live, for the "missing weights" message
    torch_hub_file: str | None = None  # the file torch.hub.load caches in <hub dir>/checkpoints/ (may be a glob)
    resize_first: bool = False  # REG's CLIP preprocessing resizes before normalising, DINOv2's after
    patch: int = 14  # pixels a patch: the input side is 16 * res / 256 patches of it (224 px at 256 for 14)
    final_norm: bool = True  # False: the last block's tokens without timm's final norm (REPA's CLIP: no ln_post)
    class_token: bool = True  # False (SigLIP): REG's token is the model's own pooled output (MAP head / mean)
    act_layer: str | None = None  # timm's activation, where timm's default is not the original model's


def _dinov2(size: str, reg: bool) -> EncoderSpec:
    arch = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    tag = f"dinov2_vit{size}14" + ("_reg4" if reg else "")
    return EncoderSpec(
        timm_name=f"vit_{arch}_patch14_{'reg4_' if reg else ''}dinov2.lvd142m",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        official_url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{tag}_pretrain.pth",
        torch_hub_file=f"{tag}_pretrain.pth",
    )


def _dinov3(size: str) -> EncoderSpec:
    """DINOv3 ViT/16 (timm's Eva: RoPE, no position table; class token, then 4 register tokens, then patches).
    The official file is licence-gated; torch.hub caches it as dinov3_vit{size}16_pretrain_lvd1689m-<hash>.pth."""
    arch = {"s": "small", "b": "base", "l": "large", "hplus": "huge_plus"}[size]
    tag = {"s": "dinov3_vits16", "b": "dinov3_vitb16", "l": "dinov3_vitl16", "hplus": "dinov3_vith16plus"}[size]
    return EncoderSpec(
        timm_name=f"vit_{arch}_patch16_dinov3.lvd1689m", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        official_url=f"https://github.com/facebookresearch/dinov3 ({tag}_pretrain_lvd1689m-*.pth, on request)",
        torch_hub_file=f"{tag}_pretrain_lvd1689m*.pth", patch=16)


def _siglip2(size: str) -> EncoderSpec:
    """SigLIP 2 image tower at 256 px, patch 16 (timm's `.v2_webli` tags): no class token, a MAP head."""
    arch = {"b": "base", "l": "large", "so400m": "so400m"}[size]
    name = f"vit_{arch}_patch16_siglip_256.v2_webli"
    # big_vision's ViT (blocks and MAP head) uses flax's nn.gelu, the tanh approximation; timm's SigLIP the exact one
    return EncoderSpec(name, SIGLIP_MEAN, SIGLIP_STD, f"https://huggingface.co/timm/{name}", patch=16,
                       class_token=False, act_layer="gelu_tanh")


ENCODERS: dict[str, EncoderSpec] = {
    **{f"dinov2-vit-{s}": _dinov2(s, False) for s in "sblg"},
    **{f"dinov2reg-vit-{s}": _dinov2(s, True) for s in "sblg"},
    # OpenAI's CLIP (REPA: clip.load("ViT-L/14").visual) uses QuickGELU, x sigmoid(1.702 x); timm's .openai
    # model runs the same weights with GELU unless told (its _quickgelu_ variant is this override)
    "clip-vit-L": EncoderSpec("vit_large_patch14_clip_224.openai", CLIP_MEAN, CLIP_STD,
                              "https://huggingface.co/timm/vit_large_patch14_clip_224.openai", resize_first=True,
                              final_norm=False, act_layer="quick_gelu"),
    **{f"dinov3-vit-{s}": _dinov3(s) for s in ("s", "b", "l", "hplus")},
    **{f"siglip2-vit-{s}": _siglip2(s) for s in ("b", "l", "so400m")},
}


def encoder_activations(enc_type: str) -> dict[str, str]:
    """The MLP activation of each encoder of --enc-type ("default": timm's own), recorded in a run's config so
    that a resume sees when the towers that make its targets changed (CLIP-L and SigLIP 2 ran timm's exact GELU
    before they got their originals' activations)."""
    return {n: ENCODERS[n].act_layer or "default" for n in parse_enc_type(enc_type)}


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not available locally (and could not be downloaded)."""


def encoder_resolution(resolution: int) -> int:
    """Encoder input side: 224 * res / 256, i.e. 14 px per 16 image px (REG train.py `preprocess_raw_image`)."""
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution}")
    return resolution * 224 // 256


def patch_grid(resolution: int) -> int:
    """Patches a side of the encoder input: 16 * res / 256 (REG utils.py `load_encoders`)."""
    return encoder_resolution(resolution) // 14


def parse_enc_type(enc_type: str) -> list[str]:
    names = [n.strip() for n in enc_type.split(",") if n.strip()]
    if not names:
        raise UserError("--enc-type is empty")
    for n in names:
        if n not in ENCODERS:
            raise UserError(f"unknown encoder {n!r}; choose from {', '.join(ENCODERS)}")
    return names


class VisionEncoder(nn.Module):
    """A frozen timm ViT plus its preprocessing; always eval mode, never trained."""

    def __init__(self, name: str, vit: nn.Module, spec: EncoderSpec, resolution: int):
        super().__init__()
        self.name = name
        self.vit = vit.eval().requires_grad_(False)
        self.resolution = resolution
        self.input_size = patch_grid(resolution) * spec.patch  # 224 * res / 256 at patch 14, res at patch 16
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens  # cls (+ registers); 0 for SigLIP
        self.class_token = spec.class_token
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.resize_first = spec.resize_first
        self.eval()

    def train(self, mode: bool = True):  # a frozen encoder stays in eval mode (no dropout / drop-path)
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, R, R) -> normalised float (N, 3, S, S), S = 224 R / 256, in REG's order
        (train.py `preprocess_raw_image`: DINOv2 normalises then resizes, CLIP the other way round)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"encoder input must be raw uint8 images, got {images.dtype}")
        size = (self.input_size, self.input_size)
        x = images.float() / 255.0
        if tuple(images.shape[-2:]) == size:  # DINOv3 / SigLIP 2 at patch 16: the image as it is
            return (x - self.mean) / self.std
        if self.resize_first:
            return (F.interpolate(x, size=size, mode="bicubic", align_corners=False) - self.mean) / self.std
        return F.interpolate((x - self.mean) / self.std, size=size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        tokens = self.vit.forward_features(x)  # (N, prefix + T, Z), after the final norm (if kept)
        patches = tokens[:, self.num_prefix_tokens:]  # (N, T, Z): registers are prefix tokens, never patches
        if self.class_token:
            return tokens[:, 0], patches  # (N, Z)
        return self.vit.forward_head(tokens, pre_logits=True), patches  # SigLIP's pooled output (N, Z)


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a (1, prefix + G*G, D) absolute position table to grid x grid, exactly as REG does
    once at load time (REG utils.py `load_encoders`): `timm.layers.pos_embed.resample_abs_pos_embed`
    with timm's defaults (bicubic, antialias=True), the class row (if any) kept as is."""
    n = pos.shape[1]
    side = math.isqrt(n)
    prefix = n - side * side  # 1 + s*s rows (class row + grid) or s*s (timm's register variants)
    if prefix not in (0, 1):
        raise ValueError(f"position table with {n} rows is not a square grid (+ class row)")
    from timm.layers.pos_embed import resample_abs_pos_embed
    return resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=prefix)


def _load_error_text(e: BaseException) -> str:
    """The useful part of a load error: for torch's weights_only refusal only its
    'WeightsUnpickler error: ...' sentence (the rest is advice to load unsafely)."""
    text = str(e)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.strip().split(". Please use")[0]
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / fname).is_file():
                return _read_state_dict(path / fname)
        raise WeightsNotFoundError(f"no model.safetensors or pytorch_model.bin in directory {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read encoder weights {path}: {_load_error_text(e)}") from e
    for key in ("model", "state_dict", "teacher"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"encoder weights {path} hold a {type(sd).__name__}, not a state_dict")
    return sd


def torch_hub_weights(spec: EncoderSpec) -> Path | None:
    """The official file in the torch.hub cache (where REG's torch.hub.load put it), if present."""
    if spec.torch_hub_file is None:
        return None
    found = sorted(p for p in (Path(torch.hub.get_dir()) / "checkpoints").glob(spec.torch_hub_file) if p.is_file())
    return found[0] if found else None


def local_weights(name: str) -> str | None:
    """Where `load_encoder(name)` (no weights given) would find pretrained weights without the network:
    the torch.hub cache file, else the HF cache file; None if neither is there. For scripts that
    decide between pretrained and random weights offline (the demo, reg.prefetch)."""
    return pretrained_weights(name, download=False)


def pretrained_weights(name: str, *, download: bool = True) -> str | None:
    """The one lookup of an encoder's pretrained file: the torch.hub cache (where REG's torch.hub.load put
    the official file), else timm's file in the HF cache; with `download` (and HF_HUB_OFFLINE unset), the HF
    hub. Without `download`, None when neither cache has it; with it, a WeightsNotFoundError that says where
    the weights may come from."""
    spec = ENCODERS[name]
    cached = torch_hub_weights(spec)
    if cached is not None:
        return str(cached)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo = f"timm/{spec.timm_name}"
    if not download:
        found = try_to_load_from_cache(repo, "model.safetensors",
                                       cache_dir=os.environ.get("HF_HUB_CACHE"))  # read now, not at import
        return found if isinstance(found, str) else None
    try:
        return hf_hub_download(repo_id=repo, filename="model.safetensors", local_files_only=hub_offline())
    except Exception as e:  # offline, gated, missing: one clear message that keeps the hub's reason
        where = (f" or {Path(torch.hub.get_dir()) / 'checkpoints' / spec.torch_hub_file}"
                 if spec.torch_hub_file else "")
        raise WeightsNotFoundError(
            f"pretrained weights for encoder {name!r} are not available: neither a torch.hub cache file{where} "
            f"nor the HF hub ({repo}): {type(e).__name__}: {e}\n"
            f"  Fetch them on a machine with network access, either\n"
            f"    hf download {repo} model.safetensors   (then copy the HF cache, ~/.cache/huggingface)\n"
            f"  or the official file {spec.official_url}\n"
            f"  and pass it with --enc-weights /path/to/file (or set REG_ENC_WEIGHTS)."
        ) from e


def _dropped_qkv_bias(sd: dict[str, torch.Tensor], vit: nn.Module) -> list[str]:
    """DINOv3's own files hold a q, k, v bias with k masked to 0. timm's DINOv3 models without q/v bias
    drop it while converting, which is exact only where it is zero (as in Meta's released weights):
    the names of the non-zero ones that would be lost."""
    if "storage_tokens" not in sd or any(n.endswith("q_bias") for n, _ in vit.named_parameters()):
        return []
    return [k for k, v in sd.items() if k.endswith("attn.qkv.bias")
            and bool((v * sd.get(f"{k}_mask", torch.ones_like(v))).ne(0).any())]


def _load_weights(vit: nn.Module, name: str, spec: EncoderSpec, weights: str | None, resolution: int) -> None:
    """Load pretrained weights into the timm model: the torch.hub cache or the HF hub (weights None / "hub"),
    or a local file or folder, in timm's naming or the original one."""
    if weights in (None, "", "hub"):
        path = Path(pretrained_weights(name))
    else:
        path = Path(os.path.expanduser(weights))
        if not path.exists():
            raise WeightsNotFoundError(
                f"encoder weights {path} do not exist (for {name}: the official file is {spec.official_url})")
    sd, source = _read_state_dict(path), str(path)
    if "pos_embed" in sd:
        # REG's one resample (utils.py load_encoders): done here explicitly, so that timm's
        # checkpoint_filter_fn below finds the right size and leaves the table alone.
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], patch_grid(resolution))
    dropped = _dropped_qkv_bias(sd, vit)
    if dropped:
        raise UserError(f"encoder weights {source} have a non-zero attention bias ({dropped[0]}, ...) that "
                        f"{spec.timm_name} has no place for (Meta's released DINOv3 weights have none)")
    # timm converts torch.hub DINOv2 / DINOv3 / OpenAI CLIP naming to its own (drops mask_token, etc.)
    sd = sys.modules[type(vit).__module__].checkpoint_filter_fn(sd, vit)  # vision_transformer / eva
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("head")]
    if missing or unexpected:
        raise UserError(f"encoder weights {source} do not match {name} ({spec.timm_name}): "
                        f"missing {missing[:8]}, unexpected {unexpected[:8]}")


def load_encoder(name: str, *, weights: str | None = None, resolution: int = 256,
                 timm_kwargs: dict | None = None) -> VisionEncoder:
    """Build one frozen encoder; see the module docstring for `weights`. `timm_kwargs` override the
    architecture (e.g. depth=2, embed_dim=64 for tests with random weights)."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")
    # timm (and torchvision with it) takes seconds to import: only building an encoder needs it, so the
    # SiT baseline, the samplers and the weights lookup of demo.sh start without it.
    import timm
    import timm.models.vision_transformer

    spec = ENCODERS[name]
    size = patch_grid(resolution) * spec.patch
    arch = {"act_layer": spec.act_layer} if spec.act_layer else {}
    vit = timm.create_model(spec.timm_name, pretrained=False, img_size=size, num_classes=0,
                            **arch, **(timm_kwargs or {}))
    if weights == "random":
        warnings.warn(
            f"\n{'!' * 78}\n!! encoder {name} uses RANDOM weights: smoke tests only, the REPA/REG losses "
            f"are meaningless !!\n{'!' * 78}", stacklevel=2)
    else:
        _load_weights(vit, name, spec, weights, resolution)
    if not spec.final_norm:  # REPA's CLIP wrapper returns the last block's tokens, without ln_post
        vit.norm = nn.Identity()
    return VisionEncoder(name, vit, spec, resolution)


def load_encoders(enc_type: str, *, weights: str | None = None, resolution: int = 256,
                  device: torch.device | str = "cpu") -> list[VisionEncoder]:
    """Comma-separated `enc_type` -> encoders. `weights` is one value or a comma-separated list
    of the same length; falls back to the REG_ENC_WEIGHTS environment variable."""
    names = parse_enc_type(enc_type)
    source = "--enc-weights" if weights is not None else "REG_ENC_WEIGHTS"
    weights = weights if weights is not None else os.environ.get("REG_ENC_WEIGHTS")
    per = [w.strip() for w in weights.split(",")] if weights else [None] * len(names)
    if len(per) == 1 and len(names) > 1 and per[0] in ("random", "hub"):
        per = per * len(names)
    if len(per) != len(names):
        raise UserError(f"{len(names)} encoders but {len(per)} {source} entries ({weights!r})")
    return [load_encoder(n, weights=w, resolution=resolution).to(device) for n, w in zip(names, per)]
