"""Frozen vision encoders (DINOv2, DINOv2 with registers, CLIP ViT-L) built with timm.

`load_encoders("dinov2-vit-b", weights=None, resolution=256)` returns a list of `VisionEncoder`s.
Each maps raw uint8 images (N, 3, R, R) to
    cls:     (N, Z)     the normed class token  -> REG's entangled token
    patches: (N, T, Z)  the normed patch tokens -> REPA's alignment target
with T = (R/16)^2, so that [cls, patches] lines up with the SiT's 1+T tokens at patch size 2.

Weights (`weights` argument / `--enc-weights`):
    None / "hub"  the timm weights on the HF hub (HF cache and HF_HUB_OFFLINE are honoured)
    PATH          a local file (.safetensors / .pth / .pt, timm or official torch.hub naming)
                  or a directory holding model.safetensors / pytorch_model.bin
    "random"      random initialisation, for smoke tests only (loudly warned)
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hub import hub_offline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str
    mean: tuple
    std: tuple
    official_url: str  # where the original weights live, for the "missing weights" message


def _dinov2(size: str, reg: bool) -> EncoderSpec:
    arch = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    tag = f"dinov2_vit{size}14" + ("_reg4" if reg else "")
    return EncoderSpec(
        timm_name=f"vit_{arch}_patch14_{'reg4_' if reg else ''}dinov2.lvd142m",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        official_url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{tag}_pretrain.pth",
    )


ENCODERS: dict[str, EncoderSpec] = {
    **{f"dinov2-vit-{s}": _dinov2(s, False) for s in "sblg"},
    **{f"dinov2reg-vit-{s}": _dinov2(s, True) for s in "sblg"},
    "clip-vit-L": EncoderSpec("vit_large_patch14_clip_224.openai", CLIP_MEAN, CLIP_STD,
                              "https://huggingface.co/timm/vit_large_patch14_clip_224.openai"),
}


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not available locally (and could not be downloaded)."""


def encoder_resolution(resolution: int) -> int:
    """Encoder input side: 224 * res / 256, i.e. 14 px per 16 image px (SPEC §2)."""
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution}")
    return resolution * 224 // 256


def parse_enc_type(enc_type: str) -> list[str]:
    names = [n.strip() for n in enc_type.split(",") if n.strip()]
    if not names:
        raise ValueError("--enc-type is empty")
    for n in names:
        if n not in ENCODERS:
            raise ValueError(f"unknown encoder {n!r}; choose from {', '.join(ENCODERS)}")
    return names


class VisionEncoder(nn.Module):
    """A frozen timm ViT plus its preprocessing; always eval mode, never trained."""

    def __init__(self, name: str, vit: nn.Module, spec: EncoderSpec, resolution: int):
        super().__init__()
        self.name = name
        self.vit = vit.eval().requires_grad_(False)
        self.resolution = resolution
        self.input_size = encoder_resolution(resolution)
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens  # cls (+ registers)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True):  # a frozen encoder stays in eval mode (no dropout / drop-path)
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, R, R) -> normalised float (N, 3, S, S), S = 224 R / 256 (bicubic, as REPA)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"encoder input must be raw uint8 images, got {images.dtype}")
        x = (images.float() / 255.0 - self.mean) / self.std
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        tokens = self.vit.forward_features(x)  # (N, prefix + T, Z), after the final norm
        cls = tokens[:, 0]  # (N, Z)
        patches = tokens[:, self.num_prefix_tokens:]  # (N, T, Z)
        return cls, patches


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a (1, prefix + G*G, D) absolute position table to grid x grid.

    Done the way DINOv2's own `interpolate_pos_encoding` does it at run time (bicubic,
    no antialias, scale factor (grid + 0.1) / G), so the features equal those of the torch.hub
    encoder that REPA/REG trained with.
    """
    n = pos.shape[1]
    old = math.isqrt(n)
    prefix = n - old * old
    if prefix not in (0, 1):
        raise ValueError(f"position table with {n} rows is not a square grid (+ class row)")
    if old == grid:
        return pos
    head, body = pos[:, :prefix], pos[:, prefix:]
    dim = body.shape[-1]
    body = body.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / old
    body = F.interpolate(body, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if body.shape[-1] != grid:  # float rounding in scale_factor; never expected, but be safe
        body = F.interpolate(body, size=(grid, grid), mode="bicubic", antialias=False)
    body = body.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([head, body], dim=1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / fname).is_file():
                return _read_state_dict(path / fname)
        raise WeightsNotFoundError(f"no model.safetensors or pytorch_model.bin in directory {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _hub_state_dict(name: str, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    from huggingface_hub import hf_hub_download
    repo = f"timm/{spec.timm_name}"
    try:
        path = hf_hub_download(repo_id=repo, filename="model.safetensors", local_files_only=hub_offline())
    except Exception as e:  # offline, gated, missing: give one clear message, not a hub stack trace
        raise WeightsNotFoundError(
            f"pretrained weights for encoder {name!r} are not available ({type(e).__name__}).\n"
            f"  Fetch them on a machine with network access, either\n"
            f"    huggingface-cli download {repo} model.safetensors   (then copy the HF cache, ~/.cache/huggingface)\n"
            f"  or the official file {spec.official_url}\n"
            f"  and pass it with --enc-weights /path/to/file (or set REG_ENC_WEIGHTS)."
        ) from None
    return _read_state_dict(Path(path))


def load_encoder(name: str, *, weights: str | None = None, resolution: int = 256) -> VisionEncoder:
    """Build one frozen encoder; see the module docstring for `weights`."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    size = encoder_resolution(resolution)
    vit = timm.create_model(spec.timm_name, pretrained=False, img_size=size, num_classes=0)
    if weights == "random":
        warnings.warn(
            f"\n{'!' * 78}\n!! encoder {name} uses RANDOM weights: smoke tests only, the REPA/REG losses "
            f"are meaningless !!\n{'!' * 78}", stacklevel=2)
    else:
        if weights in (None, "", "hub"):
            sd = _hub_state_dict(name, spec)
        else:
            path = Path(os.path.expanduser(weights))
            if not path.exists():
                raise WeightsNotFoundError(
                    f"encoder weights {path} do not exist (for {name}: the official file is {spec.official_url})")
            sd = _read_state_dict(path)
        if "pos_embed" in sd:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], size // 14)
        # timm converts torch.hub DINOv2 / OpenAI CLIP naming to its own (drops mask_token, etc.)
        sd = timm.models.vision_transformer.checkpoint_filter_fn(sd, vit)
        missing, unexpected = vit.load_state_dict(sd, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head")]
        if missing or unexpected:
            raise ValueError(f"encoder weights for {name} do not match {spec.timm_name}: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return VisionEncoder(name, vit, spec, resolution)


def load_encoders(enc_type: str, *, weights: str | None = None, resolution: int = 256,
                  device: torch.device | str = "cpu") -> list[VisionEncoder]:
    """Comma-separated `enc_type` -> encoders. `weights` is one value or a comma-separated list
    of the same length; falls back to the REG_ENC_WEIGHTS environment variable."""
    names = parse_enc_type(enc_type)
    weights = weights if weights is not None else os.environ.get("REG_ENC_WEIGHTS")
    per = [w.strip() for w in weights.split(",")] if weights else [None] * len(names)
    if len(per) == 1 and len(names) > 1 and per[0] in ("random", "hub"):
        per = per * len(names)
    if len(per) != len(names):
        raise ValueError(f"{len(names)} encoders but {len(per)} --enc-weights entries")
    return [load_encoder(n, weights=w, resolution=resolution).to(device) for n, w in zip(names, per)]
