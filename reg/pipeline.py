"""One-call sampling in the shape of a diffusers pipeline: `REGPipeline`.

    from reg.pipeline import REGPipeline
    pipe = REGPipeline.from_pretrained("OWNER/NAME")          # or a Hub folder, a .pt / .safetensors, hf:...
    images = pipe(class_labels=[207, 360], seed=0).images     # PIL images

It is a thin front over generate.py's own code: `reg.loading.load_generator` builds the model and its VAE, and
`reg.seeded_images.generate_images` samples, so `pipe(..., seed=S)` gives pixel for pixel the images
`generate.py --global-seed S` writes with the same settings (image i depends only on (S, i):
docs/design.md#seeding). docs/sampling.md#in-python says why it is not loaded through diffusers'
`custom_pipeline=`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from reg.class_grid import parse_class_labels
from reg.loading import load_generator
from reg.seeded_images import autocast_dtype, generate_images
from reg.utils import UserError
from samplers import SAMPLER_MODES

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}  # generate.py --precision


@dataclass
class REGPipelineOutput:
    """images: PIL images, or uint8 (N, H, W, 3) as in the ADM npz (output_type="np"); class_labels: the class
    of each image; seed: the global seed they were drawn with (generate.py --global-seed)."""

    images: list[Image.Image] | np.ndarray
    class_labels: list[int]
    seed: int


class REGPipeline:
    """A REG / REPA / SiT generator and the VAE that decodes its latents, called like a diffusers pipeline.

    Not a diffusers DiffusionPipeline subclass: its loader and its `.to`/`.device` expect diffusers or
    transformers models in a model_index.json folder, and SiT and our Hub folders are neither
    (docs/sampling.md#in-python)."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, *, latents_scale: float,
                 path_type: str = "linear", precision: str = "fp32"):
        self.transformer, self.vae = transformer, vae
        self.latents_scale, self.path_type, self.precision = float(latents_scale), path_type, precision
        self.progress_bar_config: dict = {}

    @classmethod
    def from_pretrained(cls, checkpoint: str, *, vae: str | None = None, use_ema: bool = True,
                        precision: str | None = None, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", legacy: bool = False,
                        path_type: str | None = None) -> "REGPipeline":
        """Any checkpoint generate.py's --ckpt takes: a Hub folder or repo id OWNER/NAME, hf:OWNER/REPO[/FILE], our
        .pt / ema_*.safetensors, an official REG or REPA .pt. `vae`: generate.py's --vae (default: the
        checkpoint's). `precision` fp32 | bf16 | fp64 (or diffusers' `torch_dtype`), `use_ema`, `legacy` and
        `path_type` as generate.py's --precision, --ema, --legacy and --path-type."""
        precision = _precision(precision, torch_dtype)
        loaded = load_generator(str(checkpoint), use_ema=use_ema, legacy=legacy, device=device, precision=precision,
                                vae=vae, overrides={"path_type": path_type})
        return cls(loaded.model, loaded.codec, latents_scale=loaded.latents_scale,
                   path_type=loaded.config["path_type"], precision=precision)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device: str | torch.device) -> "REGPipeline":
        """Move the model and the VAE (their dtype stays: `precision` chose it)."""
        self.transformer.to(device)
        self.vae.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm's keyword arguments for the progress bar of later calls (disable=True hides it), as in diffusers."""
        self.progress_bar_config = kwargs

    @torch.no_grad()
    def __call__(self, class_labels: int | Sequence[int] | None = None, num_images: int | None = None, *,
                 num_inference_steps: int = 50, mode: str = "sde", guidance_scale: float = 1.5,
                 cls_guidance_scale: float = 1.5, guidance_low: float = 0.0, guidance_high: float = 1.0,
                 heun: bool = False, seed: int | None = None, generator: torch.Generator | None = None,
                 batch_size: int = 32, output_type: str = "pil", return_dict: bool = True
                 ) -> REGPipelineOutput | tuple:
        """Images 0 .. num_images-1 (default: one per class label, else 1), image i of class
        class_labels[i mod len] (None: drawn from the seed, as generate.py without --class-labels).

        The defaults and meanings are generate.py's (--num-steps 50, --mode sde, --cfg-scale 1.5,
        --cls-cfg-scale 1.5, --guidance-low 0, --guidance-high 1, --heun). `seed` is its --global-seed; without
        it one is drawn from `generator` (diffusers' convention: a seeded generator repeats its images), else
        from torch's global generator. output_type "pil" or "np" (uint8 (N, H, W, 3))."""
        model, labels = self.transformer, _labels(class_labels, self.transformer.num_classes)
        num_images = (len(labels) if labels else 1) if num_images is None else num_images
        _check_call(num_images, num_inference_steps, mode, guidance_scale, cls_guidance_scale, guidance_low,
                    guidance_high, batch_size, output_type)
        if seed is None:  # 62 bits: any value is a valid --global-seed
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        batches = generate_images(
            model, self.vae, range(num_images), global_seed=seed, num_classes=model.num_classes, mode=mode,
            num_steps=num_inference_steps, cfg_scale=guidance_scale, cls_cfg_scale=cls_guidance_scale,
            guidance_low=guidance_low, guidance_high=guidance_high, heun=heun, path_type=self.path_type,
            latents_scale=self.latents_scale, batch_size=batch_size, device=self.device,
            dtype=autocast_dtype(self.precision), label_list=labels)
        images, drawn = [], []
        with tqdm(total=num_images, **{"desc": "REG sampling", **self.progress_bar_config}) as bar:
            for indices, batch, y in batches:  # batch: uint8 (n, H, W, 3)
                images.append(batch.cpu().numpy())
                drawn += y.tolist()
                bar.update(len(indices))
        out = np.concatenate(images)  # (num_images, H, W, 3) uint8, generate.py's PNG pixels
        if output_type == "pil":
            out = [Image.fromarray(image) for image in out]
        if not return_dict:
            return out, drawn, seed
        return REGPipelineOutput(images=out, class_labels=drawn, seed=seed)


