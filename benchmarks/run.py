"""Speed benchmarks for REG, each measured against a baseline in the same run (issue 8).

    python -m benchmarks.run                                  # full run on the GPU (both models, all sections)
    python -m benchmarks.run --quick                          # reduced sizes; automatic on CPU (~30 s)
    python -m benchmarks.run --sections train --models SiT-XL/2 --out xl.json

Three sections, each a table with a speed-up column (optimised / baseline):

1. train:  one REG training step (DINOv2 in the step) at the paper's per-device batch (256 / 8 GPUs = 32).
   baseline  = what the original code does per step, minus fp16: fp32 eager, default (non-fused) AdamW,
               EMA in a Python loop over parameter names, `.item()` of every loss term every step.
   optimised = train.py's path, built from the same pieces (`reg_loss`, `encoder_targets`,
               `train.ema_update`): bf16 autocast (GPU), torch.compile of model and encoder, fused AdamW,
               foreach EMA, flash SDPA, no per-step logging sync (only train.py's one finite-check).
   Also: peak memory, model FLOPs per image (counted with FlopCounterMode on a meta-device copy), the
   achieved TFLOP/s and the MFU against the GPU's dense bf16 peak.
2. sample: the 250-step Euler-Maruyama SDE with CFG 2.3 / class-token CFG 2.3 / guidance interval t <= 0.85,
   eager fp32 (generate.py's default) vs the torch.compile'd model (bf16 autocast on GPU).
3. eval:   Inception-v3 features (images/s; ADM's synchronous batches of 64 vs the evaluator's prefetching
   reader), and precision/recall on 50K samples x 10K references (ADM's host-side k-NN vs the evaluator's).

Timings are printed (and written as JSON with --out), never asserted. Weights are random: the speed of a
network does not depend on its weights. On the GPU every timed block ends with torch.cuda.synchronize().
On a CPU the run is the --quick one, eager (as train.py there), on one thread: it exists so that the
script cannot rot, and its timings are indicative only. DDP's unused-parameter search is a multi-GPU
cost and does not show on one device; both paths here run the bare model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from evaluations.evaluator import (NpzImageReader, build_inception, extract_features, ieee_fp32, precision_recall,
                                   squared_distances)
from loss import LossOutput, encoder_targets, reg_loss, sample_latents
from models.encoders import ENCODERS, VisionEncoder, load_encoders, parse_enc_type
from models.sit import SiT, build_model, parse_model_name
from samplers import euler_maruyama_sampler
from train import ema_update

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the CUDA device name.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("RTX 4090", 165.0), ("L4", 121.0),
]

# Settings of the paper's recipe that the step needs (SPEC, "Training setup").
LR, BETAS, EPS, MAX_GRAD_NORM, EMA_DECAY = 1e-4, (0.9, 0.999), 1e-8, 1.0, 0.9999
PROJ_COEFF, CLS_COEFF = 0.5, 0.03
CFG_SCALE, CLS_CFG_SCALE, GUIDANCE_HIGH = 2.3, 2.3, 0.85
ADM_EVAL_BATCH = 64  # ADM's evaluator feeds Inception 64 images at a time

# Sizes per mode; a flag given on the command line wins over both.
FULL = dict(models="SiT-B/2,SiT-XL/2", batch_size=32, resolution=256, enc_type="dinov2-vit-b", warmup=3, steps=20,
            repeats=1,
            sample_model="SiT-XL/2", sample_batch=256, sample_steps=250, eval_images=2000, eval_batch=100,
            eval_resolution=256, pr_samples=50_000, pr_refs=10_000, pr_block=10_000)
QUICK = dict(models="SiT-T/2", batch_size=8, resolution=32, enc_type="dinov2-vit-s", warmup=2, steps=2, repeats=3,
             sample_model="SiT-T/2", sample_batch=8, sample_steps=10, eval_images=8, eval_batch=4,
             eval_resolution=64, pr_samples=2000, pr_refs=1000, pr_block=500)
SECTIONS = ("train", "sample", "eval")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--quick", action="store_true",
                   help="reduced sizes (SiT-T/2 at 32 px, few steps) that finish in well under 2 minutes on a "
                        "2-core CPU; automatic on CPU")
    g.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    g.add_argument("--out", default=None, help="also write every figure as JSON here")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads; 0 = torch's default. Default on CPU: 1, because on a shared "
                        "machine more threads than free cores make OpenMP barriers wait and timings erratic "
                        "(10x swings seen on a busy 2-core box)")

    g = p.add_argument_group("optimised path (each optimisation is a flag; defaults follow train.py)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="autocast dtype of the optimised training step and sampler (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and encoder (training) and the model (sampling). Default: on "
                        "GPU only, as train.py (on a 2-core CPU inductor's first, uncached compile of even the "
                        "tiny sampler graphs takes ~100 s)")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend; 'eager' / 'aot_eager' only trace (for tests, no speed-up)")
    g.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode")
    g.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="fused AdamW in the optimised step (default: on GPU, as train.py)")
    g.add_argument("--flash", action=argparse.BooleanOptionalAction, default=True,
                   help="restrict SDPA to the flash / memory-efficient kernels on GPU")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="TF32 matmuls in both training paths (train.py's --allow-tf32 default: off)")

    g = p.add_argument_group("training step")
    g.add_argument("--models", default=None, help=f"comma-separated (full: {FULL['models']}; quick: {QUICK['models']})")
    g.add_argument("--batch-size", type=int, default=None, help="per-device batch (full: 32 = 256 / 8 GPUs)")
    g.add_argument("--resolution", type=int, default=None, help="image side in pixels (full: 256)")
    g.add_argument("--enc-type", default=None, help="encoder in the step, random weights (full: dinov2-vit-b)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed blocks per figure; the fastest counts (others only lose time to other processes)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for the MFU (default: looked up from the GPU name)")

    g = p.add_argument_group("sampling")
    g.add_argument("--sample-model", default=None, help="model for the sampler benchmark (full: SiT-XL/2)")
    g.add_argument("--sample-batch", type=int, default=None,
                   help="images per sampler call (CFG doubles the forward batch); full: 256")
    g.add_argument("--sample-steps", type=int, default=None, help="SDE steps (full: 250)")

    g = p.add_argument_group("evaluator")
    g.add_argument("--eval-images", type=int, default=None, help="images through Inception per path")
    g.add_argument("--eval-batch", type=int, default=None, help="the evaluator's Inception batch (its default: 100)")
    g.add_argument("--eval-resolution", type=int, default=None, help="side of the (random) sample images")
    g.add_argument("--pr-samples", type=int, default=None, help="precision/recall: sample features (full: 50000)")
    g.add_argument("--pr-refs", type=int, default=None, help="precision/recall: reference features (full: 10000)")
    g.add_argument("--pr-block", type=int, default=None, help="distance block size (ADM: 10000)")

    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        finalise_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def finalise_args(args: argparse.Namespace) -> None:
    """Fill the per-device / per-mode defaults and check the values."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.device == "cpu":
        args.quick = True  # the full sizes would take hours on a CPU
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.fused_adamw = cuda if args.fused_adamw is None else args.fused_adamw
    args.threads = (0 if cuda else 1) if args.threads is None else args.threads
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    args.compile_train = cuda if args.compile is None else args.compile
    args.compile_sample = cuda if args.compile is None else args.compile
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        raise ValueError(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in [*args.models, args.sample_model]:
        model_size(name)
    parse_enc_type(args.enc_type)
    if args.resolution <= 0 or args.resolution % 16:
        raise ValueError(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    for key in ("batch_size", "steps", "repeats", "sample_batch", "sample_steps", "eval_images", "eval_batch",
                "eval_resolution", "pr_block"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 1:
        raise ValueError("--warmup must be >= 1: the first step (compilation, allocator) is never timed")
    if min(args.pr_samples, args.pr_refs) < 4:
        raise ValueError("precision/recall with k=3 needs >= 4 features per set")


def model_size(name: str) -> str:
    """'SiT-XL/2' -> 'XL', with a clear error for names outside the registry."""
    return parse_model_name(name)[0]


def encoder_depth_for(name: str) -> int:
    """REG's alignment depth: 4 for S/B (and the tiny T), 8 for L/XL (SPEC)."""
    return 8 if model_size(name) in ("L", "XL") else 4


# ----------------------------------------------------------------------------------------------
# Timing, memory, FLOPs
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock reads the time the work took, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], object], *, warmup: int, iters: int, device: torch.device,
               repeats: int = 1) -> tuple[float, float]:
    """(warm-up seconds, seconds per timed call).

    The timed calls run back to back with one synchronize at the end of a block, so host/device
    overlap between calls counts, as in a real loop. Of `repeats` blocks the fastest counts: on a
    shared machine other processes can only make a block slower.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    warm = time.perf_counter() - t0
    best = math.inf
    for _ in range(repeats):
        t1 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - t1) / iters)
    return warm, best


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_gib(device: torch.device) -> float | None:
    """CUDA: peak allocated tensor memory. CPU: the process's peak RSS (Linux only, else None)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_tflops_for(gpu_name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) of a GPU from its CUDA name, e.g. 'NVIDIA H100 80GB HBM3' -> 989."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in gpu_name), None)


