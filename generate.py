"""Sample images from a trained SiT / REG model for FID: PNGs plus an ADM-format .npz.

A drop-in for REG's generate.py: every flag of the original parses with the same meaning, and the
sample folder and npz are named as the original names them, so the original eval.sh finds them.

    # the original eval.sh's launcher (it passes --local-rank), torchrun, or one plain process (CPU too)
    python -m torch.distributed.launch --nproc_per_node=8 generate.py --ckpt exps/NAME/checkpoints/4000000.pt \\
        --mode=sde --num-steps=250 --cfg-scale=2.3 --cls-cfg-scale=2.3 --guidance-high=0.85
    torchrun --nproc_per_node 8 generate.py --ckpt hf:Martinser/REG --mode sde --num-steps 250 ...
    python generate.py --ckpt exps/NAME/checkpoints/ema_0400000.safetensors --num-fid-samples 1000

Image i depends only on (--global-seed, i) and the sampling settings, never on the batch size, GPU count or
process: docs/design.md#seeding.

Output, under --sample-dir (RUN = --run-name, by default the original's folder name
{model}-{ckpt}-size-{res}-vae-{vae}-cfg-{cfg}-seed-{seed}-{mode}-{guidance_high}-{cls_cfg}):
    RUN/000000.png ...       one PNG per image; a re-run skips the complete PNGs already there
    RUN/settings.json        settings and checkpoint identity; a re-run with others is refused
    RUN.npz                  arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,), in index order
    RUN.json                 the exact settings, the checkpoint config and the throughput
    RUN-grid.png             with --grid N: the first N images in a grid; with --class-labels, one labelled
                             row per class holding its first N images (reg/class_grid.py)
The last line printed is `NPZ_PATH=/absolute/RUN.npz`; --npz-path-file FILE also writes that path.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from numpy.lib import format as npy_format
from tqdm import tqdm

from models.sit import SiT_models
from reg import folder_lock, processes, stop_signals
from reg.checkpoints import CheckpointError, pin_checkpoint, unpin_checkpoint
from reg.class_grid import grid_rows, labelled_grid, parse_class_labels, read_class_names, row_label
from reg.hub import OFFICIAL_HUB_REPO, is_repo_id, resolve_checkpoint
from reg.loading import LoadedGenerator, load_generator
from reg.run_identity import check_same_settings, checkpoint_identity
from reg.seeded_images import autocast_dtype, class_labels, generate_images
from reg.utils import (ArgumentParser, HelpFormatter, UserError, atomic_json_dump, atomic_write, atomic_write_bytes,
                       clean_stale_tmp, finite_float, run_main, set_fp32_precision)
from samplers import SAMPLER_MODES

PNG_NAME = re.compile(r"^(\d{6,})\.png$")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # every complete PNG ends with this IEND chunk
# Settings that change the pixels of image i: a re-run into the same folder must match them.
SAMPLING_KEYS = ("checkpoint", "model_config", "vae", "latents_scale", "mode", "num_steps", "heun", "cfg_scale",
                 "cls_cfg_scale", "guidance_low", "guidance_high", "path_type", "global_seed",
                 "balanced", "num_classes", "precision", "ema", "tf32", "class_labels")


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The original generate.py's flags (same names and meanings), plus ours."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    _model_flags(p.add_argument_group("model (sizes are read from the checkpoint; these flags are only checked)"))
    _sampler_flags(p.add_argument_group("sampler"))
    _run_flags(p.add_argument_group("sampling run"))
    return p.parse_args(argv)


def _model_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--ckpt", type=str, default=f"hf:{OFFICIAL_HUB_REPO}",
                   help="our training .pt, our exported .safetensors, an official REG/REPA .pt, a Hub folder "
                        "(config.json + model.safetensors: python -m reg.export), a Hub repo id OWNER/NAME "
                        "(when no such local path exists), or hf:OWNER/REPO[/FILE] (from the HF cache, downloaded "
                        "on first use)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample from the EMA weights (--no-ema: the raw training weights)")
    g.add_argument("--model", type=str, choices=list(SiT_models), default=None, metavar="NAME",
                   help="e.g. SiT-XL/2; inferred from the checkpoint, checked if given")
    g.add_argument("--num-classes", type=int, default=None,
                   help="inferred from the label table (num_classes + 1 rows), checked if given")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help="block after which the projectors run (default: the checkpoint's, else 8); does not "
                        "change the samples")
    g.add_argument("--projector-embed-dims", type=_int_list, default=None,
                   help="comma-separated encoder dims, e.g. 768; inferred, checked if given")
    g.add_argument("--cls", type=int, default=None,
                   help="class-token dimension (REG: 768); inferred, checked if given (ignored without a class token)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="inferred from the weights, checked if given")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's old checkpoints: rename decoder_blocks.{j} to blocks.{j + encoder depth}")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="SDPA attention kernels (default: the checkpoint's setting, else on)")
    g.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; inferred (latent side x VAE downsampling), checked if given")
    g.add_argument("--vae", type=str, default=None,
                   help="ema | mse | HF hub id | local AutoencoderKL dir | pixel-unshuffle "
                        "(default: ema, as the original, for SD-VAE latents; the checkpoint's own codec otherwise)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(z) for z in text.split(",") if z.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _sampler_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--mode", type=str, choices=list(SAMPLER_MODES), default="sde",
                   help="sde: Euler-Maruyama (the papers' numbers); ode: Euler/Heun probability flow; "
                        "dpm2m: DPM-Solver++(2M); unipc: DPM-Solver++(2M) + UniPC corrector, the fewest "
                        "evaluations for a given accuracy (docs/sampling.md); all ODE modes: one evaluation per "
                        "step (Heun: two)")
    g.add_argument("--num-steps", type=int, default=50, help="sampler steps (the paper: 250)")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="Heun corrector (ode only)")
    g.add_argument("--cfg-scale", type=finite_float(0), default=1.5,
                   help="classifier-free guidance scale; > 1 enables CFG (the paper: 2.3)")
    g.add_argument("--cls-cfg-scale", type=finite_float(0), default=1.5,
                   help="CFG scale of the class token under CFG (REG); 0: its conditional drift only")
    g.add_argument("--guidance-low", "--guidance_low", type=finite_float(0, 1), default=0.0,
                   help="guide only while guidance_low <= t <= guidance_high (t = 1 is noise)")
    g.add_argument("--guidance-high", "--guidance_high", type=finite_float(0, 1), default=1.0,
                   help="upper end of the guidance interval (the paper: 0.85)")
    g.add_argument("--path-type", type=str, choices=["linear", "cosine"], default=None,
                   help="interpolant (default: the checkpoint's, else linear)")


def _run_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--num-fid-samples", type=int, default=50_000, help="number of images")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="images per forward, per process")
    g.add_argument("--global-seed", type=int, default=0, help="image i depends only on (seed, i)")
    g.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=False,
                   help="class of image i = i mod num_classes (exactly N/num_classes per class) "
                        "instead of uniformly random")
    g.add_argument("--sample-dir", type=str, default="samples", help="parent folder of the run folder")
    g.add_argument("--run-name", type=str, default=None, help="run folder name (default: the original's name)")
    g.add_argument("--npz-path-file", type=str, default=None, metavar="FILE",
                   help="also write the path of the npz written into FILE (eval.sh reads it)")
    g.add_argument("--grid", type=int, default=0, metavar="N",
                   help="also write a grid PNG of the first N images; with --class-labels a labelled figure, "
                        "one row per listed class holding its first N images")
    g.add_argument("--class-labels", type=str, default=None, metavar="LIST|@FILE",
                   help="sample these classes: comma-separated indices (e.g. 1,207,360) or @FILE with one per "
                        "line; image i gets label[i mod len], its noise still comes from (seed, i)")
    g.add_argument("--class-names", type=str, default=None, metavar="FILE",
                   help="with --class-labels and --grid: row labels 'index: name', line k of FILE naming class k")
    g.add_argument("--precision", type=str, choices=["fp32", "bf16", "fp64"], default="fp32",
                   help="model compute dtype (bf16 via autocast; fp64 runs model and VAE in float64, a slow "
                        "reference that is bit-stable across batch sizes); the sampler state is float64 always")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (worth it on GPU for 50K samples; the first batches compile)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 matmuls on Ampere+ GPUs (the original's default)")
    g.add_argument("--device", type=str, default=None,
                   help="cpu | cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    g.add_argument("--local-rank", "--local_rank", type=int, default=-1,
                   help="set by torch.distributed.launch; the LOCAL_RANK variable, when set, wins")


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot be meant (before any model is loaded)."""
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1 or args.num_steps < 1:
        raise UserError("--num-fid-samples, --per-proc-batch-size and --num-steps must be >= 1")
    if args.global_seed < 0:
        raise UserError(f"--global-seed must be >= 0, got {args.global_seed}")
    if args.cfg_scale < 0 or args.cls_cfg_scale < 0:
        raise UserError(f"--cfg-scale {args.cfg_scale} and --cls-cfg-scale {args.cls_cfg_scale} must be >= 0")
    if args.guidance_low > args.guidance_high:
        raise UserError(f"--guidance-low {args.guidance_low} > --guidance-high {args.guidance_high}: "
                        "no step would be guided")
    if args.class_labels is not None:
        parse_class_labels(args.class_labels)  # syntax only; the range is checked against the model
        if args.balanced:
            raise UserError("--class-labels and --balanced both choose the classes: give one of them")
    elif args.class_names is not None:
        raise UserError("--class-names labels the rows of the --class-labels grid: give --class-labels too")
    # the flags only used at the end, after all sampling, are checked now: a mistake must not cost the run
    if args.grid < 0:
        raise UserError(f"--grid must be >= 0 (0: no grid), got {args.grid}")
    if args.class_names is not None:
        read_class_names(args.class_names)  # exists and readable
    if args.npz_path_file is not None and os.path.isdir(args.npz_path_file):
        raise UserError(f"--npz-path-file {args.npz_path_file} is a folder; give a file name")
    if args.run_name is not None and (not args.run_name.strip() or args.run_name in (".", "..")):
        raise UserError(f"--run-name {args.run_name!r} is not a folder name")


