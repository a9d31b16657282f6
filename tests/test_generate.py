"""End-to-end tests of generate.py on CPU: a tiny SiT saved in our checkpoint format and in the
official REG format (ema + pickled argparse.Namespace), a randomly initialised tiny diffusers
AutoencoderKL saved to disk, and the user-facing parse_args/main path."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from helpers import each_change_is_refused
from models.sit import SiT_models
from reg import seeded_images
from reg.checkpoints import CheckpointDir

NUM_CLASSES = 4
LATENT = 4  # latent side; images are 32 x 32 with the 8x VAE


def tiny_sit(use_cls_token: bool = True, in_channels: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=LATENT, in_channels=in_channels, num_classes=NUM_CLASSES,
                                  z_dims=[32], encoder_depth=1, projector_dim=64, use_cls_token=use_cls_token)
    # adaLN-Zero makes a fresh SiT predict exactly 0; perturb every weight so samples depend on it.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Our training checkpoint, an official-format one with the same weights, and a tiny VAE dir."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(root / "vae")

    sd = tiny_sit().state_dict()
    config = {"model": "SiT-T/2", "encoder_depth": 1, "path_type": "linear", "latents_scale": 0.18215,
              "vae": str(root / "vae")}
    CheckpointDir(root).save(100, model=sd, ema=sd, opt={}, config=config, args={})  # root/0000100.pt
    official_args = argparse.Namespace(model="SiT-T/2", encoder_depth=1, path_type="linear", resolution=32,
                                       fused_attn=True, qk_norm=False, cls=0.03)
    torch.save({"model": sd, "ema": sd, "opt": {}, "steps": 100, "args": official_args}, root / "official.pt")
    repa_sd = tiny_sit(use_cls_token=False).state_dict()
    torch.save({"ema": repa_sd, "args": official_args}, root / "repa.pt")
    return root


def run(assets, out, *extra):
    argv = ["--ckpt", str(assets / "0000100.pt"), "--sample-dir", str(out), "--num-fid-samples", "6",
            "--num-steps", "6", "--cfg-scale", "2.0", "--cls-cfg-scale", "1.5", "--guidance-high", "0.7",
            "--global-seed", "3", "--device", "cpu", "--run-name", "run", "--precision", "fp64", *extra]
    return generate.main(generate.parse_args(argv))


def test_npz_byte_identical_across_batch_sizes_and_adm_format(assets, tmp_path):
    a = run(assets, tmp_path / "a", "--per-proc-batch-size", "2")
    b = run(assets, tmp_path / "b", "--per-proc-batch-size", "4", "--vae", str(assets / "vae"))
    npz_a, npz_b = (tmp_path / d / "run.npz" for d in "ab")
    assert npz_a.read_bytes() == npz_b.read_bytes()
    assert a["generated"] == b["generated"] == 6 and a["images_per_second"] > 0

    with np.load(npz_a) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.tolist() == seeded_images.class_labels(
        list(range(6)), global_seed=3, num_classes=NUM_CLASSES, balanced=False).tolist()
    assert images.std() > 1  # not a constant image
    assert len({im.tobytes() for im in images}) == 6  # every image has its own noise
    for i in range(6):  # the npz is the PNGs, in index order
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "run" / f"{i:06d}.png")), images[i])

    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["cfg_scale"] == 2.0 and meta["cls_cfg_scale"] == 1.5 and meta["guidance_high"] == 0.7
    assert meta["mode"] == "sde" and meta["num_steps"] == 6 and meta["global_seed"] == 3
    assert meta["model_config"]["model"] == "SiT-T/2" and meta["model_config"]["use_cls_token"]
    assert meta["result"]["shape"] == [6, 32, 32, 3]

    # fp32: the same noise and labels; the batch-size-dependent matmul kernels may move a rare
    # pixel by one level (see generate.py's docstring), nothing more.
    for batch in ("2", "4"):
        f32 = run(assets, tmp_path / f"fp32-{batch}", "--per-proc-batch-size", batch, "--precision", "fp32")
        with np.load(f32["npz"]) as data:
            diff = np.abs(data["arr_0"].astype(int) - images)
            assert data["arr_1"].tolist() == labels.tolist()
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3

    # Another seed gives other images.
    c = run(assets, tmp_path / "c", "--global-seed", "4")
    with np.load(c["npz"]) as data:
        assert not np.array_equal(data["arr_0"], images)


def test_resume_skips_finished_images(assets, tmp_path):
    run(assets, tmp_path, "--per-proc-batch-size", "4")
    run_dir = tmp_path / "run"
    full = (tmp_path / "run.npz").read_bytes()
    # Preempted job: two images never written, a half-written temporary file left behind.
    for i in (1, 4):
        (run_dir / f"{i:06d}.png").unlink()
    (run_dir / ".000001.png.123.tmp").write_bytes(b"partial")
    mtime = (run_dir / "000000.png").stat().st_mtime_ns
    again = run(assets, tmp_path, "--per-proc-batch-size", "3")
    assert again["generated"] == 2
    assert (run_dir / "000000.png").stat().st_mtime_ns == mtime  # untouched
    assert (tmp_path / "run.npz").read_bytes() == full

    # Extending the run to more images keeps the first ones.
    more = run(assets, tmp_path, "--num-fid-samples", "8")
    assert more["generated"] == 2
    with np.load(tmp_path / "run.npz") as data, np.load(_bytes_npz(tmp_path, full)) as old:
        assert np.array_equal(data["arr_0"][:6], old["arr_0"]) and data["arr_0"].shape[0] == 8

    # Different sampling settings into the same folder are refused.
    with pytest.raises(ValueError, match="other settings.*cfg_scale"):
        run(assets, tmp_path, "--cfg-scale", "3.0")


def _bytes_npz(tmp_path, data: bytes):
    path = tmp_path / "old.npz"
    path.write_bytes(data)
    return path


def test_official_checkpoint_with_namespace_gives_the_same_images(assets, tmp_path):
    ours = run(assets, tmp_path / "ours", "--per-proc-batch-size", "3")
    official = run(assets, tmp_path / "official", "--ckpt", str(assets / "official.pt"),
                   "--vae", str(assets / "vae"), "--model", "SiT-T/2", "--cls", "32",
                   "--projector-embed-dims", "32", "--encoder-depth", "1")
    with np.load(ours["npz"]) as a, np.load(official["npz"]) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    # Flags that contradict the weights are errors, not silent rebuilds.
    with pytest.raises(ValueError, match="--model SiT-S/2 does not match"):
        run(assets, tmp_path / "bad", "--ckpt", str(assets / "official.pt"), "--vae", str(assets / "vae"),
            "--model", "SiT-S/2")


def test_ode_heun_balanced_grid_without_class_token(assets, tmp_path):
    """A REPA-style checkpoint (no class token, only the ema key), ODE Heun, balanced classes."""
    out = generate.main(generate.parse_args([
        "--ckpt", str(assets / "repa.pt"), "--vae", str(assets / "vae"), "--sample-dir", str(tmp_path),
        "--num-fid-samples", "8", "--per-proc-batch-size", "3", "--mode", "ode", "--heun", "--num-steps", "4",
        "--cfg-scale", "1.5", "--balanced", "--grid", "4", "--device", "cpu", "--resolution", "32"]))
    name = out["npz"].rsplit("/", 1)[-1][:-4]
    # the original's name ({model}-{ckpt}-size-{res}-vae-{vae}-cfg-{cfg}-seed-{seed}-{mode}-{gh}-{clscfg}),
    # plus a suffix for our own --balanced
    assert name == "SiT-T-2-repa-size-32-vae-vae-cfg-1.5-seed-0-ode-1.0-1.5-balanced"
    with np.load(out["npz"]) as data:
        assert data["arr_1"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
        assert data["arr_0"].shape == (8, 32, 32, 3)
    grid = Image.open(tmp_path / f"{name}-grid.png")
    assert grid.size == (64, 64)
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["heun"] and meta["balanced"] and not meta["model_config"]["use_cls_token"]

    # bf16 autocast: a separate run folder, and the same pictures up to bf16 rounding.
    with pytest.warns(UserWarning, match="2 is not a multiple of 4 classes"):
        bf16 = generate.main(generate.parse_args([
            "--ckpt", str(assets / "repa.pt"), "--vae", str(assets / "vae"), "--sample-dir", str(tmp_path),
            "--num-fid-samples", "2", "--mode", "ode", "--heun", "--num-steps", "4", "--cfg-scale", "1.5",
            "--balanced", "--device", "cpu", "--precision", "bf16"]))
    assert bf16["npz"].endswith("-balanced-bf16.npz")
    with np.load(out["npz"]) as a, np.load(bf16["npz"]) as b:
        diff = np.abs(a["arr_0"][:2].astype(float) - b["arr_0"])
        assert 0 < diff.mean() < 3, diff.mean()


def test_per_image_seeds_and_labels():
    seeds = {seeded_images.image_seed(0, i) for i in range(1000)} | {seeded_images.image_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000  # no collisions between indices or neighbouring global seeds
    assert seeded_images.image_seed(5, 7) == seeded_images.image_seed(5, 7)
    assert seeded_images.image_seed(5, 7, seeded_images.LABEL_STREAM) != seeded_images.image_seed(5, 7)
    labels = seeded_images.class_labels(list(range(4000)), global_seed=0, num_classes=4, balanced=False)
    assert set(labels.tolist()) == {0, 1, 2, 3} and abs(labels.float().mean().item() - 1.5) < 0.1
    # A label depends on its index only, not on which other indices are asked for.
    assert seeded_images.class_labels([17, 3], global_seed=0, num_classes=4, balanced=False).tolist() == \
        [labels[17].item(), labels[3].item()]
    balanced = seeded_images.class_labels(list(range(1000)), global_seed=0, num_classes=10, balanced=True)
    assert torch.bincount(balanced).tolist() == [100] * 10


def test_generate_images_in_memory_equals_the_png_files(assets, tmp_path):
    """generate.py's files and generate_images (train.py's FID, sweep.py) are one code path: same
    images for any order and batching of the indices."""
    from models.vae import load_vae
    from reg.loading import load_generator

    run(assets, tmp_path, "--per-proc-batch-size", "4")
    model, config, *_ = load_generator(str(assets / "0000100.pt"), decoder=False)
    model.to(torch.float64)
    codec = load_vae(str(assets / "vae"), dtype=torch.float64)
    seen = {}
    for indices, images, labels in seeded_images.generate_images(
            model, codec, [5, 0, 3, 1, 2, 4], global_seed=3, num_classes=NUM_CLASSES, mode="sde", num_steps=6,
            cfg_scale=2.0, cls_cfg_scale=1.5, guidance_high=0.7, latents_scale=config["latents_scale"],
            batch_size=5, device="cpu"):
        assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)
        assert labels.tolist() == seeded_images.class_labels(indices, global_seed=3, num_classes=NUM_CLASSES,
                                                          balanced=False).tolist()
        seen.update(zip(indices, images.numpy()))
    assert sorted(seen) == list(range(6))
    for i, image in seen.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "run" / f"{i:06d}.png")), image), i


# ----------------------------------------------------------------------------------------------
# Drop-in for the original generate.py, and integrity of resumed runs

ORIGINAL_EVAL_SH_ARGS = [  # the original eval.sh's generate.py flags, verbatim
    "--model", "SiT-XL/2", "--num-fid-samples", "50000", "--ckpt", "exp/checkpoints/4000000.pt",
    "--path-type=linear", "--encoder-depth=8", "--projector-embed-dims=768", "--per-proc-batch-size=64",
    "--mode=sde", "--num-steps=250", "--cfg-scale=2.3", "--cls-cfg-scale=2.3", "--guidance-high=0.85",
    "--sample-dir", "exp/checkpoints", "--cls=768", "--local-rank=0"]


def test_original_flags_defaults_and_run_name():
    args = generate.parse_args(ORIGINAL_EVAL_SH_ARGS)
    assert (args.model, args.encoder_depth, args.projector_embed_dims, args.cls, args.local_rank) == \
        ("SiT-XL/2", 8, [768], 768, 0)  # the dims parsed (and checked) with the flags
    name = generate.default_run_name(args, args.model, 256, "ema")
    assert name == "SiT-XL-2-4000000-size-256-vae-ema-cfg-2.3-seed-0-sde-0.85-2.3"  # what the original eval.sh reads
    assert generate.vae_name("stabilityai/sd-vae-ft-mse") == "mse"
    # the original's defaults, except --mode (its "ode" exits without sampling)
    d = generate.parse_args([])
    assert (d.cfg_scale, d.cls_cfg_scale, d.num_steps, d.guidance_low, d.guidance_high, d.per_proc_batch_size,
            d.num_fid_samples, d.global_seed, d.tf32, d.heun, d.legacy, d.mode) == \
        (1.5, 1.5, 50, 0.0, 1.0, 32, 50_000, 0, True, False, False, "sde")
    assert d.ckpt == "hf:Martinser/REG"
    d.ckpt = "pretrained/last.pt"
    assert generate.default_run_name(d, "SiT-XL/2", 256, "ema") == "SiT-XL-2-last-size-256-vae-ema-cfg-1.5-seed-0-sde-1.0-1.5"
    assert generate.checkpoint_name("a/b/ema_0000010.safetensors") == "ema_0000010"


@pytest.mark.parametrize("flags,match", [
    (["--guidance-low", "0.8", "--guidance-high", "0.2"], "--guidance-low 0.8 > --guidance-high 0.2"),
    (["--cfg-scale", "-1"], r"--cfg-scale: must be in \[0, inf\)"),  # one flag's range: refused while parsing
    (["--cls-cfg-scale", "-0.5"], r"--cls-cfg-scale: must be in \[0, inf\)"),
])
def test_impossible_guidance_is_refused(flags, match, capsys):
    try:
        args = generate.parse_args(flags)
    except SystemExit:
        assert __import__("re").search(match, capsys.readouterr().err)
        return
    with pytest.raises(ValueError, match=match):
        generate.check_args(args)


def test_num_classes_must_match_the_checkpoint(assets, tmp_path):
    # one above: the null row would silently become a real class
    with pytest.raises(ValueError, match=rf"--num-classes {NUM_CLASSES + 1} does not match"):
        run(assets, tmp_path, "--num-classes", str(NUM_CLASSES + 1))
    # a decoder whose latents are not the model's (reg.loading.load_generator, sweep.py's loader too)
    with pytest.raises(ValueError, match=r"VAE 'pixel-unshuffle' has \d+ latent channels but the model expects 4"):
        run(assets, tmp_path, "--vae", "pixel-unshuffle")


def test_resume_refuses_another_checkpoint(assets, tmp_path):
    import shutil
    ckpt = tmp_path / "0000100.pt"
    shutil.copy(assets / "0000100.pt", ckpt)
    run(assets, tmp_path, "--ckpt", str(ckpt), "--num-fid-samples", "2", "--num-steps", "2")
    # another path with the very same weights: still refused (its content may change independently)
    with pytest.raises(ValueError, match="other settings.*checkpoint"):
        run(assets, tmp_path, "--num-fid-samples", "2", "--num-steps", "2")
    # other settings that are not in the original's folder name are refused too
    with pytest.raises(ValueError, match=r"other settings \(num_steps: 2 -> 3\)"):
        run(assets, tmp_path, "--ckpt", str(ckpt), "--num-fid-samples", "2", "--num-steps", "3")
    with pytest.raises(ValueError, match=r"other settings \(guidance_low: 0.0 -> 0.1\)"):
        run(assets, tmp_path, "--ckpt", str(ckpt), "--num-fid-samples", "2", "--num-steps", "2", "--guidance-low", "0.1")
    with pytest.raises(ValueError, match=r"other settings \(tf32: True -> False\)"):
        run(assets, tmp_path, "--ckpt", str(ckpt), "--num-fid-samples", "2", "--num-steps", "2", "--no-tf32")
    # the same path with new content (e.g. a newer checkpoint saved under the same name)
    sd = tiny_sit().state_dict()
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    config = {"model": "SiT-T/2", "encoder_depth": 1, "path_type": "linear", "latents_scale": 0.18215,
              "vae": str(assets / "vae")}
    CheckpointDir(ckpt.parent).save(int(ckpt.stem), model=sd, ema=sd, opt={}, config=config, args={})
    with pytest.raises(ValueError, match="other settings.*sha256_first_mib"):
        run(assets, tmp_path, "--ckpt", str(ckpt), "--num-fid-samples", "2", "--num-steps", "2")


# Every setting that changes the pixels of image i, with another value and why it matters. Written out here
# (not read from generate.SAMPLING_KEYS) so that a key dropped from the check fails this test.
GENERATE_PIXEL_SETTINGS = {
    "checkpoint": ({"path": "/other.pt", "size": 1, "mtime_ns": 1, "sha256_first_mib": "0" * 64}, "the weights"),
    "model_config": ({"model": "SiT-T/2", "path_type": "linear", "fused_attn": False}, "the network and overrides"),
    "vae": ("mse", "the decoder"),
    "latents_scale": (1.0, "latents are divided by it before decoding"),
    "mode": ("ode", "another sampler"),
    "num_steps": (250, "another time grid"),
    "heun": (True, "the ODE corrector"),
    "cfg_scale": (4.0, "guidance"),
    "cls_cfg_scale": (4.0, "class-token guidance"),
    "guidance_low": (0.3, "the guidance interval"),
    "guidance_high": (0.7, "the guidance interval"),
    "path_type": ("cosine", "the score the SDE derives from the velocity"),
    "global_seed": (1, "image i's noise and class"),
    "balanced": (True, "image i's class"),
    "num_classes": (10, "image i's class and the null label"),
    "precision": ("fp64", "the sampler's dtype"),
    "ema": (False, "EMA or raw weights"),
    "tf32": (False, "matmul precision on GPU"),
    "class_labels": ([1, 207], "image i's class (--class-labels)"),
}


def _generate_settings():
    import generate
    args = generate.parse_args(["--ckpt", "exps/run/checkpoints/ema_0000010.safetensors"])
    args.label_list = None  # what generate.py makes of --class-labels (none given)
    model = type("Model", (), {"num_classes": 4})()
    config = {"model": "SiT-T/2", "path_type": "linear", "fused_attn": True}
    identity = {"path": "/exps/run/checkpoints/ema_0000010.safetensors", "size": 10, "mtime_ns": 5,
                "sha256_first_mib": "f" * 64}
    return generate.build_settings(args, config, model, "ema", 0.18215, 1, identity)


def test_generate_refuses_a_folder_sampled_with_any_other_pixel_setting(tmp_path):
    import generate
    base = _generate_settings()
    (tmp_path / "settings.json").write_text(json.dumps(base))
    generate.check_resumable(tmp_path, base)  # the same settings resume
    each_change_is_refused(lambda settings: generate.check_resumable(tmp_path, settings), base,
                           GENERATE_PIXEL_SETTINGS)
    # image i does not depend on these: a rerun may change them
    for key, value in (("per_proc_batch_size", 7), ("world_size", 3), ("num_fid_samples", 100)):
        generate.check_resumable(tmp_path, {**base, key: value})


def test_corrupt_png_regenerated_stale_npz_tmp_removed_foreign_folder_refused(assets, tmp_path):
    out = run(assets, tmp_path, "--num-fid-samples", "3", "--num-steps", "2", "--npz-path-file",
              str(tmp_path / "npz.txt"))
    assert (tmp_path / "npz.txt").read_text().strip() == str((tmp_path / "run.npz").resolve())
    full = (tmp_path / "run.npz").read_bytes()
    png = tmp_path / "run" / "000001.png"
    png.write_bytes(png.read_bytes()[:100])  # truncated, e.g. by a full disk
    stale = tmp_path / ".run.npz.abc123.tmp"  # a kill while packing
    stale.write_bytes(b"half an npz")
    again = run(assets, tmp_path, "--num-fid-samples", "3", "--num-steps", "2")
    assert again["generated"] == 1 and not stale.exists()
    assert (tmp_path / "run.npz").read_bytes() == full == open(out["npz"], "rb").read()
    # damaged inside (IEND intact, so it passes the start-up check): found while packing, made again
    for i in (0, 2):
        data = bytearray((tmp_path / "run" / f"{i:06d}.png").read_bytes())
        data[60:80] = bytes(20)
        (tmp_path / "run" / f"{i:06d}.png").write_bytes(bytes(data))
    again = run(assets, tmp_path, "--num-fid-samples", "3", "--num-steps", "2")
    assert again["generated"] == 0 and (tmp_path / "run.npz").read_bytes() == full
    # PNGs without our settings file (e.g. the original script's): unknown settings, not resumed
    foreign = tmp_path / "foreign" / "run"
    foreign.mkdir(parents=True)
    (foreign / "000000.png").write_bytes(png.read_bytes())
    with pytest.raises(ValueError, match="no settings.json"):
        run(assets, tmp_path / "foreign", "--num-fid-samples", "2", "--num-steps", "2")


def test_legacy_repa_checkpoint(assets, tmp_path):
    """--legacy: REPA's old layout (blocks.* up to the encoder depth, then decoder_blocks.*)."""
    sd = tiny_sit().state_dict()
    depth, enc = 6, 2
    legacy = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= enc:
            k = ".".join(["decoder_blocks", str(int(parts[1]) - enc), *parts[2:]])
        legacy[k] = v
    assert any(k.startswith(f"decoder_blocks.{depth - enc - 1}.") for k in legacy)
    torch.save({"ema": legacy}, tmp_path / "legacy.pt")
    common = ["--ckpt", str(tmp_path / "legacy.pt"), "--vae", str(assets / "vae"), "--num-fid-samples", "2",
              "--num-steps", "2"]
    with pytest.raises(ValueError, match="pass --legacy"):
        run(assets, tmp_path / "x", *common)
    with pytest.raises(ValueError, match="--encoder-depth 8 but the checkpoint has 2"):
        run(assets, tmp_path / "x", *common, "--legacy", "--encoder-depth", "8")
    a = run(assets, tmp_path / "legacy", *common, "--legacy")
    b = run(assets, tmp_path / "ours", "--num-fid-samples", "2", "--num-steps", "2")
    with np.load(a["npz"]) as x, np.load(b["npz"]) as y:
        assert np.array_equal(x["arr_0"], y["arr_0"])
