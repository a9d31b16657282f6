"""The crops and resizes of `dataset_tools.py convert` (EDM2 dataset_tool.py make_transform, whose
--transform choices REG and REPA ship), the --resolution parser and the output-size check.

center-crop-dhariwal is ADM's ImageNet crop, the one the REG and REPA data were made with.
"""
from __future__ import annotations

import argparse
import re
from typing import Callable

import PIL.Image
import numpy as np

from models.vae import VAE_STRIDE

TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal")  # EDM2's choices

def center_crop_dhariwal(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """ADM's ImageNet crop (guided-diffusion image_datasets.center_crop_arr).

    BOX-halve while the short side is >= 2*res (cheap anti-aliased downscaling), then BICUBIC-resize
    so that the short side is exactly res, then take the centre res x res crop.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=PIL.Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def center_crop(img: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """EDM's 'center-crop': the largest centred square, then one LANCZOS resize to width x height."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)


def center_crop_wide(img: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image | None:
    """EDM's 'center-crop-wide': keep the full width, crop the height centred to the output aspect
    ratio (ch = round(width * h / w) rows), LANCZOS-resize to width x height, and paste that band
    centred on a black width x width canvas. None (the image is skipped) when the source is narrower
    than `width` or the cropped height would be below `height`."""
    w, h = img.size
    ch = int(np.round(width * h / w))
    if w < width or ch < height:
        return None
    top = (h - ch) // 2
    img = img.crop((0, top, w, top + ch)).resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
    canvas = PIL.Image.new("RGB", (width, width))
    canvas.paste(img, (0, (width - height) // 2))
    return canvas


def scale(img: PIL.Image.Image, width: int | None, height: int | None) -> PIL.Image.Image:
    """EDM's default (no --transform): LANCZOS-resize to --resolution, or keep the size without it."""
    w, h = img.size
    ww, hh = width if width is not None else w, height if height is not None else h
    return img if (ww, hh) == (w, h) else img.resize((ww, hh), resample=PIL.Image.Resampling.LANCZOS)


def make_transform(transform: str | None, resolution: tuple[int, int] | None
                   ) -> Callable[[PIL.Image.Image], PIL.Image.Image | None]:
    """The crop/resize for --transform and --resolution (EDM2's make_transform, with its checks)."""
    width, height = resolution if resolution is not None else (None, None)
    if transform is None:
        return lambda img: scale(img, width, height)
    if resolution is None:
        raise ValueError(f"--transform={transform} needs --resolution=WxH")
    if transform == "center-crop":
        return lambda img: center_crop(img, width, height)
    if transform == "center-crop-wide":
        return lambda img: center_crop_wide(img, width, height)
    if transform == "center-crop-dhariwal":
        if width != height:
            raise ValueError(f"--transform=center-crop-dhariwal needs a square --resolution, got {width}x{height}")
        return lambda img: center_crop_dhariwal(img, width)
    raise ValueError(f"unknown --transform {transform!r}; choose from {', '.join(TRANSFORMS)}")


def parse_resolution(s: str) -> tuple[int, int]:
    """'512x256' or '512,256' (EDM2's WxH; also a bare '256' for a square) -> (width, height)."""
    m = re.fullmatch(r"(\d+)(?:[x,](\d+))?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse resolution {s!r}; expected WxH, e.g. 256x256")
    w, h = int(m.group(1)), int(m.group(2) or m.group(1))
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {w}x{h}")
    return w, h


def check_output_size(size: tuple[int, int]) -> None:
    """Outputs must be square (as EDM2 requires) and a multiple of 2 * VAE stride (a whole number of
    2x2 SiT patches). EDM2 also requires a power of two; we accept any such multiple."""
    w, h = size
    if w != h:
        raise ValueError(f"images after scale and crop must be square, got {w}x{h} (set --resolution / --transform)")
    if w % (2 * VAE_STRIDE):
        raise ValueError(f"image side after scale and crop must be a multiple of {2 * VAE_STRIDE}, got {w}")
