"""Latent codecs: the SD-VAE (diffusers AutoencoderKL) and a weight-free pixel-unshuffle stand-in.

Both map uint8 images (N, 3, H, W) to a diagonal Gaussian posterior (mean, std), each
(N, C, H/8, W/8) float32, and decode *unscaled* latents back to [-1, 1] images. The training
latent is z = (mean + std * eps) * scaling_factor (REG train.py `sample_posterior`); the sampler
decodes `decode(z / scaling_factor)` (REG generate.py).

`load_vae(spec)` accepts
    "ema" / "mse"         stabilityai/sd-vae-ft-ema / -mse
    an HF hub id          e.g. "stabilityai/sd-vae-ft-ema", or "org/repo/vae" for a pipeline's subfolder
    a local directory     saved with `AutoencoderKL.save_pretrained` (config.json + weights)
    "pixel-unshuffle"     demo only: exact space-to-depth by 8 of x/127.5-1 (192 channels, std = 0),
                          so the offline quick start can make real pictures without pretrained weights.
    "pixel-unshuffle-lowpass"  demo only: 2x2 box average, then space-to-depth by 4 (48 channels),
                          sized for the tiny SiT-T/2 of the quick start (see PixelUnshuffleCodec).
Decoding: latents are decoded with sd-vae-ft-ema unless the user names another VAE (`--vae`), as the
authors' generate.py does (its `--vae` default, the paper's FIDs), also when the data were encoded with
sd-vae-ft-mse (the pair shares the encoder, only the decoders differ). Latents of any other codec (the demo
codecs, another autoencoder) are decoded by that codec: `decoding_vae`, `config_decoding_vae`.
Hub ids are looked up in the local HF cache first; the network is only tried when HF_HUB_OFFLINE
is not set. A missing model gives a short error that says what to fetch, not a hub stack trace.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from reg.hub import hub_offline, portable_vae_spec

SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# The SD-VAE latent scale (REG train.py `latents_scale`) and spatial stride: defined here once.
# The scale of a loaded AutoencoderKL comes from its config where the config has one.
SD_VAE_SCALING_FACTOR = 0.18215
VAE_STRIDE = 8
PIXEL_UNSHUFFLE = "pixel-unshuffle"
PIXEL_UNSHUFFLE_LOWPASS = "pixel-unshuffle-lowpass"


def decoding_vae(encode_vae: str | None) -> str:
    """The VAE that decodes latents made by `encode_vae` (None: unknown, the SD-VAE): sd-vae-ft-ema for the
    SD-VAE pair (the authors' generate.py `--vae` default), the codec itself for anything else."""
    if encode_vae is None or encode_vae in SD_VAES or encode_vae in SD_VAES.values():
        return SD_VAES["ema"]
    return encode_vae


def config_decoding_vae(config: dict) -> str:
    """The decoding VAE a checkpoint config names. Configs that record `encode_vae` (the VAE that encoded
    the training data) hold the decoder in `vae`. In older configs of ours `vae` was the encoding VAE (and
    official checkpoints record none): those decode as `decoding_vae` says, so an old `vae:
    stabilityai/sd-vae-ft-mse` decodes with ft-ema, as the authors do."""
    if "encode_vae" in config:
        return config["vae"]
    return decoding_vae(config.get("vae"))


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] with x / 127.5 - 1 (REG preprocessing/encoders.py `encode_pixels`)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return images.to(torch.float32) / 127.5 - 1


class LatentCodec(nn.Module):
    """Common interface of the latent codecs. Subclasses set the four attributes below."""

    name: str
    latent_channels: int
    downsample: int
    scaling_factor: float

    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the codec's downsampling {self.downsample}")

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, 3, H, W) -> posterior (mean, std), each float32 (N, C, H/ds, W/ds)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (N, C, h, w) -> float32 images in [-1, 1], (N, 3, h*ds, w*ds)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, latent_channels={self.latent_channels}, "
                f"downsample={self.downsample}, scaling_factor={self.scaling_factor}")


class SDVAE(LatentCodec):
    """A diffusers AutoencoderKL (the SD-VAE family), frozen, in eval mode."""

    def __init__(self, vae, name: str):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        # sd-vae-ft-ema/-mse configs predate this field; diffusers then fills in 0.18215.
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALING_FACTOR)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_size(images)
        x = images_to_unit(images.to(self.vae.device)).to(self.vae.dtype)
        posterior = self.vae.encode(x).latent_dist  # std = exp(logvar / 2), logvar clamped to [-30, 20]
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z.to(self.vae.device, self.vae.dtype)).sample
        return x.float().clamp(-1, 1)