def lookup_peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The dense bf16 peak of this device (TFLOP/s); None when unknown (then no MFU is printed)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


def sit_kwargs(name: str, resolution: int, z_dim: int, **overrides) -> dict:
    """The REG model of the paper at this resolution, with one DINOv2 encoder of width z_dim."""
    kw = dict(input_size=resolution // 8, in_channels=4, num_classes=1000, z_dims=[z_dim],
              encoder_depth=encoder_depth_for(name), use_cls_token=True, cls_token_dim=z_dim, fused_attn=True)
    kw.update(overrides)
    return kw


def encoder_dim(enc_type: str) -> int:
    """Feature width of the first encoder, read from a meta-device timm model (no weights, no time)."""
    import timm
    with torch.device("meta"):
        vit = timm.create_model(ENCODERS[parse_enc_type(enc_type)[0]].timm_name, pretrained=False, num_classes=0)
    return int(vit.embed_dim)


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sit_flops_per_image(name: str, kwargs: dict, batch: int, *, backward: bool) -> float:
    """Model FLOPs (2 per multiply-add: matmuls, convolutions, attention) of one forward (+ backward)
    per image, counted on a meta-device copy, so no memory and no time is spent.

    For scale: SPEC §6 quotes SiT-XL/2 at 118.6 "GFLOPs", DiT's figure, which counts multiply-adds;
    this counter gives ~242 GFLOPs for SiT-XL/2 + REG forward (2 x 121 GMACs).
    """
    with torch.device("meta"):
        model = build_model(name, **kwargs)
    res = kwargs["input_size"]
    x = torch.randn(batch, kwargs["in_channels"], res, res, device="meta")
    t = torch.rand(batch, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    c = torch.randn(batch, kwargs["cls_token_dim"], device="meta")

    def step():
        v, zs, cls_v = model(x, t, y, cls_token=c)
        if backward:
            (v.sum() + sum(z.sum() for z in zs) + cls_v.sum()).backward()
    model.train(backward)
    with torch.set_grad_enabled(backward):
        return count_flops(step) / batch


def encoder_flops_per_image(encoders: Sequence[VisionEncoder], resolution: int) -> float:
    """Forward FLOPs of the frozen encoders on one image (meta-device copies)."""
    total = 0
    for enc in encoders:
        meta = copy.deepcopy(enc).to("meta")
        images = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8, device="meta")
        total += count_flops(lambda: meta(images))
    return float(total)


