"""In-memory image generation with per-image seeds: the one sampling loop behind generate.py (PNGs and the
ADM npz), sweep.py, and train.py's FID and preview grids.

Image i depends only on (global_seed, i) and the sampler settings: the seeding rules are in
docs/design.md#seeding. The solvers themselves are in samplers.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from reg.utils import UserError
from samplers import (SAMPLER_MODES, euler_maruyama_sampler, euler_sampler, model_dtype_of, multistep_sampler,
                      per_sample_randn_like)

NOISE_STREAM, LABEL_STREAM = 0, 1


# ----------------------------------------------------------------------------------------------
# Per-image seeds and labels


def image_seed(global_seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """A 64-bit seed for image `index`: SeedSequence hashes (seed, index, stream), so seeds of
    nearby images or runs are unrelated (unlike global_seed + index)."""
    if global_seed < 0 or index < 0:
        raise ValueError(f"global seed and index must be >= 0, got {global_seed}, {index}")
    state = np.random.SeedSequence([global_seed, index, stream]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def image_generators(global_seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: its initial noise and all its SDE noise come from it."""
    return [torch.Generator().manual_seed(image_seed(global_seed, i, NOISE_STREAM)) for i in indices]


def class_labels(indices: Sequence[int], *, global_seed: int, num_classes: int, balanced: bool,
                 label_list: Sequence[int] | None = None) -> torch.Tensor:
    """Class of each image index: label_list[i mod len] if given (generate.py --class-labels), else
    i mod num_classes if balanced, else uniform from its own seed."""
    if label_list:
        return torch.tensor([int(label_list[i % len(label_list)]) for i in indices], dtype=torch.long)
    if balanced:
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    labels = [torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        image_seed(global_seed, i, LABEL_STREAM))).item() for i in indices]
    return torch.tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# In-memory generation: the one code path of generate.py, train.py's FID and sweep.py


class NonFiniteSampleError(UserError):
    """A sample with NaN/inf values: an error naming the image, raised before any uint8 conversion (which
    would quietly clamp NaN to black), so no PNG, npz or FID is ever made from it."""


def _settings_text(global_seed: int, mode: str, num_steps: int, cfg_scale: float, cls_cfg_scale: float,
                   guidance_low: float, guidance_high: float, heun: bool, path_type: str) -> str:
    heun_flag = " --heun" if heun and mode == "ode" else ""
    return (f"--mode {mode}{heun_flag} --num-steps {num_steps} --cfg-scale {cfg_scale} "
            f"--cls-cfg-scale {cls_cfg_scale} --guidance-low {guidance_low} --guidance-high {guidance_high} "
            f"--path-type {path_type} --global-seed {global_seed}")


