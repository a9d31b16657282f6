"""Sample images from a trained SiT / REG model for FID: PNGs plus an ADM-format .npz.

    # one process (GPU if there is one, else CPU)
    python generate.py --ckpt exps/NAME/checkpoints/0400000.pt --num-fid-samples 50000
    # several GPUs / nodes: torchrun or accelerate launch (they set RANK, WORLD_SIZE, LOCAL_RANK)
    torchrun --nproc_per_node 8 generate.py --ckpt hf:Martinser/REG --mode sde --num-steps 250 \\
        --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85

Reproducibility: image i depends only on (--global-seed, i) and the sampling settings, never on
the batch size, GPU count or which process drew it. Its class comes from a generator seeded with
SeedSequence([global_seed, i, 1]) (or is i mod num_classes with --balanced), and all of its noise
(initial latents, initial class token, then every SDE step's noise) from one CPU torch.Generator
seeded with SeedSequence([global_seed, i, 0]) (see samplers.py for the draw order). Labels and
noise are therefore exact. The network's fp32 output can still differ in the last bit between
batch sizes, because matmul kernels are chosen by shape; after 8-bit quantisation that very
rarely moves a pixel value by 1 (about one pixel in 10^4-10^5 in our CPU tests), which FID cannot
see. With --precision fp64 the last-bit differences (~1e-16) cannot reach 8 bits, so the PNGs and
the npz are byte-identical in practice across batch sizes and process counts
(tests/test_generate.py checks batch sizes 2 and 4; 1 vs 2 processes was checked by hand).

Output, under --sample-dir:
    RUN/000000.png ...       one PNG per image; a re-run skips the PNGs already there (preemption)
    RUN/settings.json        the settings the PNGs were made with; a re-run with others is refused
    RUN.npz                  arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,), in index order
    RUN.json                 the exact settings, the checkpoint config and the throughput
    RUN-grid.png             with --grid N: the first N images in a grid
RUN is --run-name, by default built from the model, checkpoint and sampling settings.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib import format as npy_format
from PIL import Image
from tqdm import tqdm

from checkpoint_io import OFFICIAL_HUB_REPO, atomic_json_dump, atomic_write, load_generator
from models.sit import Attention
from models.vae import load_vae
from samplers import euler_maruyama_sampler, euler_sampler, sample_noise

NOISE_STREAM, LABEL_STREAM = 0, 1
PNG_NAME = re.compile(r"^(\d{6,})\.png$")
# Settings that change the pixels of image i: a re-run into the same folder must match them.
SAMPLING_KEYS = ("model_config", "vae", "latents_scale", "mode", "num_steps", "heun", "cfg_scale",
                 "cls_cfg_scale", "guidance_low", "guidance_high", "path_type", "global_seed",
                 "balanced", "num_classes", "precision", "ema")


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument("--ckpt", type=str, default=f"hf:{OFFICIAL_HUB_REPO}",
                   help="our training .pt, our exported .safetensors, an official REG/REPA .pt, or "
                        "hf:OWNER/REPO[/FILE] (downloaded on first use)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample from the EMA weights (--no-ema: the raw training weights)")
    g.add_argument("--model", type=str, default=None,
                   help="e.g. SiT-XL/2; inferred from the checkpoint, checked if given")
    g.add_argument("--num-classes", type=int, default=None,
                   help="inferred from the label table (which holds num_classes + 1 rows)")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help="block after which the projectors run (not stored in official weights; "
                        "does not change the samples)")
    g.add_argument("--projector-embed-dims", type=str, default=None,
                   help="comma-separated encoder dims, e.g. 768; inferred, checked if given")
    g.add_argument("--cls", type=int, default=None,
                   help="class-token dimension (REG: 768); inferred, checked if given")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="inferred from the weights, checked if given")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="use SDPA attention kernels (default: the checkpoint's setting, else on)")
    g.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; inferred (latent side x VAE downsampling), checked if given")
    g.add_argument("--vae", type=str, default=None,
                   help="ema | mse | HF hub id | local AutoencoderKL dir | pixel-unshuffle "
                        "(default: the checkpoint's, else ema)")

    g = p.add_argument_group("sampler")
    g.add_argument("--mode", type=str, choices=["sde", "ode"], default="sde",
                   help="sde: Euler-Maruyama (the papers' numbers); ode: Euler/Heun probability flow")
    g.add_argument("--num-steps", type=int, default=250, help="sampler steps")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="Heun corrector (ode only)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; > 1 enables CFG")
    g.add_argument("--cls-cfg-scale", type=float, default=0.0,
                   help="CFG scale of the class token under CFG (REG); 0: its conditional drift only")
    g.add_argument("--guidance-low", "--guidance_low", type=float, default=0.0,
                   help="guide only while guidance_low <= t <= guidance_high (t = 1 is noise)")
    g.add_argument("--guidance-high", "--guidance_high", type=float, default=1.0)
    g.add_argument("--path-type", type=str, choices=["linear", "cosine"], default=None,
                   help="interpolant (default: the checkpoint's, else linear)")

    g = p.add_argument_group("sampling run")
    g.add_argument("--num-fid-samples", type=int, default=50_000, help="number of images")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="images per forward, per process")
    g.add_argument("--global-seed", type=int, default=0, help="image i depends only on (seed, i)")
    g.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=False,
                   help="class of image i = i mod num_classes (exactly N/num_classes per class) "
                        "instead of uniformly random")
    g.add_argument("--sample-dir", type=str, default="samples", help="parent folder of the run folder")
    g.add_argument("--run-name", type=str, default=None, help="run folder name (default: from the settings)")
    g.add_argument("--grid", type=int, default=0, metavar="N", help="also write a grid PNG of the first N images")
    g.add_argument("--precision", type=str, choices=["fp32", "bf16", "fp64"], default="fp32",
                   help="model compute dtype (bf16 via autocast; fp64 runs model and VAE in float64, a slow "
                        "reference that is bit-stable across batch sizes); the sampler state is float64 always")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (worth it on GPU for 50K samples; the first batches compile)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 matmuls on Ampere+ GPUs (REPA's default)")
    g.add_argument("--device", type=str, default=None,
                   help="cpu | cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # set by torch.distributed.launch; LOCAL_RANK is used instead
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Per-image seeds and labels


def image_seed(global_seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """A 64-bit seed for image `index`: SeedSequence hashes (seed, index, stream), so seeds of
    nearby images or runs are unrelated (unlike global_seed + index)."""
    if global_seed < 0 or index < 0:
        raise ValueError(f"global seed and index must be >= 0, got {global_seed}, {index}")
    state = np.random.SeedSequence([global_seed, index, stream]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def image_generators(global_seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: its initial noise and all its SDE noise come from it."""
    return [torch.Generator().manual_seed(image_seed(global_seed, i, NOISE_STREAM)) for i in indices]