# ----------------------------------------------------------------------------------------------
# 1. Training step
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainPath:
    """One way to run the REG training step; every speed-up is a separate switch."""
    name: str
    precision: str = "fp32"          # autocast dtype: fp32 (off) or bf16
    compile: bool = False            # torch.compile model and encoders
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    fused_adamw: bool = False        # AdamW(fused=True): one kernel for the whole update
    foreach_ema: bool = False        # train.ema_update (2 foreach kernels) vs a Python loop over names
    log_every_step: bool = True      # .item() of every loss term each step (a host sync per term)
    flash: bool = False              # SDPA restricted to flash / memory-efficient kernels (GPU)

    def describe(self) -> str:
        if self.name == "baseline":
            return "fp32 eager, AdamW, loop EMA, .item() per term"
        compiled = "compile" + ("" if self.compile_backend == "inductor" else f" ({self.compile_backend})")
        parts = [self.precision, compiled if self.compile else "eager",
                 "fused AdamW" if self.fused_adamw else "AdamW", "foreach EMA" if self.foreach_ema else "loop EMA",
                 ".item() per term" if self.log_every_step else "no log sync"]
        if self.flash:
            parts.append("flash SDPA")
        return ", ".join(parts)


BASELINE = TrainPath("baseline")


def optimised_path(args: argparse.Namespace) -> TrainPath:
    cuda = args.device == "cuda"
    return TrainPath("optimised", precision=args.precision, compile=args.compile_train, compile_mode=args.compile_mode,
                     compile_backend=args.compile_backend,
                     fused_adamw=args.fused_adamw, foreach_ema=True, log_every_step=False,
                     flash=args.flash and cuda)


@dataclass
class Batch:
    images: torch.Tensor   # (N, 3, R, R) uint8, what the encoder sees
    moments: torch.Tensor  # (N, 8, R/8, R/8) VAE posterior mean || std
    labels: torch.Tensor   # (N,)