class PixelUnshuffleCodec(LatentCodec):
    """Weight-free demo codec: a pool x pool box average, then space-to-depth by 8 / pool.

    pool = 1 ("pixel-unshuffle"): exactly invertible, (3, H, W) -> (192, H/8, W/8).
    pool = 2 ("pixel-unshuffle-lowpass"): (3, H, W) -> (48, H/8, W/8). Sized for tiny models: a SiT
        token at patch 2 holds 4 x latent_channels numbers, 768 with pool 1, four times SiT-T's width
        192, so its final linear layer reaches only a 192-dim subspace of each token and the sampler
        never removes the noise in the rest (speckled samples). With 48 channels a token is 192
        numbers. decode repeats each value over its 2 x 2 block: encode(decode(z)) == z, and images
        that are constant on 2 x 2 blocks round-trip exactly.
    Demo only. The posterior is a point mass (std = 0); scaling_factor = 1.0 because the values are
    already in [-1, 1] with roughly unit-order spread.
    """

    def __init__(self, downsample: int = VAE_STRIDE, pool: int = 1):
        super().__init__()
        if downsample % pool:
            raise ValueError(f"downsample {downsample} is not a multiple of the pooling {pool}")
        self.name = PIXEL_UNSHUFFLE if pool == 1 else PIXEL_UNSHUFFLE_LOWPASS
        self.downsample, self.pool = downsample, pool
        self.latent_channels = 3 * (downsample // pool) ** 2
        self.scaling_factor = 1.0

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_size(images)
        x = images_to_unit(images)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        mean = F.pixel_unshuffle(x, self.downsample // self.pool)
        return mean, torch.zeros_like(mean)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (N, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        x = F.pixel_shuffle(z.float(), self.downsample // self.pool)
        if self.pool > 1:
            x = F.interpolate(x, scale_factor=self.pool, mode="nearest")
        return x.clamp(-1, 1)


def _from_pretrained(repo_or_dir: str, **kwargs):
    from diffusers import AutoencoderKL  # lazy: importing diffusers takes seconds

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # hub-client noise
        return AutoencoderKL.from_pretrained(repo_or_dir, **kwargs)


def _load_hub(repo_id: str, dtype: torch.dtype):
    """Load an AutoencoderKL from the HF cache, or from the hub when online; clear error otherwise."""
    parts = repo_id.split("/")
    kwargs = {"subfolder": "/".join(parts[2:])} if len(parts) > 2 else {}
    repo = "/".join(parts[:2])
    sub = f" (subfolder {kwargs['subfolder']!r})" if kwargs else ""
    kwargs["torch_dtype"] = dtype
    try:
        return _from_pretrained(repo, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:  # not in the local cache
        cause = e
    if hub_offline():
        reason = f"HF_HUB_OFFLINE is set and it is not in the local HF cache ({type(cause).__name__}: {cause})"
    else:
        try:
            return _from_pretrained(repo, **kwargs)
        except (OSError, ValueError) as e:  # 401 / 404 / gated / no network: the hub's text says which
            cause = e
            reason = f"download failed ({type(e).__name__}: {e})"
    raise FileNotFoundError(
        f"cannot load the VAE {repo_id!r}{sub}: {reason}.\n"
        f"  Fetch it on a machine with network access:  hf download {repo}\n"
        f"  (into the HF cache, HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}),\n"
        f"  or save it with AutoencoderKL.save_pretrained(DIR) and pass DIR instead of the hub id."
    ) from cause


def load_vae(spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LatentCodec:
    """Build the latent codec named by `spec` (see the module docstring), frozen, on `device`.

    `dtype` is the compute dtype of the SD-VAE; outputs are float32 either way.
    """
    if spec in (PIXEL_UNSHUFFLE, PIXEL_UNSHUFFLE_LOWPASS):
        return PixelUnshuffleCodec(pool=1 if spec == PIXEL_UNSHUFFLE else 2).to(device)
    repo_or_dir = SD_VAES.get(spec, spec)
    if os.path.isdir(repo_or_dir):
        if not os.path.isfile(os.path.join(repo_or_dir, "config.json")):
            raise FileNotFoundError(f"VAE directory {repo_or_dir!r} has no config.json; "
                                    "expected a folder written by AutoencoderKL.save_pretrained")
        vae = _from_pretrained(repo_or_dir, local_files_only=True, torch_dtype=dtype)
        name = portable_vae_spec(os.path.abspath(repo_or_dir))  # never this machine's absolute path
    elif os.path.exists(repo_or_dir) or repo_or_dir.startswith((".", "/", "~")) or repo_or_dir.count("/") == 0:
        raise FileNotFoundError(
            f"VAE {spec!r} is neither a local AutoencoderKL directory nor a hub id "
            f"(expected 'ema', 'mse', 'org/name', a directory, {PIXEL_UNSHUFFLE!r} or {PIXEL_UNSHUFFLE_LOWPASS!r})")
    else:
        vae = _load_hub(repo_or_dir, dtype)
        name = repo_or_dir
    return SDVAE(vae.to(device), name=name)  # dtype set at load: diffusers warns on .to(dtype)
