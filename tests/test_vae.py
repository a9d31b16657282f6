"""models/vae.py: loading through load_vae, moments equal to diffusers', pixel-unshuffle, offline errors."""
from __future__ import annotations

import pytest
import torch

from models.vae import SD_VAES, SD_VAE_SCALING_FACTOR, VAE_STRIDE, PixelUnshuffleCodec, load_vae


def random_images(n: int, res: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def test_local_dir_matches_raw_diffusers(tiny_vae_dir):
    from diffusers import AutoencoderKL

    codec = load_vae(tiny_vae_dir)
    assert (codec.latent_channels, codec.downsample, codec.scaling_factor) == (4, VAE_STRIDE, SD_VAE_SCALING_FACTOR)
    assert (VAE_STRIDE, SD_VAE_SCALING_FACTOR) == (8, 0.18215)
    assert codec.name.endswith("tiny-vae")
    raw = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    images = random_images(3)
    mean, std = codec.encode_moments(images)
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (3, 4, 4, 4)
    with torch.no_grad():
        posterior = raw.encode(images.float() / 127.5 - 1).latent_dist  # REG's encode_pixels input map
        decoded = raw.decode(posterior.mean).sample
    assert (mean - posterior.mean).abs().max() <= 1e-6
    assert (std - posterior.std).abs().max() <= 1e-6
    assert torch.all(std > 0)
    out = codec.decode(mean)
    assert out.shape == (3, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert (out - decoded.clamp(-1, 1)).abs().max() <= 1e-6


def test_batched_equals_single(tiny_vae_dir):
    codec = load_vae(tiny_vae_dir)
    images = random_images(8, seed=1)
    mean, std = codec.encode_moments(images)
    singles = [codec.encode_moments(images[i:i + 1]) for i in range(8)]
    assert (mean - torch.cat([m for m, _ in singles])).abs().max() <= 1e-5
    assert (std - torch.cat([s for _, s in singles])).abs().max() <= 1e-5


def test_bf16_outputs_float32(tiny_vae_dir):
    ref = load_vae(tiny_vae_dir)
    codec = load_vae(tiny_vae_dir, dtype=torch.bfloat16)
    assert next(codec.parameters()).dtype == torch.bfloat16
    images = random_images(2, seed=2)
    mean, std = codec.encode_moments(images)
    assert mean.dtype == torch.float32
    assert (mean - ref.encode_moments(images)[0]).abs().max() < 0.1  # bf16 rounding, not garbage


def test_pixel_unshuffle_round_trip_is_exact():
    codec = load_vae("pixel-unshuffle")
    assert isinstance(codec, PixelUnshuffleCodec)
    assert (codec.latent_channels, codec.downsample, codec.scaling_factor) == (192, 8, 1.0)
    images = random_images(2, res=64, seed=3)
    mean, std = codec.encode_moments(images)
    assert mean.shape == (2, 192, 8, 8) and torch.all(std == 0)
    assert mean.min() >= -1 and mean.max() <= 1
    back = codec.decode(mean)
    assert torch.equal(((back + 1) * 127.5).round().to(torch.uint8), images)
    # the first channel of the 8x8 block at (0, 0) is the top-left red pixel
    assert mean[0, 0, 0, 0] == images[0, 0, 0, 0].float() / 127.5 - 1


def test_pixel_unshuffle_lowpass_codec():
    codec = load_vae("pixel-unshuffle-lowpass")
    assert (codec.latent_channels, codec.downsample, codec.name) == (48, 8, "pixel-unshuffle-lowpass")
    images = random_images(2, res=32, seed=4)
    mean, std = codec.encode_moments(images)
    assert mean.shape == (2, 48, 4, 4) and torch.all(std == 0)
    unit = images.float() / 127.5 - 1
    assert torch.allclose(mean[0, 0, 0, 0], unit[0, 0, :2, :2].mean())  # a 2x2 average of the top-left red pixels
    assert torch.allclose(codec.encode_moments(((codec.decode(mean) + 1) * 127.5).round().to(torch.uint8))[0],
                          mean, atol=1 / 127.5)  # encode(decode(z)) == z up to uint8 rounding
    blocky = images[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)  # constant on 2x2 blocks
    back = codec.decode(codec.encode_moments(blocky)[0])
    assert torch.equal(((back + 1) * 127.5).round().to(torch.uint8), blocky)


def test_missing_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as info:
        load_vae("ema")
    msg = str(info.value)
    assert SD_VAES["ema"] in msg and "hf download stabilityai/sd-vae-ft-ema" in msg
    assert "HF_HUB_OFFLINE" in msg and "save_pretrained" in msg and "huggingface-cli" not in msg
    cause = info.value.__cause__  # the hub's own error is kept, and its text is in the message
    assert cause is not None and type(cause).__name__ in msg
    with pytest.raises(FileNotFoundError, match="some-org/no-such-vae"):
        load_vae("some-org/no-such-vae")


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local AutoencoderKL directory nor a hub id"):
        load_vae("no-such-thing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path))
    with pytest.raises(TypeError, match="uint8"):
        load_vae("pixel-unshuffle").encode_moments(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of"):
        load_vae("pixel-unshuffle").encode_moments(torch.zeros(1, 3, 12, 12, dtype=torch.uint8))


def test_scaling_factor_comes_from_the_vae_config(tiny_vae_dir, tmp_path):
    import json
    import shutil
    other = shutil.copytree(tiny_vae_dir, tmp_path / "scaled")
    config = json.loads((other / "config.json").read_text())
    config["scaling_factor"] = 0.5
    (other / "config.json").write_text(json.dumps(config))
    assert load_vae(str(other)).scaling_factor == 0.5
    del config["scaling_factor"]  # configs that predate the field (sd-vae-ft-ema/-mse): the SD default
    (other / "config.json").write_text(json.dumps(config))
    assert load_vae(str(other)).scaling_factor == SD_VAE_SCALING_FACTOR


def test_decoding_vae_is_ema_for_sd_vae_latents_and_the_codec_itself_otherwise():
    """The authors decode with sd-vae-ft-ema whatever encoded the (SD-VAE) data; the weight-free demo codecs
    and other autoencoders decode their own latents. Old configs of ours recorded the encoding VAE as `vae`."""
    from models.vae import config_decoding_vae, decoding_vae
    ema, mse = "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"
    for encoder in (None, "ema", "mse", ema, mse):
        assert decoding_vae(encoder) == ema
    for own in ("pixel-unshuffle", "pixel-unshuffle-lowpass", "/data/my-vae", "org/other-vae"):
        assert decoding_vae(own) == own
    # new configs: `vae` is the decoder, also an explicit `train.py --vae mse` one
    assert config_decoding_vae({"encode_vae": mse, "vae": mse}) == mse
    assert config_decoding_vae({"encode_vae": None, "vae": ema}) == ema
    # old configs of ours (`vae` = the encoding VAE) and official ones (no VAE recorded)
    assert config_decoding_vae({"vae": mse}) == ema
    assert config_decoding_vae({"vae": "pixel-unshuffle-lowpass"}) == "pixel-unshuffle-lowpass"
    assert config_decoding_vae({}) == ema


def test_train_config_records_encoding_and_decoding_vae():
    from types import SimpleNamespace

    import train
    args = train.parse_args(["--method", "sit", "--model", "SiT-T/2", "--resolution", "32", "--num-classes", "4"])
    for name, decoder in (("stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema"),
                          ("pixel-unshuffle-lowpass", "pixel-unshuffle-lowpass"), (None, "stabilityai/sd-vae-ft-ema")):
        data = SimpleNamespace(vae_stride=8, vae_info={"name": name, "latent_channels": 4, "scaling_factor": 0.18215})
        config = train.model_config(args, data, [])
        assert (config["encode_vae"], config["vae"]) == (name, decoder)
    args.vae = "mse"  # the user's choice wins
    assert train.model_config(args, data, [])["vae"] == "mse"