def class_labels(indices: list[int], *, global_seed: int, num_classes: int, balanced: bool) -> torch.Tensor:
    """Class of each image index: i mod num_classes if balanced, else uniform from its own seed."""
    if balanced:
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    labels = [torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        image_seed(global_seed, i, LABEL_STREAM))).item() for i in indices]
    return torch.tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_flag: str | None) -> DistInfo:
    """Plain torch.distributed from the env:// variables torchrun / accelerate launch set."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag is None:
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_flag)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, world_size=world_size, device=device)


# ----------------------------------------------------------------------------------------------
# Output files


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-")


def checkpoint_name(spec: str) -> str:
    if spec.startswith("hf:"):
        return sanitize(spec[3:])
    return sanitize(Path(spec).stem)


def default_run_name(args: argparse.Namespace, config: dict, vae: str) -> str:
    """REG-style folder name: model, checkpoint, size, VAE, guidance, seed, sampler."""
    vae_name = Path(vae).name if os.path.isdir(vae) else vae.split("/")[-1]
    parts = [config["model"].replace("/", "-"), checkpoint_name(args.ckpt), f"size-{config['resolution']}",
             f"vae-{vae_name}", f"cfg-{args.cfg_scale}", f"clscfg-{args.cls_cfg_scale}",
             f"gl-{args.guidance_low}", f"gh-{args.guidance_high}", f"seed-{args.global_seed}",
             f"{args.mode}-{args.num_steps}"]
    if args.mode == "ode" and args.heun:
        parts.append("heun")
    if args.path_type not in (None, "linear"):
        parts.append(args.path_type)
    if args.balanced:
        parts.append("balanced")
    if args.precision != "fp32":
        parts.append(args.precision)
    if not args.ema:
        parts.append("raw")
    return sanitize("-".join(parts))


def finished_indices(run_dir: Path) -> set[int]:
    return {int(m.group(1)) for name in os.listdir(run_dir) if (m := PNG_NAME.match(name))}


def png_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"{index:06d}.png"


def save_png(image: np.ndarray, path: Path) -> None:
    """Write-then-rename, so a preempted job never leaves a truncated PNG that a re-run would skip."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), truncating as REPA/REG/ADM do."""
    images = torch.clamp(255.0 * ((images.float() + 1) / 2), 0, 255)
    return images.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def write_npz(path: str | os.PathLike, run_dir: Path, num: int, labels: np.ndarray) -> tuple[int, ...]:
    """Stream the ADM .npz from the PNGs: arr_0 uint8 (N, H, W, 3), arr_1 int64 labels.

    Written image by image (50K 256px images are 9.8 GB; nothing is held in memory), with fixed
    zip timestamps: np.savez stamps the current time, which would make equal samples give
    different files. The result loads with np.load like any npz.
    """
    first = read_png(png_path(run_dir, 0))
    shape = (num, *first.shape)

    def member(zf: zipfile.ZipFile, name: str):
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        return zf.open(info, "w", force_zip64=True)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with member(zf, "arr_0.npy") as f:
                npy_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in tqdm(range(num), desc="packing npz", leave=False):
                    image = read_png(png_path(run_dir, i))
                    if image.shape != shape[1:]:
                        raise ValueError(f"{png_path(run_dir, i)} has shape {image.shape}, expected {shape[1:]}")
                    f.write(np.ascontiguousarray(image).tobytes())
            with member(zf, "arr_1.npy") as f:
                npy_format.write_array(f, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(path, write)
    return shape


def save_grid(run_dir: Path, num: int, path: Path) -> None:
    images = [read_png(png_path(run_dir, i)) for i in range(num)]
    cols = math.ceil(math.sqrt(num))
    rows = math.ceil(num / cols)
    h, w, _ = images[0].shape
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------------------------
# Model and codec


def load_model(args: argparse.Namespace, device: torch.device):
    """load_generator + the checks of the flags that the checkpoint itself determines."""
    spec = args.ckpt
    if spec == OFFICIAL_HUB_REPO and not os.path.exists(spec):
        spec = f"hf:{spec}"
    overrides = {"model": args.model, "encoder_depth": args.encoder_depth, "qk_norm": args.qk_norm,
                 "fused_attn": args.fused_attn, "num_classes": args.num_classes, "path_type": args.path_type}
    model, config = load_generator(spec, use_ema=args.ema, overrides=overrides, device=device)

    def check(flag, given, actual):
        if given is not None and given != actual:
            raise ValueError(f"{flag} {given} does not match the checkpoint {args.ckpt} ({actual})")

    check("--model", args.model, config["model"])
    check("--num-classes", args.num_classes, model.num_classes)
    check("--qk-norm", args.qk_norm, config["qk_norm"])
    check("--cls", args.cls, model.cls_dim)
    if args.projector_embed_dims is not None:
        check("--projector-embed-dims", [int(z) for z in args.projector_embed_dims.split(",")], list(model.z_dims))
    if args.fused_attn is not None:  # a runtime choice: the flag wins over the checkpoint's setting
        for module in model.modules():
            if isinstance(module, Attention):
                module.fused_attn = args.fused_attn
    if args.path_type is not None and args.path_type != config.get("path_type", "linear"):
        warnings.warn(f"--path-type {args.path_type} differs from the checkpoint's {config.get('path_type')}")
    return model.eval().requires_grad_(False), config


def build_settings(args, config, model, vae_spec, latents_scale, world_size) -> dict:
    sampling = {
        "model_config": config, "vae": vae_spec, "latents_scale": latents_scale,
        "mode": args.mode, "num_steps": args.num_steps, "heun": bool(args.heun and args.mode == "ode"),
        "cfg_scale": args.cfg_scale, "cls_cfg_scale": args.cls_cfg_scale,
        "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
        "path_type": args.path_type or config.get("path_type", "linear"),
        "global_seed": args.global_seed, "balanced": args.balanced, "num_classes": model.num_classes,
        "precision": args.precision, "ema": args.ema,
    }
    return {
        **sampling,
        "ckpt": args.ckpt if args.ckpt.startswith("hf:") else os.path.abspath(args.ckpt),
        "num_fid_samples": args.num_fid_samples,
        "per_proc_batch_size": args.per_proc_batch_size, "world_size": world_size,
        "tf32": args.tf32, "torch_version": torch.__version__,
        "seeding": "image i: class from torch.Generator(SeedSequence([global_seed, i, 1])) "
                   "(i mod num_classes if balanced); noise from torch.Generator(SeedSequence([global_seed, i, 0])): "
                   "initial latents, initial class token, then each SDE step's latent and class-token noise",
    }


def check_resumable(settings_path: Path, settings: dict) -> None:
    """A re-run may only add images made with the same settings."""
    old = json.loads(settings_path.read_text())
    differ = [k for k in SAMPLING_KEYS if json.dumps(old.get(k), sort_keys=True) != json.dumps(settings[k], sort_keys=True)]
    if differ:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in differ)
        raise ValueError(f"{settings_path.parent} holds samples made with other settings ({detail}); "
                         f"use another --run-name or --sample-dir")
    if old.get("ckpt") != settings["ckpt"]:
        warnings.warn(f"resuming {settings_path.parent}: checkpoint path changed from {old.get('ckpt')} "
                      f"to {settings['ckpt']}")