def make_batch(batch_size: int, resolution: int, device: torch.device, seed: int = 0) -> Batch:
    """A synthetic batch as the data loader would deliver it (the loader is not what we time)."""
    g = torch.Generator().manual_seed(seed)
    lat = resolution // 8
    images = torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8, generator=g)
    mean = torch.randn(batch_size, 4, lat, lat, generator=g) * 5
    std = torch.rand(batch_size, 4, lat, lat, generator=g) * 0.1
    labels = torch.randint(0, 1000, (batch_size,), generator=g)
    return Batch(images.to(device), torch.cat([mean, std], dim=1).to(device), labels.to(device))


@dataclass
class Pinned:
    """Every random draw of one step, for comparing two paths on exactly the same computation."""
    t: torch.Tensor          # (N,)
    noise: torch.Tensor      # (N, C, H, W)
    cls_noise: torch.Tensor  # (N, Z)
    latent_seed: int = 0     # the x0 = (mean + std eps) * scale draw


@dataclass
class TrainState:
    path: TrainPath
    model: SiT
    train_model: Callable    # the model, or its compiled wrapper
    ema: SiT
    opt: torch.optim.Optimizer
    encoders: list           # the frozen encoders, or their compiled wrappers
    params: list[torch.Tensor] = field(default_factory=list)
    ema_params: list[torch.Tensor] = field(default_factory=list)
    sums: torch.Tensor | None = None  # on-device running sums of the loss terms (train.py's logging)


def build_train_state(path: TrainPath, name: str, model_kwargs: dict, encoders: Sequence[VisionEncoder],
                      device: torch.device, seed: int = 0) -> TrainState:
    """Model, EMA copy and AdamW as train.py builds them; the same seed gives both paths the same weights."""
    torch.manual_seed(seed)
    model = build_model(name, **model_kwargs).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # The baseline gets torch's default AdamW (foreach on GPU, not fused), as the original code did.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=0.0, fused=True if path.fused_adamw else None)
    compile_kw = dict(backend=path.compile_backend)
    if path.compile_backend == "inductor":  # modes are inductor's
        compile_kw["mode"] = path.compile_mode
    train_model = torch.compile(model, **compile_kw) if path.compile else model
    encs = [torch.compile(e, **compile_kw) for e in encoders] if path.compile else list(encoders)
    return TrainState(path=path, model=model, train_model=train_model, ema=ema, opt=opt, encoders=encs,
                      params=list(model.parameters()), ema_params=list(ema.parameters()),
                      sums=torch.zeros(5, device=device))


