"""The REG training objective (docs/design.md#method).

    x_t = alpha x0 + sigma eps,        v   = d_alpha x0 + d_sigma eps          (image latents)
    c_t = alpha c0 + sigma eps_c,      v_c = d_alpha c0 + d_sigma eps_c        (DINOv2 class token)

    denoise = mean over (C, H, W) of (v_hat - v)^2                per sample
    cls     = mean over Z of (v_c_hat - v_c)^2                     per sample
    proj    = mean over tokens of -cos(z_enc, z_hat), averaged over encoders     per sample
    loss    = mean(denoise) + proj_coeff * mean(proj) + cls_coeff * mean(cls)

The path (alpha, sigma and their derivatives) comes from `reg/interpolant.py`, which the samplers
share. Every random draw (t, eps, eps_c) can be pinned by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from reg.interpolant import expand_like, interpolant, sample_time


def sample_latents(moments: torch.Tensor, *, scale: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x0 from the stored VAE posterior: (mean + std * eps) * scale, scale being the VAE's scaling
    factor (0.18215 for the SD-VAE). moments: (N, 2C, H, W) = mean || std, as vae-sd/ stores them."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, device=mean.device, generator=generator)
    return (mean + std * eps) * scale


@torch.no_grad()
def encoder_targets(encoders: Sequence[torch.nn.Module], images: torch.Tensor):
    """Run the frozen encoders on raw uint8 images.

    Returns (zs, cls): zs is a list of (N, 1+T, z) = [class token, patch tokens] per encoder,
    cls is the LAST encoder's normed class token (N, Z), REG's c0: REG's train.py overwrites `cls_token`
    in its loop over the encoders.
    """
    zs, cls = [], None
    for enc in encoders:
        cls, patches = enc(images)
        zs.append(torch.cat([cls.unsqueeze(1), patches], dim=1))
    return zs, cls


def projection_loss(zs_target: Sequence[torch.Tensor], zs_pred: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample -cos similarity, averaged over tokens and encoders. Normalised in fp32: fp16
    normalisation produces NaNs (a known REPA issue)."""
    if len(zs_target) != len(zs_pred):
        raise ValueError(f"{len(zs_target)} encoder targets but the model has {len(zs_pred)} projectors")
    total = 0.0
    for z, z_hat in zip(zs_target, zs_pred):
        if z.shape != z_hat.shape:
            raise ValueError(f"encoder features {tuple(z.shape)} do not match projector output {tuple(z_hat.shape)}; "
                             "check --resolution, the patch size and --enc-type")
        z = F.normalize(z.float(), dim=-1)
        z_hat = F.normalize(z_hat.float(), dim=-1)
        total = total + (-(z * z_hat).sum(dim=-1)).mean(dim=-1)  # (N,)
    return total / len(zs_target)


@dataclass
class LossOutput:
    loss: torch.Tensor                 # scalar, what is back-propagated
    denoise: torch.Tensor              # (N,)
    proj: torch.Tensor | None          # (N,)  None when there is no alignment (plain SiT)
    cls: torch.Tensor | None           # (N,)  None without the class token (REPA / SiT)
    t: torch.Tensor                    # (N,) the times used


def reg_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    *,
    cls_target: torch.Tensor | None = None,
    zs_target: Sequence[torch.Tensor] = (),
    path_type: str = "linear",
    weighting: str = "uniform",
    prediction: str = "v",
    proj_coeff: float = 0.5,
    cls_coeff: float = 0.03,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    cls_noise: torch.Tensor | None = None,
) -> LossOutput:
    """REG loss for one batch.

    x0: (N, C, H, W) clean scaled latents; y: (N,) labels; cls_target: (N, Z) clean class token c0
    (None = REPA/SiT mode, the model gets no class token); zs_target: per-encoder (N, 1+T, z)
    [cls, patches] features (empty = no alignment term). t / noise / cls_noise pin the random draws.
    """
    if prediction != "v":
        raise ValueError(f"only v-prediction is implemented (as in REG), got prediction={prediction!r}")
    n = x0.shape[0]
    if t is None:
        t = sample_time(n, weighting=weighting, path_type=path_type, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    alpha, sigma, d_alpha, d_sigma = interpolant(expand_like(t, x0), path_type)
    x_t = alpha * x0 + sigma * noise
    v_target = d_alpha * x0 + d_sigma * noise

    c_t = v_c_target = None
    if cls_target is not None:
        if cls_noise is None:
            cls_noise = torch.randn_like(cls_target)
        a, s, da, ds = interpolant(expand_like(t, cls_target), path_type)  # same t as the latents
        c_t = a * cls_target + s * cls_noise
        v_c_target = da * cls_target + ds * cls_noise

    v_hat, zs_hat, v_c_hat = model(x_t, t, y, cls_token=c_t)

    denoise = ((v_hat.float() - v_target.float()) ** 2).flatten(1).mean(dim=1)  # (N,)
    loss = denoise.mean()
    cls = proj = None
    if cls_target is not None:
        cls = ((v_c_hat.float() - v_c_target.float()) ** 2).mean(dim=1)  # (N,)
        loss = loss + cls_coeff * cls.mean()
    if len(zs_target):
        # Without the class token the model has no token 0, so the target drops it too.
        targets = list(zs_target) if cls_target is not None else [z[:, 1:] for z in zs_target]
        proj = projection_loss(targets, zs_hat)  # (N,)
        loss = loss + proj_coeff * proj.mean()
    return LossOutput(loss=loss, denoise=denoise, proj=proj, cls=cls, t=t)