# ----------------------------------------------------------------------------------------------
# Main


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    """Generate the missing images of the run, then (rank 0) pack the npz. Returns a summary."""
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1 or args.num_steps < 1:
        raise ValueError("--num-fid-samples, --per-proc-batch-size and --num-steps must be >= 1")
    if args.global_seed < 0:
        raise ValueError(f"--global-seed must be >= 0, got {args.global_seed}")
    info = init_distributed(args.device)
    try:
        return _generate(args, info)
    finally:
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _generate(args: argparse.Namespace, info: DistInfo) -> dict:
    device = info.device
    precision = "tf32" if args.tf32 else "ieee"  # the fp32_precision API (legacy allow_tf32 must not be mixed in)
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision

    model, config = load_model(args, device)
    using_cfg = args.cfg_scale > 1.0
    if using_cfg and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise ValueError(f"{args.ckpt} has no null-label embedding (trained without label dropout): "
                         "classifier-free guidance is impossible, use --cfg-scale 1")
    if not using_cfg and args.cls_cfg_scale > 0 and info.is_main:
        warnings.warn("--cls-cfg-scale only acts under CFG (--cfg-scale > 1); ignored")
    if args.mode == "sde" and args.heun and info.is_main:
        warnings.warn("--heun only applies to --mode ode; ignored")
    if args.balanced and args.num_fid_samples % model.num_classes and info.is_main:
        warnings.warn(f"--balanced: {args.num_fid_samples} is not a multiple of {model.num_classes} classes; "
                      "class counts will differ by one")

    compute_dtype = torch.float64 if args.precision == "fp64" else torch.float32
    model.to(compute_dtype)
    if args.compile:  # two static graphs: batch N, and 2N on guided steps
        model = torch.compile(model, dynamic=False)
    vae_spec = args.vae or config.get("vae", "ema")
    codec = load_vae(vae_spec, device=device, dtype=compute_dtype)
    if codec.latent_channels != model.in_channels:
        raise ValueError(f"VAE {vae_spec!r} has {codec.latent_channels} latent channels but the model "
                         f"expects {model.in_channels}")
    resolution = model.input_size * codec.downsample
    if args.resolution is not None and args.resolution != resolution:
        raise ValueError(f"--resolution {args.resolution} does not match the checkpoint: latent side "
                         f"{model.input_size} x VAE downsampling {codec.downsample} = {resolution}")
    config = {**config, "resolution": resolution}
    latents_scale = float(config.get("latents_scale", codec.scaling_factor))
    path_type = args.path_type or config.get("path_type", "linear")

    run_name = args.run_name or default_run_name(args, config, vae_spec)
    run_dir = Path(args.sample_dir) / run_name
    settings = build_settings(args, config, model, vae_spec, latents_scale, info.world_size)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        settings_path = run_dir / "settings.json"
        if settings_path.exists():
            check_resumable(settings_path, settings)
        else:
            atomic_json_dump(settings, settings_path)
    info.barrier()
    # Every rank lists the folder before anyone writes, so all agree on the work to share out.
    done = finished_indices(run_dir)
    info.barrier()
    todo = [i for i in range(args.num_fid_samples) if i not in done]
    mine = todo[info.rank::info.world_size]
    if info.is_main:
        print(f"{run_dir}: {args.num_fid_samples - len(todo)} of {args.num_fid_samples} images already there, "
              f"{len(todo)} to make on {info.world_size} process(es); {config['model']}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device}")

    sampler_kwargs = dict(num_steps=args.num_steps, cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
                          guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=path_type)
    latent_shape = (model.in_channels, model.input_size, model.input_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"sampling {run_name}", disable=not info.is_main, dynamic_ncols=True)
    for b in range(0, len(mine), args.per_proc_batch_size):
        indices = mine[b:b + args.per_proc_batch_size]
        gens = image_generators(args.global_seed, indices)
        y = class_labels(indices, global_seed=args.global_seed, num_classes=model.num_classes,
                         balanced=args.balanced).to(device)
        # Initial noise is drawn in float32 whatever the precision, so all precisions share it.
        z = sample_noise((len(indices), *latent_shape), gens, device=device).to(compute_dtype)
        c = (sample_noise((len(indices), model.cls_dim), gens, device=device).to(compute_dtype)
             if model.use_cls_token else None)
        with autocast:
            if args.mode == "sde":
                latents, _ = euler_maruyama_sampler(model, z, y, cls_latents=c, generator=gens, **sampler_kwargs)
            else:
                latents, _ = euler_sampler(model, z, y, cls_latents=c, heun=args.heun, **sampler_kwargs)
        images = to_uint8(codec.decode(latents.to(compute_dtype) / latents_scale))
        for index, image in zip(indices, images):
            save_png(image, png_path(run_dir, index))
        bar.update(len(indices))
    bar.close()
    info.barrier()
    elapsed = time.perf_counter() - start

    summary = {"run_dir": str(run_dir), "generated": len(todo), "seconds": elapsed,
               "images_per_second": len(todo) / elapsed if todo else 0.0}
    if info.is_main:
        missing = [i for i in range(args.num_fid_samples) if not png_path(run_dir, i).exists()]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing in {run_dir} after sampling, e.g. {missing[:5]}")
        labels = class_labels(list(range(args.num_fid_samples)), global_seed=args.global_seed,
                              num_classes=model.num_classes, balanced=args.balanced).numpy()
        npz_path = Path(args.sample_dir) / f"{run_name}.npz"
        shape = write_npz(npz_path, run_dir, args.num_fid_samples, labels)
        if args.grid:
            n = min(args.grid, args.num_fid_samples)
            save_grid(run_dir, n, Path(args.sample_dir) / f"{run_name}-grid.png")
        summary.update(npz=str(npz_path), shape=list(shape))
        atomic_json_dump({**settings, "result": summary}, Path(args.sample_dir) / f"{run_name}.json")
        print(f"wrote {npz_path} {shape}; sampled {len(todo)} images in {elapsed:.1f} s: "
              f"{summary['images_per_second']:.2f} images/s ({info.world_size} process(es), decode and PNG included)")
    info.barrier()
    return summary


if __name__ == "__main__":
    main(parse_args())