# ----------------------------------------------------------------------------------------------
# Output files


def checkpoint_name(spec: str) -> str:
    """The original's `os.path.basename(ckpt).replace(".pt", "")`; hub files by their file name; Hub folders
    by their last component. A bare repo id OWNER/NAME is named as hf:OWNER/NAME (reg.hub.is_repo_id)."""
    if spec.startswith("hf:") or is_repo_id(spec):
        path = resolve_checkpoint(spec)
        name = spec.rstrip("/").split("/")[-1] if path.is_dir() else path.name
    else:  # a local file or folder: its last component
        name = os.path.basename(os.path.normpath(spec))
    if name.endswith(".safetensors"):
        return name[:-len(".safetensors")]
    return name.replace(".pt", "")


def vae_name(vae: str) -> str:
    """ema / mse as the original writes them; the folder or hub name otherwise."""
    match = re.fullmatch(r"stabilityai/sd-vae-ft-(\w+)", vae)
    if match:
        return match.group(1)
    return Path(vae).name if os.path.isdir(vae) else vae.split("/")[-1]


def default_run_name(args: argparse.Namespace, model_name: str, resolution: int, vae: str) -> str:
    """The original's folder name; our own flags (not in the original) add a suffix when set."""
    name = (f"{model_name.replace('/', '-')}-{checkpoint_name(args.ckpt)}-size-{resolution}-vae-{vae_name(vae)}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.mode}-{args.guidance_high}-{args.cls_cfg_scale}")
    suffixes = [("balanced", args.balanced), (args.precision, args.precision != "fp32"), ("raw", not args.ema)]
    if args.class_labels is not None:  # another list of classes is another run
        digest = hashlib.sha1(args.class_labels.encode()).hexdigest()[:8]
        suffixes.append((f"classes-{digest}", True))
    return name + "".join(f"-{s}" for s, on in suffixes if on)


