"""Test helpers shared by several test files (not production code): tiny stand-ins for pretrained weights.

Import with `from fixtures import save_tiny_vae` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations


def save_tiny_vae(path: str, *, seed: int = 0, latent_channels: int = 4) -> str:
    """Save a tiny randomly initialised AutoencoderKL (downsampling 8) with save_pretrained; return path."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(path)
    return path
