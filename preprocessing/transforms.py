"""The crops and resizes of `dataset_tools.py convert` (EDM2 dataset_tool.py make_transform, whose
--transform choices REG and REPA ship), the --resolution parser and the output-size check.

center-crop-dhariwal is ADM's ImageNet crop, the one the REG and REPA data were made with.
"""
from __future__ import annotations

import argparse
import re
from typing import Callable

import numpy as np
import PIL.Image

from models.vae import VAE_STRIDE
from utils import UserError

TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal")  # EDM2's choices

# PIL modes and how to_rgb makes 8-bit RGB of them (docs/data.md#image-modes).
PIL_RGB_MODES = ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")  # PIL's convert("RGB"), as REG/REPA/ADM
ALPHA_MODES = ("RGBA", "LA", "PA")  # alpha dropped, the stored colour kept: convert("RGB"), as REG/REPA/ADM
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 0..65535 -> the high byte, as PIL reads 16-bit RGB


class UnsupportedImageMode(UserError):
    """An image whose pixel format has no unambiguous 8-bit RGB meaning (float, 32-bit, premultiplied)."""


def to_rgb(img: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """The one conversion of a decoded image to 8-bit RGB, shared by convert, encode and the training dataset.

    PIL's convert("RGB") (what REG, REPA and ADM call) clips 16-bit and 32-bit values to 255 instead of
    scaling them, so a 16-bit PNG comes out nearly white. Here 16-bit grey (I;16*, and I holding 0..65535,
    as older Pillow opened 16-bit PNGs) keeps its high byte, as PIL itself does when it reads a 16-bit RGB
    PNG. Alpha is dropped and the stored colour kept (what convert("RGB") does, so the same pixels as the
    authors' data); a palette's transparent entry keeps its palette colour. Modes without one meaning (F,
    I outside 0..65535, premultiplied alpha, ...) are refused, naming `where` and the mode. Always returns a
    new, fully decoded image (as convert does), usable after the file is closed.
    """
    if img.mode in PIL_RGB_MODES or img.mode in ALPHA_MODES:
        if img.mode == "P" and "transparency" in img.info:
            img = img.copy()  # PIL warns about bytes transparency; the rule above is deliberate
            del img.info["transparency"]
        return img.convert("RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img)  # (H, W) uint16 (any byte order), or int32 for I
        if img.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise UnsupportedImageMode(f"{where}: mode I (32-bit integer) with values in [{a.min()}, {a.max()}], "
                                       "not 16-bit (0..65535): its 8-bit meaning is unknown; convert it to 8-bit "
                                       "RGB first")
        return PIL.Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    raise UnsupportedImageMode(f"{where}: image mode {img.mode} is not supported (its 8-bit RGB meaning is "
                               f"ambiguous; supported: {', '.join(PIL_RGB_MODES + ALPHA_MODES + SIXTEEN_BIT_MODES)}); "
                               "convert it to 8-bit RGB first")


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