def check_finite_samples(indices: Sequence[int], parts: dict[str, torch.Tensor | None], settings: str) -> None:
    """Raise NonFiniteSampleError naming the first image whose tensors in `parts` (name -> (N, ...)) hold a
    NaN or inf. One isfinite per tensor and one host sync per batch; the error path alone looks closer."""
    tensors = {name: t for name, t in parts.items() if t is not None}
    device = next(iter(tensors.values())).device
    ok = torch.stack([torch.isfinite(t).flatten(1).all(1).to(device) for t in tensors.values()])  # (parts, N)
    if bool(ok.all()):
        return
    ok = ok.cpu()
    col = int((~ok).any(0).nonzero()[0])
    bad = [name for name, row in zip(tensors, ok) if not row[col]]
    count = int((~ok).any(0).sum())
    raise NonFiniteSampleError(
        f"image {indices[col]} is not finite (NaN or inf in its {' and '.join(bad)}"
        f"{f'; {count} image(s) of its batch of {len(indices)} are' if count > 1 else ''}) with {settings}; "
        f"nothing is written from it. Check the sampler settings, or the checkpoint (a diverged model)")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3) on the same device, truncating as REPA/REG/ADM do."""
    images = torch.clamp(255.0 * ((images.float() + 1) / 2), 0, 255)
    return images.permute(0, 2, 3, 1).to(torch.uint8)


@torch.no_grad()
def generate_images(model, decode, indices: Sequence[int], *, global_seed: int, num_classes: int,
                    balanced: bool = False, mode: str = "sde", num_steps: int = 250, cfg_scale: float = 1.0,
                    cls_cfg_scale: float = 0.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                    heun: bool = False, path_type: str = "linear", latents_scale: float, batch_size: int,
                    device, dtype: torch.dtype | None = None, label_list: Sequence[int] | None = None
                    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield (indices, uint8 images (N, H, W, 3) on `device`, labels (N,)) batch by batch.

    Image i depends only on (global_seed, i) and the settings (docs/design.md#seeding), so any batch
    size, order or split of `indices` gives the same images as generate.py's files.
    `decode(z)` maps latents / latents_scale to images in [-1, 1]; a VAE object with a `.decode`
    (models.vae.load_vae) may be passed instead. The model computes in its parameters' dtype;
    `dtype` (torch.bfloat16 / torch.float16) runs it under autocast instead. `label_list` fixes the
    classes (see class_labels). `mode`: one of samplers.SAMPLER_MODES. A batch holding an image
    whose latents, class token or decoded pixels are not finite raises NonFiniteSampleError naming it,
    before that batch is yielded.
    """
    if mode not in SAMPLER_MODES:
        raise ValueError(f"mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    decode_fn: Callable[[torch.Tensor], torch.Tensor] = getattr(decode, "decode", decode)
    device = torch.device(device)
    model_dtype = model_dtype_of(model, torch.float32)
    latent_shape = (model.in_channels, model.input_size, model.input_size)
    cls_dim = model.cls_dim if model.use_cls_token else None
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                              enabled=dtype is not None and dtype not in (torch.float32, torch.float64))
    kwargs = dict(num_steps=num_steps, cfg_scale=cfg_scale, cls_cfg_scale=cls_cfg_scale,
                  guidance_low=guidance_low, guidance_high=guidance_high, path_type=path_type)
    settings = _settings_text(global_seed, mode, num_steps, cfg_scale, cls_cfg_scale, guidance_low, guidance_high,
                              heun, path_type)
    indices = [int(i) for i in indices]
    for b in range(0, len(indices), batch_size):
        batch = indices[b:b + batch_size]
        randn_like = per_sample_randn_like(image_generators(global_seed, batch))
        y = class_labels(batch, global_seed=global_seed, num_classes=num_classes, balanced=balanced,
                         label_list=label_list).to(device)
        # Initial noise is drawn in float32 whatever the precision, so all precisions share it.
        z = randn_like(torch.empty(len(batch), *latent_shape)).to(device, model_dtype)
        c = None if cls_dim is None else randn_like(torch.empty(len(batch), cls_dim)).to(device, model_dtype)
        with autocast:
            if mode == "sde":
                latents, cls_token = euler_maruyama_sampler(model, z, y, cls_latents=c, randn_like=randn_like,
                                                            **kwargs)
            elif mode == "ode":
                latents, cls_token = euler_sampler(model, z, y, cls_latents=c, heun=heun, **kwargs)
            else:  # dpm2m / unipc
                latents, cls_token = multistep_sampler(model, z, y, cls_latents=c, corrector=mode == "unipc",
                                                       **kwargs)
        images = decode_fn(latents.to(model_dtype) / latents_scale)
        # before to_uint8, which would clamp a NaN to 0 (black)
        check_finite_samples(batch, {"latents": latents, "class token": cls_token, "decoded image": images}, settings)
        yield batch, to_uint8(images.to(device)), y


def autocast_dtype(precision: str) -> torch.dtype | None:
    """generate_images' `dtype` for a --precision flag: bf16 runs the model under autocast."""
    return torch.bfloat16 if precision == "bf16" else None
