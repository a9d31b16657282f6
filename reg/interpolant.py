"""The interpolant x_t = alpha(t) x0 + sigma(t) eps: the single source of truth for the path.

The loss (training targets) and the samplers (score/velocity conversion) both import from here,
so the two can never disagree on the path. t = 0 is data, t = 1 is noise (SiT/REPA/REG convention).
"""
from __future__ import annotations

import math

import torch

PATH_TYPES = ("linear", "cosine")


def check_path_type(path_type: str) -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"unknown path type {path_type!r}; expected one of {PATH_TYPES}")


def interpolant(t: torch.Tensor, path_type: str = "linear"):
    """Return (alpha, sigma, d_alpha, d_sigma) at time t, broadcast to t's shape and dtype.

    linear: alpha = 1 - t,          sigma = t
    cosine: alpha = cos(pi t / 2),  sigma = sin(pi t / 2)
    """
    check_path_type(path_type)
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return (
        torch.cos(half_pi * t),
        torch.sin(half_pi * t),
        -half_pi * torch.sin(half_pi * t),
        half_pi * torch.cos(half_pi * t),
    )


def sample_time(n: int, *, weighting: str = "uniform", path_type: str = "linear",
                device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n training times in [0, 1] (float32).

    uniform:   t ~ U(0, 1)
    lognormal: s = exp(n), n ~ N(0, 1); t = s / (1 + s) (linear) or (2/pi) atan(s) (cosine),
               i.e. the log-SNR is normal for either path.
    """
    check_path_type(path_type)
    if weighting == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if weighting == "lognormal":
        s = torch.exp(torch.randn(n, device=device, generator=generator))
        return s / (1 + s) if path_type == "linear" else (2 / math.pi) * torch.atan(s)
    raise ValueError(f"unknown time weighting {weighting!r}; expected 'uniform' or 'lognormal'")


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) so that t broadcasts against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
