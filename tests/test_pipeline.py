"""reg/pipeline.py: REGPipeline.from_pretrained(...)(class_labels=...).images gives generate.py's pixels exactly,
for the same checkpoint, seed, indices, classes and sampler settings; its own checks fail before sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import generate
from helpers import checkpoint_sit
from reg.checkpoints import export_safetensors
from reg.pipeline import REGPipeline
from reg.utils import UserError


def generate_npz(ckpt, out, *flags) -> tuple[np.ndarray, np.ndarray]:
    """generate.py's arr_0 (uint8 images) and arr_1 (labels) for these flags."""
    argv = ["--ckpt", str(ckpt), "--sample-dir", str(out), "--run-name", "run", "--device", "cpu", *flags]
    generate.main(generate.parse_args(argv))
    with np.load(out / "run.npz") as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory, tiny_vae_dir):
    """A SiT-T/2 + REG on 4-channel latents decoded by a tiny diffusers AutoencoderKL (the SD-VAE's code path)."""
    model = checkpoint_sit()
    config = {"model": "SiT-T/2", "encoder_depth": 2, "path_type": "linear", "latents_scale": 0.18215,
              "vae": "stabilityai/sd-vae-ft-ema", "resolution": 32}
    path = tmp_path_factory.mktemp("vae-ckpt") / "ema_0000020.safetensors"
    export_safetensors(path, model.state_dict(), config)
    return path


@pytest.mark.parametrize("case", ["sde-guided", "unipc-random-classes"])
def test_pipeline_images_equal_generate_py(tiny_reg_ckpt, tmp_path, case):
    """The same tiny checkpoint, seed, indices, classes and settings: pixel-identical, labels identical."""
    if case == "sde-guided":  # guided SDE (the paper's sampler), classes repeated over 5 images, batches of 2
        flags = ["--mode", "sde", "--num-steps", "4", "--cfg-scale", "2.0", "--cls-cfg-scale", "1.5",
                 "--guidance-high", "0.7", "--global-seed", "7", "--num-fid-samples", "5", "--class-labels", "1,3,0",
                 "--per-proc-batch-size", "4"]
        kwargs = dict(class_labels=[1, 3, 0], num_images=5, mode="sde", num_inference_steps=4, guidance_scale=2.0,
                      cls_guidance_scale=1.5, guidance_high=0.7, seed=7, batch_size=2)
    else:  # a multistep ODE solver, classes drawn from the seed
        flags = ["--mode", "unipc", "--num-steps", "3", "--global-seed", "11", "--num-fid-samples", "3"]
        kwargs = dict(num_images=3, mode="unipc", num_inference_steps=3, seed=11)
    images, labels = generate_npz(tiny_reg_ckpt, tmp_path, *flags)
    pipe = REGPipeline.from_pretrained(str(tiny_reg_ckpt))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs)
    assert len(out.images) == len(images) and out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    assert np.array_equal(np.stack([np.asarray(im) for im in out.images]), images)
    assert out.class_labels == labels.tolist() and out.seed == kwargs["seed"]
    assert np.array_equal(pipe(**kwargs, output_type="np").images, images)  # uint8 (N, H, W, 3), the npz's array
    assert len(set(images.reshape(len(images), -1).sum(1).tolist())) == len(images)  # not one image repeated


def test_pipeline_with_a_diffusers_vae_and_fp64_equals_generate_py(vae_ckpt, tiny_vae_dir, tmp_path):
    images, labels = generate_npz(vae_ckpt, tmp_path, "--vae", tiny_vae_dir, "--precision", "fp64", "--num-steps", "2",
                                  "--num-fid-samples", "2", "--class-labels", "9,4", "--global-seed", "3")
    pipe = REGPipeline.from_pretrained(vae_ckpt, vae=tiny_vae_dir, torch_dtype=torch.float64)
    out = pipe(class_labels=[9, 4], num_inference_steps=2, seed=3, output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and np.array_equal(out.images, images)
    assert out.class_labels == labels.tolist() == [9, 4]


def test_pipeline_seed_from_a_generator_and_refusals(tiny_reg_ckpt):
    pipe = REGPipeline.from_pretrained(tiny_reg_ckpt)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    # diffusers' convention: a generator seeded alike repeats the images; the seed it gave is returned
    a = pipe(207 % 4, generator=torch.Generator().manual_seed(5), **kw)
    b = pipe(207 % 4, generator=torch.Generator().manual_seed(5), **kw)
    c = pipe(207 % 4, generator=torch.Generator().manual_seed(6), **kw)
    assert a.seed == b.seed != c.seed and np.array_equal(a.images, b.images)
    assert np.array_equal(pipe(3, seed=a.seed, **kw).images, a.images) and not np.array_equal(a.images, c.images)
    # wrong values fail before sampling, one line naming them
    for call, match in [(dict(class_labels=[1, 4]), r"class indices must be in \[0, 4\), got \[4\]"),
                        (dict(class_labels=[True]), "integers"),
                        (dict(guidance_low=0.9, guidance_high=0.5), "guidance_low <= guidance_high"),
                        (dict(guidance_scale=float("nan")), "guidance scales"),
                        (dict(mode="ddim"), "mode 'ddim'"), (dict(num_images=0), r"num_images \(0\)"),
                        (dict(output_type="pt"), "output_type 'pt'")]:
        with pytest.raises(UserError, match=match) as e:
            pipe(**{"class_labels": 1, "num_inference_steps": 2, **call})
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="torch_dtype torch.float16 is not supported"):
        REGPipeline.from_pretrained(tiny_reg_ckpt, torch_dtype=torch.float16)