def png_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"{index:06d}.png"


def png_complete(path: Path) -> bool:
    """A cheap completeness check: a PNG cut short (killed writer, full disk) lacks the IEND chunk."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 57:  # signature + IHDR + IEND
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:
        return False


def finished_indices(run_dir: Path) -> set[int]:
    return {int(m.group(1)) for name in os.listdir(run_dir) if (m := PNG_NAME.match(name))}


def remove_incomplete_pngs(run_dir: Path) -> list[int]:
    """Delete truncated PNGs (so they are generated again); returns their indices."""
    bad = [i for i in sorted(finished_indices(run_dir)) if not png_complete(png_path(run_dir, i))]
    for i in bad:
        png_path(run_dir, i).unlink(missing_ok=True)
    return bad


def save_png(image: np.ndarray, path: Path) -> None:
    """Atomic (write then rename), so a preempted job never leaves a truncated PNG."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), fsync=False)


class UnreadablePNGs(RuntimeError):
    """PNGs of the run folder that cannot be decoded (corrupted on disk); generate.py makes them again."""

    def __init__(self, indices: list[int], detail: str):
        super().__init__(f"{len(indices)} unreadable PNG(s), e.g. {detail}")
        self.indices = indices


def read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, ValueError or SyntaxError for damaged files
        raise RuntimeError(f"cannot read {path} ({type(e).__name__}: {e}); delete it and rerun the same "
                           f"command to generate it again") from e