def _precision(precision: str | None, torch_dtype: torch.dtype | None) -> str:
    """generate.py's --precision from `precision` or diffusers' `torch_dtype` (one of them)."""
    by_dtype = {v: k for k, v in PRECISIONS.items()}
    if torch_dtype is not None:
        if precision is not None:
            raise UserError("give precision or torch_dtype, not both")
        if torch_dtype not in by_dtype:
            raise UserError(f"torch_dtype {torch_dtype} is not supported; choose from {list(by_dtype)}")
        return by_dtype[torch_dtype]
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def _labels(class_labels: int | Sequence[int] | None, num_classes: int) -> list[int] | None:
    if class_labels is None:
        return None
    items = [class_labels] if isinstance(class_labels, int) else list(class_labels)
    if not all(isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in items):
        raise UserError(f"class_labels must be class indices (integers), got {items[:5]}")
    return parse_class_labels(",".join(str(int(y)) for y in items), num_classes)


def _check_call(num_images: int, steps: int, mode: str, cfg: float, cls_cfg: float, low: float, high: float,
                batch_size: int, output_type: str) -> None:
    """The checks generate.py makes on its flags, before anything is sampled."""
    if num_images < 1 or steps < 1 or batch_size < 1:
        raise UserError(f"num_images ({num_images}), num_inference_steps ({steps}) and batch_size ({batch_size}) "
                        "must be >= 1")
    if mode not in SAMPLER_MODES:
        raise UserError(f"mode {mode!r} is not one of {', '.join(SAMPLER_MODES)}")
    if not (cfg >= 0 and cls_cfg >= 0 and 0 <= low <= high <= 1):  # also refuses NaN
        raise UserError(f"need guidance scales >= 0 and 0 <= guidance_low <= guidance_high <= 1, got "
                        f"{cfg}, {cls_cfg}, [{low}, {high}]")
    if output_type not in ("pil", "np"):
        raise UserError(f"output_type {output_type!r}: choose 'pil' or 'np'")