@torch.no_grad()
def ema_update_per_name(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The original's EMA: one mul_ and one add_ per named parameter, from Python."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)


def autocast_for(path: TrainPath | str, device: torch.device):
    precision = path if isinstance(path, str) else path.precision
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def attention_backends(flash: bool, device: torch.device):
    """On GPU, only the flash and memory-efficient SDPA kernels (flash wins whenever it applies: bf16,
    head dim <= 256); elsewhere PyTorch's own choice."""
    if not (flash and device.type == "cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def train_step(state: TrainState, batch: Batch, pinned: Pinned | None = None) -> tuple[LossOutput, dict]:
    """One REG step (train.py's order: encoder, loss, backward, clip, AdamW, EMA, logging).

    Returns the loss terms and the logged values: Python floats for the baseline (it synchronises on
    each), nothing for the optimised path (train.py reduces its on-device sums every --log-every steps).
    """
    path, device = state.path, batch.images.device
    gen = None if pinned is None else torch.Generator(device).manual_seed(pinned.latent_seed)
    x0 = sample_latents(batch.moments, generator=gen)
    with autocast_for(path, device), attention_backends(path.flash, device):
        zs_target, cls_target = encoder_targets(state.encoders, batch.images)
    zs_target, cls_target = [z.float() for z in zs_target], cls_target.float()
    with autocast_for(path, device), attention_backends(path.flash, device):
        out = reg_loss(state.train_model, x0, batch.labels, cls_target=cls_target, zs_target=zs_target,
                       path_type="linear", weighting="uniform", prediction="v",
                       proj_coeff=PROJ_COEFF, cls_coeff=CLS_COEFF,
                       t=None if pinned is None else pinned.t, noise=None if pinned is None else pinned.noise,
                       cls_noise=None if pinned is None else pinned.cls_noise)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, MAX_GRAD_NORM)

    if path.log_every_step:  # the original: step, EMA, then every term gathered and .item()'d
        state.opt.step()
        state.opt.zero_grad(set_to_none=True)
        if path.foreach_ema:
            ema_update(state.ema_params, state.params, EMA_DECAY)
        else:
            ema_update_per_name(state.ema, state.model, EMA_DECAY)
        logs = {"loss": out.loss.item(), "denoise": out.denoise.mean().item(), "proj": out.proj.mean().item(),
                "cls": out.cls.mean().item(), "grad_norm": grad_norm.item()}
        return out, logs

    # train.py: one scalar finite-check per step (a non-finite step is skipped on every rank alike) ...
    finite = bool(torch.isfinite(grad_norm))  # all-reduced gradients: NaN anywhere makes this NaN
    if finite:
        state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    if finite:
        if path.foreach_ema:
            ema_update(state.ema_params, state.params, EMA_DECAY)
        else:
            ema_update_per_name(state.ema, state.model, EMA_DECAY)
        # ... and the loss terms stay on the device until the next log interval.
        state.sums += torch.stack([out.loss.detach().float(), out.denoise.mean().detach(), out.proj.mean().detach(),
                                   out.cls.mean().detach(), grad_norm.detach().float()])
    return out, {}


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for fp32 matmuls and convolutions, restored afterwards. Uses torch's newer
    fp32_precision switches, as the evaluator does: torch refuses to read the legacy allow_tf32 flags
    once the two APIs have been mixed in one process."""
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    value = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


def load_benchmark_encoders(args: argparse.Namespace, device: torch.device) -> list[VisionEncoder]:
    with warnings.catch_warnings():  # the loud random-weights banner: expected here, speed only
        warnings.filterwarnings("ignore", message=r"[\s\S]*RANDOM weights")
        return load_encoders(args.enc_type, weights="random", resolution=args.resolution, device=device)


def bench_training(args: argparse.Namespace, device: torch.device, peak_tflops: float | None) -> list[dict]:
    rows = []
    encoders = load_benchmark_encoders(args, device)
    z_dim = encoders[0].embed_dim
    enc_flops = encoder_flops_per_image(encoders, args.resolution)
    batch = make_batch(args.batch_size, args.resolution, device, seed=args.seed)
    for name in args.models:
        kwargs = sit_kwargs(name, args.resolution, z_dim)
        flops = sit_flops_per_image(name, kwargs, args.batch_size, backward=True) + enc_flops
        base = None
        for path in (BASELINE, optimised_path(args)):
            torch._dynamo.reset()  # each path compiles its own graphs from scratch
            reset_peak_memory(device)
            state = build_train_state(path, name, kwargs, encoders, device, seed=args.seed)
            with tf32(args.tf32):
                warm_s, step_s = time_block(lambda: train_step(state, batch), warmup=args.warmup,
                                            iters=args.steps, device=device, repeats=args.repeats)
            img_s = args.batch_size / step_s
            achieved = flops * img_s / 1e12
            row = dict(section="train", model=name, path=path.name, config=path.describe(),
                       batch=args.batch_size, img_per_s=img_s, step_ms=step_s * 1e3, warmup_s=warm_s,
                       peak_mem_gib=peak_memory_gib(device), gflop_per_img=flops / 1e9, tflop_per_s=achieved,
                       mfu=achieved / peak_tflops if peak_tflops else None)
            base = base or row
            row["speedup"] = img_s / base["img_per_s"]
            row["mem_ratio"] = (row["peak_mem_gib"] / base["peak_mem_gib"]) if base["peak_mem_gib"] else None
            rows.append(row)
            print_progress(row)
            del state
    del encoders
    torch._dynamo.reset()
    reset_peak_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Sampling
# ----------------------------------------------------------------------------------------------

def sampler_evaluations(num_steps: int) -> tuple[int, int]:
    """(model forwards per image, of which guided) on the SDE grid with the guidance interval."""
    grid = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    guided = int(((grid >= 0.0) & (grid <= GUIDANCE_HIGH)).sum())
    return num_steps + guided, guided


def bench_sampling(args: argparse.Namespace, device: torch.device, peak_tflops: float | None) -> list[dict]:
    name = args.sample_model
    z_dim = encoder_dim(args.enc_type)
    kwargs = sit_kwargs(name, args.resolution, z_dim)
    forwards, guided = sampler_evaluations(args.sample_steps)
    flops = sit_flops_per_image(name, kwargs, 2, backward=False) * forwards  # per generated image

    torch.manual_seed(args.seed)
    model = build_model(name, **kwargs).to(device).eval()
    g = torch.Generator(device).manual_seed(args.seed)
    lat = args.resolution // 8
    latents = torch.randn(args.sample_batch, 4, lat, lat, device=device, generator=g)
    cls = torch.randn(args.sample_batch, z_dim, device=device, generator=g)
    labels = torch.randint(0, 1000, (args.sample_batch,), device=device, generator=g)

    def sample(m, steps: int, precision: str):
        with autocast_for(precision, device), attention_backends(args.flash, device):
            return euler_maruyama_sampler(
                m, latents, labels, cls_latents=cls, num_steps=steps, cfg_scale=CFG_SCALE,
                cls_cfg_scale=CLS_CFG_SCALE, guidance_low=0.0, guidance_high=GUIDANCE_HIGH, path_type="linear",
                generator=torch.Generator(device).manual_seed(args.seed))

    arms = [("baseline", "eager fp32", False, "fp32")]
    if args.precision != "fp32":
        arms.append(("eager " + args.precision, "eager " + args.precision, False, args.precision))
    compiled_label = "compiled" + ("" if args.compile_backend == "inductor" else f" ({args.compile_backend})")
    arms.append(("optimised", (compiled_label if args.compile_sample else "eager") + " " + args.precision,
                 args.compile_sample, args.precision))
    compile_kw = dict(backend=args.compile_backend, dynamic=False)  # two static graphs: batch N and 2N (CFG)
    if args.compile_backend == "inductor":
        compile_kw["mode"] = args.compile_mode
    rows, base = [], None
    # warm-up runs take a few steps on both sides of t = 0.85, so the compiled model has seen both the
    # plain batch (t > 0.85) and the CFG-doubled batch before the clock starts
    warm_steps = min(4, args.sample_steps)
    for arm, config, compiled, precision in arms:
        torch._dynamo.reset()
        reset_peak_memory(device)
        m = torch.compile(model, **compile_kw) if compiled else model
        with tf32(True):  # generate.py's default: TF32 on
            t0 = time.perf_counter()
            sample(m, warm_steps, precision)
            synchronize(device)
            warm_s = time.perf_counter() - t0
            _, run_s = time_block(lambda: sample(m, args.sample_steps, precision), warmup=0, iters=1,
                                  device=device, repeats=args.repeats)
        img_s = args.sample_batch / run_s
        row = dict(section="sample", model=name, path=arm, config=config, batch=args.sample_batch,
                   steps=args.sample_steps, forwards_per_img=forwards, guided_steps=guided, img_per_s=img_s,
                   run_s=run_s, warmup_s=warm_s, peak_mem_gib=peak_memory_gib(device),
                   tflop_per_s=flops * img_s / 1e12,
                   mfu=flops * img_s / 1e12 / peak_tflops if peak_tflops else None)
        base = base or row
        row["speedup"] = img_s / base["img_per_s"]
        rows.append(row)
        print_progress(row)
    del model
    torch._dynamo.reset()
    reset_peak_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Evaluator
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def adm_style_precision_recall(ref: np.ndarray, sam: np.ndarray, k: int = 3, block: int = 10_000,
                               device: torch.device | str = "cpu") -> tuple[float, float]:
    """ADM's ManifoldEstimator as its code runs it: distance blocks on the accelerator (the same fp16
    distance as the evaluator), but every block copied to the host, the k-NN radius taken with
    np.partition over full rows, and the membership tests done in NumPy. Returns (precision, recall)."""
    ref_t = torch.as_tensor(ref, device=device)
    sam_t = torch.as_tensor(sam, device=device)

    def radii(f: torch.Tensor) -> np.ndarray:
        out = np.empty(len(f), dtype=np.float32)
        for r0 in range(0, len(f), block):
            row = np.concatenate([squared_distances(f[r0:r0 + block], f[c0:c0 + block]).cpu().numpy()
                                  for c0 in range(0, len(f), block)], axis=1)
            out[r0:r0 + block] = np.partition(row, k, axis=1)[:, k]
        return out

    with ieee_fp32():
        ref_r, sam_r = radii(ref_t), radii(sam_t)
        ref_in = np.zeros(len(ref), dtype=bool)
        sam_in = np.zeros(len(sam), dtype=bool)
        for r0 in range(0, len(ref), block):
            for s0 in range(0, len(sam), block):
                d = squared_distances(ref_t[r0:r0 + block], sam_t[s0:s0 + block]).cpu().numpy()
                sam_in[s0:s0 + block] |= (d <= ref_r[r0:r0 + block, None]).any(axis=0)
                ref_in[r0:r0 + block] |= (d <= sam_r[None, s0:s0 + block]).any(axis=1)
    return float(sam_in.mean()), float(ref_in.mean())


def bench_evaluator(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        warnings.simplefilter("ignore")  # the random-weights banner: expected, speed only
        inception = build_inception("random", device=device, verbose=False)

    # Inception features from an npz on disk, the way both evaluators read it.
    n, res = args.eval_images, args.eval_resolution
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.npz")
        np.savez(path, rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8))
        reader = NpzImageReader(path)
        adm_batch = min(ADM_EVAL_BATCH, n)

        def adm_features() -> np.ndarray:  # synchronous: read a batch, run it, copy it back, repeat
            pools = []
            with ieee_fp32():
                for b in reader.batches(adm_batch):
                    x = torch.from_numpy(np.array(b)).to(device).permute(0, 3, 1, 2).contiguous()
                    pools.append(inception(x)[0].cpu().numpy())
            return np.concatenate(pools)

        def our_features() -> np.ndarray:
            return extract_features(reader, inception, batch_size=args.eval_batch, verbose=False)["pool"]

        with ieee_fp32():  # warm-up: cuDNN autotuning and allocator for both batch sizes
            for bs in {adm_batch, min(args.eval_batch, n)}:
                inception(torch.zeros(bs, 3, res, res, dtype=torch.uint8, device=device))
        synchronize(device)
        results = {}
        for arm, fn, bs in (("baseline", adm_features, adm_batch), ("optimised", our_features, args.eval_batch)):
            t0 = time.perf_counter()
            results[arm] = fn()
            synchronize(device)
            dt = time.perf_counter() - t0
            row = dict(section="eval", task="Inception features", path=arm,
                       config=(f"ADM: batches of {bs}, synchronous" if arm == "baseline"
                               else f"evaluator: batches of {bs}, prefetching reader"),
                       size=f"{n} imgs {res}px", img_per_s=n / dt, seconds=dt)
            rows.append(row)
        diff = float(np.abs(results["baseline"] - results["optimised"]).max())
        for row in rows:
            row["speedup"] = row["img_per_s"] / rows[0]["img_per_s"]
            row["max_abs_diff"] = diff
        for row in rows:
            print_progress(row)

    # Precision / recall on random features (the k-NN work does not depend on the values).
    g = np.random.default_rng(args.seed + 1)
    ref = g.standard_normal((args.pr_refs, 2048), dtype=np.float32)
    sam = g.standard_normal((args.pr_samples, 2048), dtype=np.float32)
    pr_rows = []
    for arm, fn in (("baseline", lambda: adm_style_precision_recall(ref, sam, 3, args.pr_block, device)),
                    ("optimised", lambda: precision_recall(ref, sam, k=3, block_size=args.pr_block, device=device))):
        t0 = time.perf_counter()
        pr = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        pr_rows.append(dict(section="eval", task="precision/recall", path=arm,
                            config=("ADM: host np.partition k-NN" if arm == "baseline"
                                    else "evaluator: on-device top-k"),
                            size=f"{args.pr_samples}x{args.pr_refs} feats", seconds=dt, result=pr))
    for row in pr_rows:
        row["speedup"] = pr_rows[0]["seconds"] / row["seconds"]
        row["same_result"] = pr_rows[0]["result"] == pr_rows[1]["result"]
        print_progress(row)
    del inception
    reset_peak_memory(device)
    return rows + pr_rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{suffix}"


def print_progress(row: dict) -> None:
    what = row.get("model") or row.get("task")
    print(f"  done: {row['section']} {what} {row['path']}", file=sys.stderr, flush=True)


def render_table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


def report(results: dict) -> str:
    """The tables as printed (also what goes into benchmarks/RESULTS.md)."""
    rows, parts = results["rows"], []
    train = [r for r in rows if r["section"] == "train"]
    if train:
        r0 = train[0]
        parts.append(f"Training step: SiT + REG, {r0['batch']} images per device, {results['resolution']} px, "
                     f"{results['enc_type']} in the step")
        parts.append(render_table(
            ["model", "path", "config", "img/s", "step ms", "warm-up s", "peak GiB", "GFLOP/img", "TFLOP/s", "MFU",
             "speed-up", "mem ratio"],
            [[r["model"], r["path"], r["config"], fmt(r["img_per_s"]), fmt(r["step_ms"]), fmt(r["warmup_s"]),
              fmt(r["peak_mem_gib"], ".2f"), fmt(r["gflop_per_img"], ".2f"), fmt(r["tflop_per_s"], ".2f"),
              fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f", "%"), fmt(r["speedup"], ".2f", "x"),
              fmt(r["mem_ratio"], ".2f", "x")] for r in train]))
    sample = [r for r in rows if r["section"] == "sample"]
    if sample:
        r0 = sample[0]
        parts.append(f"Sampling: SDE {r0['steps']} steps, cfg {CFG_SCALE} / cls-cfg {CLS_CFG_SCALE}, guidance "
                     f"t <= {GUIDANCE_HIGH} ({r0['guided_steps']} guided steps, {r0['forwards_per_img']} "
                     f"forwards per image), batch {r0['batch']}")
        parts.append(render_table(
            ["model", "path", "config", "img/s", "s/batch", "peak GiB", "TFLOP/s", "MFU", "speed-up"],
            [[r["model"], r["path"], r["config"], fmt(r["img_per_s"], ".2f"), fmt(r["run_s"], ".2f"),
              fmt(r["peak_mem_gib"], ".2f"), fmt(r["tflop_per_s"], ".2f"),
              fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f", "%"),
              fmt(r["speedup"], ".2f", "x")] for r in sample]))
    ev = [r for r in rows if r["section"] == "eval"]
    if ev:
        parts.append("Evaluator (random weights and features: speed only)")
        parts.append(render_table(
            ["task", "path", "config", "size", "img/s", "seconds", "speed-up", "check"],
            [[r["task"], r["path"], r["config"], r["size"], fmt(r.get("img_per_s")), fmt(r["seconds"], ".3f"),
              fmt(r["speedup"], ".2f", "x"),
              (f"max |diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r
               else "same P/R" if r["same_result"] else "P/R DIFFER")] for r in ev]))
    parts.append(targets(results))
    return "\n\n".join(p for p in parts if p)


def targets(results: dict) -> str:
    """Issue 8's acceptance figures for SiT-XL/2 (meaningful on an H100)."""
    rows = results["rows"]
    lines = []
    xl = [r for r in rows if r["section"] == "train" and r["model"] == "SiT-XL/2" and r["path"] == "optimised"]
    if xl:
        mfu = xl[0]["mfu"]
        lines.append(f"  train SiT-XL/2 MFU >= 40%: {fmt(None if mfu is None else 100 * mfu, '.1f', '%')}"
                     + ("" if mfu is None else "  " + ("met" if mfu >= 0.40 else "NOT met")))
        lines.append(f"  train SiT-XL/2 optimised >= 1.5x baseline: {xl[0]['speedup']:.2f}x  "
                     + ("met" if xl[0]["speedup"] >= 1.5 else "NOT met"))
    smp = [r for r in rows if r["section"] == "sample" and r["model"] == "SiT-XL/2" and r["path"] == "optimised"]
    if smp:
        lines.append(f"  sampling SiT-XL/2 >= 2x eager: {smp[0]['speedup']:.2f}x  "
                     + ("met" if smp[0]["speedup"] >= 2 else "NOT met"))
    if not lines:
        return ""
    note = "" if "H100" in results["device_name"] else f" (the targets are for an H100; this is {results['device_name']})"
    return "Targets" + note + ":\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    peak = lookup_peak_tflops(device, args.peak_tflops)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_benchmarks(args, device, peak)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a bigger process (the tests)


def run_benchmarks(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.run " + " ".join(getattr(args, "argv", [])),
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "peak_bf16_tflops": peak, "quick": args.quick, "resolution": args.resolution, "enc_type": args.enc_type,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "rows": [],
    }
    start = time.perf_counter()
    where = results["device_name"] + (f", {results['threads']} thread(s)" if device.type == "cpu" else "")
    print(f"REG benchmarks on {where}, torch {torch.__version__}{', quick mode' if args.quick else ''}; "
          f"peak bf16 {fmt(peak, '.0f', ' TFLOP/s')}"
          + ("" if device.type == "cuda" else " (CPU timings: indicative only, and noisy on a shared machine)"),
          flush=True)
    if "train" in args.sections:
        results["rows"] += bench_training(args, device, peak)
    if "sample" in args.sections:
        results["rows"] += bench_sampling(args, device, peak)
    if "eval" in args.sections:
        results["rows"] += bench_evaluator(args, device)
    results["total_s"] = time.perf_counter() - start
    text = report(results)
    results["table"] = text
    print("\n" + text + f"\n\ntotal {results['total_s']:.0f} s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