def write_npz(path: str | os.PathLike, run_dir: Path, num: int, labels: np.ndarray) -> tuple[int, ...]:
    """Stream the ADM .npz from the PNGs: arr_0 uint8 (N, H, W, 3), arr_1 int64 labels.

    Written image by image (50K 256px images are 9.8 GB; nothing is held in memory), with fixed
    zip timestamps: np.savez stamps the current time, which would make equal samples give
    different files. The result loads with np.load like any npz. Unreadable PNGs are all listed
    in one UnreadablePNGs error (and no npz is left behind).
    """
    first = None
    for i in range(num):  # the shape of the first readable image
        try:
            first = read_png(png_path(run_dir, i))
            break
        except RuntimeError as e:
            reason = str(e)
    if first is None:
        raise UnreadablePNGs(list(range(num)), reason)
    shape = (num, *first.shape)
    bad: list[int] = []
    details: list[str] = []

    def member(zf: zipfile.ZipFile, name: str):
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        return zf.open(info, "w", force_zip64=True)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with member(zf, "arr_0.npy") as f:
                npy_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in tqdm(range(num), desc="packing npz", leave=False):
                    try:
                        image = read_png(png_path(run_dir, i))
                    except RuntimeError as e:
                        bad.append(i)
                        details.append(str(e))
                        image = np.zeros(shape[1:], dtype=np.uint8)  # keep streaming; the file is discarded
                    if image.shape != shape[1:]:
                        raise UserError(f"{png_path(run_dir, i)} has shape {image.shape}, expected {shape[1:]}")
                    f.write(np.ascontiguousarray(image).tobytes())
                if bad:
                    raise UnreadablePNGs(bad, details[0])
            with member(zf, "arr_1.npy") as f:
                npy_format.write_array(f, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(path, write)
    return shape


def save_grid(run_dir: Path, num: int, path: Path) -> None:
    from torchvision.utils import make_grid, save_image
    images = torch.stack([torch.tensor(read_png(png_path(run_dir, i))) for i in range(num)])
    grid = make_grid(images.permute(0, 3, 1, 2).float() / 255, nrow=math.ceil(math.sqrt(num)), padding=0)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


# ----------------------------------------------------------------------------------------------
# Model, settings, resume


def loader_flags(args: argparse.Namespace) -> dict:
    """reg.loading.load_generator's arguments from the flags: the ones that restate the checkpoint are checked
    (`expect`), the runtime ones win over its metadata (`overrides`)."""
    expect = {"model": args.model, "num_classes": args.num_classes, "qk_norm": args.qk_norm,
              "cls_token_dim": args.cls, "z_dims": args.projector_embed_dims, "encoder_depth": args.encoder_depth}
    overrides = {"fused_attn": args.fused_attn, "path_type": args.path_type}
    return dict(use_ema=args.ema, legacy=args.legacy, precision=args.precision, vae=args.vae, expect=expect,
                overrides=overrides)


def save_class_grid(run_dir: Path, labels: list[int], num: int, per_row: int, names_file: str | None,
                    path: Path) -> None:
    """The labelled figure of --grid with --class-labels: a row per class (reg/class_grid.py)."""
    names = read_class_names(names_file) if names_file else None
    rows = [(row_label(y, names), [read_png(png_path(run_dir, i)) for i in idx])
            for y, idx in grid_rows(labels, num, per_row).items() if idx]
    atomic_write(path, lambda tmp: labelled_grid(rows).save(tmp, format="PNG"))


def build_settings(args, config, model, vae_spec, latents_scale, world_size, identity: dict) -> dict:
    sampling = {
        "checkpoint": {k: identity[k] for k in ("path", "size", "mtime_ns", "sha256_first_mib")},
        "model_config": config, "vae": vae_spec, "latents_scale": latents_scale,
        "mode": args.mode, "num_steps": args.num_steps, "heun": bool(args.heun and args.mode == "ode"),
        "cfg_scale": args.cfg_scale, "cls_cfg_scale": args.cls_cfg_scale,
        "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
        "path_type": config["path_type"], "global_seed": args.global_seed, "balanced": args.balanced,
        "num_classes": model.num_classes, "precision": args.precision, "ema": args.ema,
        "class_labels": args.label_list,
    }
    return {
        **sampling,
        "ckpt": args.ckpt,
        "num_fid_samples": args.num_fid_samples,
        "per_proc_batch_size": args.per_proc_batch_size, "world_size": world_size,
        "tf32": args.tf32, "torch_version": torch.__version__,
        "seeding": "image i: class from torch.Generator(SeedSequence([global_seed, i, 1])) "
                   "(i mod num_classes if balanced); noise from torch.Generator(SeedSequence([global_seed, i, 0])): "
                   "initial latents, initial class token, then each SDE step's latent and class-token noise",
    }


def check_resumable(run_dir: Path, settings: dict) -> None:
    """A re-run may only add images made with the same settings and the same checkpoint file."""
    check_same_settings(run_dir / "settings.json", settings, SAMPLING_KEYS, holds_results=bool(finished_indices(run_dir)),
                        hint="use another --sample-dir or --run-name (the folder name does not show every setting)")


# ----------------------------------------------------------------------------------------------
# Main


@torch.no_grad()
@processes.command("generate.py", launcher="torchrun")
def main(args: argparse.Namespace) -> dict:
    """Generate the missing images of the run, then (rank 0) pack the npz. Returns a summary."""
    check_args(args)
    info = processes.init_distributed(args.device, args.local_rank)
    try:
        return _generate(args, info)
    finally:
        info.close()


@dataclass
class RunFiles:
    """The run's outputs under --sample-dir: the PNG folder and the npz, json and grid named after it."""

    sample_dir: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.sample_dir / self.name

    def beside(self, suffix: str) -> Path:
        return self.sample_dir / f"{self.name}{suffix}"


def _generate(args: argparse.Namespace, info: processes.DistInfo) -> dict:
    set_fp32_precision("tf32" if args.tf32 else "ieee")
    loaded = _load_checked(args, info)
    model, config = loaded.model, loaded.config
    run = RunFiles(Path(args.sample_dir),
                   args.run_name or default_run_name(args, config["model"], config["resolution"], loaded.vae_spec))
    settings = build_settings(args, config, model, loaded.vae_spec, loaded.latents_scale, info.world_size,
                              checkpoint_identity(args.ckpt))
    # One writer per sample folder (and the npz, json and grid named after it): the clean-up below then only
    # removes what a dead run left.
    folder_lock.hold_folder(run.dir, hint="choose another --sample-dir or --run-name", rank=info.rank,
                        world=info.world_size)
    info.main_first(lambda: _prepare_folder(run, settings))
    # Every rank lists the folder before anyone writes, so all agree on the work to share out.
    done = finished_indices(run.dir)
    info.barrier()
    todo = [i for i in range(args.num_fid_samples) if i not in done]
    mine = todo[info.rank::info.world_size]
    if info.is_main:
        print(f"{run.dir}: {args.num_fid_samples - len(todo)} of {args.num_fid_samples} images already there, "
              f"{len(todo)} to make on {info.world_size} process(es); {config['model']}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, device {info.device}")

    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"sampling {run.name}", disable=not info.is_main, dynamic_ncols=True)
    gen_kwargs = dict(
        global_seed=args.global_seed, num_classes=model.num_classes, balanced=args.balanced,
        mode=args.mode, num_steps=args.num_steps, cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
        guidance_low=args.guidance_low, guidance_high=args.guidance_high, heun=args.heun,
        path_type=config["path_type"], latents_scale=loaded.latents_scale, batch_size=args.per_proc_batch_size,
        device=info.device, dtype=autocast_dtype(args.precision), label_list=args.label_list)

    def make(indices_to_make: list[int]) -> None:
        for indices, images, _ in generate_images(model, loaded.codec, indices_to_make, **gen_kwargs):
            for index, image in zip(indices, images.cpu().numpy()):
                save_png(image, png_path(run.dir, index))
            bar.update(len(indices))
            if stop_signals.stop_requested():  # a signal: this batch's PNGs are written; a rerun makes the rest
                break

    info.run_together(lambda: make(mine))  # a non-finite sample on one rank stops every rank
    bar.close()
    if stop_signals.any_rank_stopping(info.world_size):
        raise stop_signals.stopped(f"the PNGs in {run.dir} are complete, the npz is not written yet", is_main=info.is_main)
    info.barrier()
    elapsed = time.perf_counter() - start
    summary = {"run_dir": str(run.dir), "generated": len(todo), "seconds": elapsed,
               "images_per_second": len(todo) / elapsed if todo else 0.0, "guided": args.cfg_scale > 1.0}
    info.main_first(lambda: _pack(args, run, settings, summary, make, model.num_classes, info.world_size))
    return summary


def _load_checked(args: argparse.Namespace, info: processes.DistInfo) -> LoadedGenerator:
    """The model and its decoder, with the flags that need them checked; the config gains the resolution."""
    loaded = load_generator(args.ckpt, **loader_flags(args), device=info.device)
    model = loaded.model
    args.label_list = None if args.class_labels is None else parse_class_labels(args.class_labels, model.num_classes)
    if args.mode != "ode" and args.heun and info.is_main:
        warnings.warn("--heun only applies to --mode ode; ignored")
    if args.balanced and args.num_fid_samples % model.num_classes and info.is_main:
        warnings.warn(f"--balanced: {args.num_fid_samples} is not a multiple of {model.num_classes} classes; "
                      "class counts will differ by one")
    resolution = model.input_size * loaded.codec.downsample
    if args.resolution is not None and args.resolution != resolution:
        raise UserError(f"--resolution {args.resolution} does not match the checkpoint: latent side "
                        f"{model.input_size} x VAE downsampling {loaded.codec.downsample} = {resolution}")
    if args.compile:  # two static graphs: batch N, and 2N on guided steps
        model = torch.compile(model, dynamic=False)
    return loaded._replace(model=model, config={**loaded.config, "resolution": resolution})


def _prepare_folder(run: RunFiles, settings: dict) -> None:
    """Rank 0, before sampling: refuse other settings, record ours, remove what a killed run left half-written."""
    run.dir.mkdir(parents=True, exist_ok=True)
    check_resumable(run.dir, settings)
    atomic_json_dump(settings, run.dir / "settings.json")
    clean_stale_tmp(run.dir)  # PNGs half-written by a killed job
    clean_stale_tmp(run.sample_dir, run.beside(".npz").name)  # an npz half-packed by a killed job
    bad = remove_incomplete_pngs(run.dir)
    if bad:
        print(f"{run.dir}: {len(bad)} truncated PNG(s) removed, to be generated again: {bad[:10]}")
    pin_checkpoint(settings["ckpt"], run.dir, by="generate.py")  # kept from its run's pruning until the npz is written


def _pack(args: argparse.Namespace, run: RunFiles, settings: dict, summary: dict, make: Callable[[list[int]], None],
          num_classes: int, world_size: int) -> None:
    """Rank 0, after sampling: the npz (PNGs found damaged are made again with `make`), the grid, RUN.json."""
    num, npz_path = args.num_fid_samples, run.beside(".npz")
    missing = [i for i in range(num) if not png_path(run.dir, i).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} images missing in {run.dir} after sampling, e.g. {missing[:5]}")
    labels = class_labels(list(range(num)), global_seed=args.global_seed, num_classes=num_classes,
                          balanced=args.balanced, label_list=args.label_list).numpy()
    try:
        shape = write_npz(npz_path, run.dir, num, labels)
    except UnreadablePNGs as e:  # damaged on disk since they were written: make them again, here
        print(f"{run.dir}: {e}; generating {len(e.indices)} image(s) again", flush=True)
        for i in e.indices:
            png_path(run.dir, i).unlink(missing_ok=True)
        make(e.indices)
        shape = write_npz(npz_path, run.dir, num, labels)
    if args.grid and args.label_list:
        save_class_grid(run.dir, args.label_list, num, args.grid, args.class_names, run.beside("-grid.png"))
    elif args.grid:
        save_grid(run.dir, min(args.grid, num), run.beside("-grid.png"))
    summary.update(npz=str(npz_path), shape=list(shape))
    atomic_json_dump({**settings, "result": summary}, run.beside(".json"))
    if args.npz_path_file:
        atomic_write_bytes(args.npz_path_file, f"{npz_path.resolve()}\n".encode())
    print(f"wrote {npz_path} {shape}; sampled {summary['generated']} images in {summary['seconds']:.1f} s: "
          f"{summary['images_per_second']:.2f} images/s ({world_size} process(es), decode and PNG included)")
    unpin_checkpoint(settings["ckpt"], run.dir)
    print(f"NPZ_PATH={npz_path.resolve()}", flush=True)


if __name__ == "__main__":
    run_main(main, parse_args, user_errors=(CheckpointError,))
