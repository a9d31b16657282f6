"""Train SiT + REG (or the REPA / SiT baselines) under HuggingFace accelerate.

    accelerate launch --multi_gpu --num_processes 8 train.py --model SiT-XL/2 --encoder-depth 8 \
        --data-dir DATA --output-dir exps --exp-name reg-xl

Re-running the same command resumes from the newest complete checkpoint in OUTPUT/EXP/checkpoints.
Checkpoints ({step:07d}.pt) hold model, ema, opt, steps, the model config and the args as plain
data (weights_only=True loads them); per-rank RNG states sit beside them; the EMA weights are also
exported as ema_{step:07d}.safetensors + .json, the file to share and to sample from.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from checkpoint_io import (atomic_json_dump, atomic_torch_save, build_model_from_config, export_safetensors,
                           save_training_checkpoint, torch_load)
from dataset import CustomDataset
from loss import encoder_targets, reg_loss, sample_latents
from models.encoders import ENCODERS, load_encoders, parse_enc_type
from models.sit import SIZES, SiT_models, parse_model_name

METHODS = ("reg", "repa", "sit")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="SiT-XL/2", help=f"one of {', '.join(SiT_models)}")
    g.add_argument("--method", default="reg", choices=METHODS,
                   help="reg: class token + alignment (default); repa: alignment only; sit: neither (no encoder loaded)")
    g.add_argument("--encoder-depth", type=int, default=8, help="block (1-based) whose output is aligned; 4 for B, 8 for L/XL")
    g.add_argument("--projector-dim", type=int, default=2048, help="hidden width of the REPA projector MLP")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="LayerNorm on q and k")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True, help="PyTorch SDPA (flash) attention")
    g.add_argument("--num-classes", type=int, default=1000)

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data", help="folder holding imagenet_{R}_vae/ and vae-sd/ (or their .zip)")
    g.add_argument("--resolution", type=int, default=256, help="image side; any multiple of 16")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per micro-step, split over processes")
    g.add_argument("--num-workers", type=int, default=4)

    g = p.add_argument_group("encoder")
    g.add_argument("--enc-type", default="dinov2-vit-b", help=f"comma-separated; from {', '.join(ENCODERS)}")
    g.add_argument("--enc-weights", default=None,
                   help="local encoder weights file/dir (comma-separated per encoder), 'random' for smoke tests; "
                        "default: HF hub / cache (env REG_ENC_WEIGHTS)")

    g = p.add_argument_group("loss")
    g.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    g.add_argument("--prediction", default="v", choices=["v"], help="REG predicts the velocity")
    g.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"], help="time sampling")
    g.add_argument("--proj-coeff", type=float, default=None, help="alignment loss weight (default 0.5; 0 for --method sit)")
    g.add_argument("--cls", type=float, default=0.03, help="class-token loss weight (REG)")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout probability")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1400)
    g.add_argument("--max-train-steps", type=int, default=400_000)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=0.0)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--max-bad-steps", type=int, default=20,
                   help="stop after this many consecutive non-finite losses (each is skipped)")

    g = p.add_argument_group("precision and speed")
    g.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: bf16 on GPU, no on CPU")
    g.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and encoder (default: on for GPU)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output-dir", default="exps")
    g.add_argument("--exp-name", default=None, help="run folder name (default derived from the model and method)")
    g.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    g.add_argument("--log-every", type=int, default=100, help="steps between logged averages (the only host syncs)")
    g.add_argument("--checkpointing-steps", type=int, default=50_000)
    g.add_argument("--keep-last", type=int, default=3, help="full training checkpoints kept (EMA exports are all kept)")
    g.add_argument("--resume-step", type=int, default=0, help="resume from this step; 0 = newest complete checkpoint")
    g.add_argument("--sample-every", type=int, default=0, help="steps between EMA sample grids (0 = off)")
    g.add_argument("--vae", default=None, help="VAE for sample grids (default: the one named in vae-sd/dataset.json)")
    g.add_argument("--seed", type=int, default=0)

    args = p.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def validate_args(args: argparse.Namespace) -> None:
    if args.model not in SiT_models:
        raise ValueError(f"unknown --model {args.model!r}; choose from {', '.join(SiT_models)}")
    depth = SIZES[parse_model_name(args.model)[0]][0]
    if args.resolution <= 0 or args.resolution % 16:
        raise ValueError(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    if args.method == "sit":
        if args.proj_coeff not in (None, 0):
            raise ValueError("--method sit has no alignment loss: drop --proj-coeff or set it to 0")
        args.proj_coeff = 0.0
    elif args.proj_coeff is None:
        args.proj_coeff = 0.5
    if args.proj_coeff < 0 or args.cls < 0:
        raise ValueError("--proj-coeff and --cls must be >= 0")
    if args.proj_coeff > 0 and not 1 <= args.encoder_depth <= depth:
        raise ValueError(f"--encoder-depth must be in [1, {depth}] for {args.model}, got {args.encoder_depth}")
    if args.method != "sit":
        parse_enc_type(args.enc_type)
    for name in ("batch_size", "gradient_accumulation_steps", "log_every", "checkpointing_steps",
                 "max_train_steps", "epochs", "max_bad_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.cfg_prob < 1:
        raise ValueError(f"--cfg-prob must be in [0, 1), got {args.cfg_prob}")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report-to wandb needs `pip install wandb` (or use tensorboard / none)") from None
    if args.exp_name is None:
        args.exp_name = f"{args.model.replace('/', '-')}-{args.method}-{args.path_type}-{args.enc_type if args.method != 'sit' else 'noenc'}"


# ----------------------------------------------------------------------------- pieces of the loop

class StepSampler(Sampler):
    """Deterministic sharded order: epoch e is a permutation seeded by (seed, e); rank r takes every
    world-th batch. It starts at a given micro-batch, so the data position follows from the step alone
    and a resumed run reads exactly the batches the uninterrupted run would have."""

    def __init__(self, n: int, *, local_batch: int, rank: int, world: int, seed: int, start_batch: int = 0):
        self.n, self.local_batch, self.rank, self.world, self.seed = n, local_batch, rank, world, seed
        self.batches_per_epoch = n // (local_batch * world)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch ({local_batch * world})")
        self.start_batch = start_batch

    def __iter__(self):
        b = self.start_batch
        while True:
            epoch, offset = divmod(b, self.batches_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            step = self.local_batch * self.world
            for j in range(offset, self.batches_per_epoch):
                chunk = perm[j * step:(j + 1) * step][self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
                yield from chunk.tolist()
            b = (epoch + 1) * self.batches_per_epoch


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * p, for all tensors in two fused foreach kernels."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def find_checkpoints(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (the .pt is written last, atomically)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(f.stem) for f in ckpt_dir.glob("[0-9]" * 7 + ".pt"))


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Logger:
    """log.txt + trackers + stdout, on the main process only."""

    def __init__(self, accelerator, run_dir: Path):
        self.acc, self.path = accelerator, run_dir / "log.txt"

    def info(self, msg: str) -> None:
        if self.acc.is_main_process:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            from tqdm import tqdm
            tqdm.write(line)
            with open(self.path, "a") as f:
                f.write(line + "\n")


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm import tqdm

    run_dir = Path(args.output_dir) / args.exp_name
    ckpt_dir = run_dir / "checkpoints"
    cuda = torch.cuda.is_available()
    mixed = args.mixed_precision or ("bf16" if cuda else "no")
    use_compile = args.compile if args.compile is not None else cuda
    accelerator = Accelerator(
        # without a GPU, a torchrun-style launch (accelerate launch --multi_gpu / torchrun) runs DDP over gloo
        cpu=not cuda,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # every parameter takes part in every step: no unused-parameter search
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    device = accelerator.device
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".*.tmp"):  # half-written files of a killed run
            stale.unlink()
    accelerator.wait_for_everyone()
    log = Logger(accelerator, run_dir)
    if args.allow_tf32:
        # the fp32_precision API: mixing it with the legacy allow_tf32 flags raises in torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    if args.batch_size % accelerator.num_processes:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
    local_batch = args.batch_size // accelerator.num_processes
    set_seed(args.seed + accelerator.process_index)

    # ---- data
    dataset = CustomDataset(args.data_dir, resolution=args.resolution, num_classes=args.num_classes)
    vae_info = dataset.vae_info
    latent_size = args.resolution // 8

    # ---- encoders (not even loaded for plain SiT)
    use_cls = args.method == "reg"
    need_encoder = use_cls or args.proj_coeff > 0
    encoders = []
    if need_encoder:
        encoders = load_encoders(args.enc_type, weights=args.enc_weights, resolution=args.resolution, device=device)
        if args.enc_weights == "random" or os.environ.get("REG_ENC_WEIGHTS") == "random":
            log.info("WARNING: encoders use RANDOM weights (smoke test only)")
    z_dims = [e.embed_dim for e in encoders] if args.proj_coeff > 0 else []

    # ---- model, EMA, optimiser
    config = {
        "model": args.model, "input_size": latent_size, "in_channels": int(vae_info["latent_channels"]),
        "num_classes": args.num_classes, "z_dims": z_dims, "encoder_depth": args.encoder_depth,
        "projector_dim": args.projector_dim, "use_cls_token": use_cls,
        "cls_token_dim": encoders[0].embed_dim if use_cls else None, "qk_norm": args.qk_norm,
        "fused_attn": args.fused_attn, "class_dropout_prob": args.cfg_prob, "path_type": args.path_type,
        "resolution": args.resolution, "latents_scale": float(vae_info["scaling_factor"]),
        "vae": args.vae or vae_info.get("name") or "ema", "enc_type": args.enc_type if need_encoder else None,
        "method": args.method,
    }
    model = build_model_from_config(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    token_dim = model.in_channels * model.patch_size ** 2
    if token_dim > model.hidden_size:  # the final layer cannot reach every latent direction of a token
        log.info(f"WARNING: a token holds {token_dim} latent numbers ({model.in_channels} channels x patch "
                 f"{model.patch_size}^2) but {args.model} is {model.hidden_size} wide: samples keep noise in the "
                 f"{token_dim - model.hidden_size} directions it cannot reach (use a wider model or a smaller codec)")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        fused=cuda, foreach=not cuda,  # one fused kernel on GPU; multi-tensor kernels on CPU
    )

    # ---- resume: --resume-step N, or the newest complete checkpoint
    step = 0
    available = find_checkpoints(ckpt_dir)
    resume = args.resume_step or (available[-1] if available else 0)
    if resume:
        path = ckpt_dir / f"{resume:07d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume-step {resume}: {path} does not exist (have {available or 'none'})")
        ckpt = torch_load(path)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["steps"])
        rng_path = ckpt_dir / f"{resume:07d}.rng{accelerator.process_index}.pt"
        if rng_path.is_file():
            set_rng_state(torch_load(rng_path), device)
        else:
            log.info(f"no RNG state for rank {accelerator.process_index} at step {resume}: reseeding")
            set_seed(args.seed + accelerator.process_index + 7919 * step)
        log.info(f"resumed from {path} at step {step}")
        del ckpt

    # The optimiser is prepared too: under fp16 accelerate's GradScaler unscales/skips through it.
    ddp_model, opt = accelerator.prepare(model, opt)
    train_model = torch.compile(ddp_model) if use_compile else ddp_model
    if use_compile:
        encoders = [torch.compile(e) for e in encoders]
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())

    sampler = StepSampler(len(dataset), local_batch=local_batch, rank=accelerator.process_index,
                          world=accelerator.num_processes, seed=args.seed,
                          start_batch=step * args.gradient_accumulation_steps)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=cuda, drop_last=True, persistent_workers=args.num_workers > 0,
                        generator=torch.Generator())  # its own RNG: creating it must not consume the global one
    max_steps = min(args.max_train_steps, args.epochs * sampler.batches_per_epoch // args.gradient_accumulation_steps)

    if accelerator.is_main_process:
        atomic_json_dump(vars(args), run_dir / "args.json")
        atomic_json_dump(config, run_dir / "config.json")
    if args.report_to != "none":
        accelerator.init_trackers("REG", config={k: v for k, v in vars(args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    log.info(f"{args.model} ({args.method}), {n_params / 1e6:.2f}M parameters, {len(dataset)} images, "
             f"global batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation, "
             f"{accelerator.num_processes} processes, precision {mixed}, compile {use_compile}, steps {step} -> {max_steps}")

    sample_fn = make_sample_fn(args, config, device) if args.sample_every and accelerator.is_main_process else None

    # ---- the loop
    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        atomic_torch_save(rng_state(device), ckpt_dir / f"{step:07d}.rng{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ema_sd = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
            # written last: its presence marks the checkpoint complete
            save_training_checkpoint(ckpt_dir / f"{step:07d}.pt", model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                                     ema=ema_sd, opt=opt.state_dict(), steps=step, config=config, args=vars(args))
            export_safetensors(ckpt_dir / f"ema_{step:07d}.safetensors", ema_sd, config)
            for old in find_checkpoints(ckpt_dir)[:-args.keep_last]:
                for f in ckpt_dir.glob(f"{old:07d}.*"):
                    f.unlink()
            log.info(f"saved checkpoint {ckpt_dir / f'{step:07d}.pt'}")
        accelerator.wait_for_everyone()

    n_terms = 5  # loss, denoise, proj, cls, grad-norm
    sums = torch.zeros(n_terms, device=device)
    count, bad_total, bad_run = 0, 0, 0
    last_time, last_step = time.time(), step
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    data_iter = iter(loader)
    history = []
    finite = True
    model.train()
    while step < max_steps:
        for _ in range(args.gradient_accumulation_steps):
            images, moments, labels = next(data_iter)
            images, moments, labels = images.to(device), moments.to(device), labels.to(device)
            with accelerator.accumulate(ddp_model):
                x0 = sample_latents(moments, scale=config["latents_scale"])
                zs_target, cls_target = [], None
                if encoders:
                    with accelerator.autocast():
                        zs_target, cls_target = encoder_targets(encoders, images)
                    zs_target = [z.float() for z in zs_target] if z_dims else []
                    cls_target = cls_target.float() if use_cls else None
                with accelerator.autocast():
                    out = reg_loss(train_model, x0, labels, cls_target=cls_target, zs_target=zs_target,
                                   path_type=args.path_type, weighting=args.weighting, prediction=args.prediction,
                                   proj_coeff=args.proj_coeff, cls_coeff=args.cls)
                accelerator.backward(out.loss)
                grad_norm = torch.zeros((), device=device)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model_params, args.max_grad_norm)
                    # One scalar host sync per step. The gradients are all-reduced, so a non-finite loss on
                    # any rank makes this norm non-finite on every rank, and all of them skip alike.
                    finite = bool(torch.isfinite(grad_norm))
                    if finite or accelerator.scaler is not None:
                        opt.step()  # under fp16 the GradScaler skips the step itself and lowers its scale
                opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if finite:
            bad_run = 0
            ema_update(ema_params, model_params, args.ema_decay)
            zero = torch.zeros((), device=device)
            sums += torch.stack([out.loss.detach().float(), out.denoise.mean().detach(),
                                 out.proj.mean().detach() if out.proj is not None else zero,
                                 out.cls.mean().detach() if out.cls is not None else zero, grad_norm.float()])
            count += 1
        else:
            bad_run += 1
            bad_total += 1
            hint = " (fp16 loss-scale overflows are normal in the first steps)" if accelerator.scaler is not None else ""
            log.info(f"step {step}: non-finite loss or gradient, update skipped ({bad_run} in a row, "
                     f"{bad_total} in all){hint}")
            if bad_run >= args.max_bad_steps:
                last = find_checkpoints(ckpt_dir)
                raise RuntimeError(
                    f"{bad_run} consecutive non-finite losses at step {step} (limit --max-bad-steps "
                    f"{args.max_bad_steps}); stopping. The last good checkpoint is "
                    f"{ckpt_dir / f'{last[-1]:07d}.pt' if last else 'none (no checkpoint was written yet)'}. "
                    "Check the data for NaN latents, lower --learning-rate, or use bf16 instead of fp16.")

        if step % args.log_every == 0 or step == max_steps:
            stats = accelerator.reduce(torch.cat([sums, torch.tensor([count], device=device, dtype=sums.dtype)]), "sum")
            stats = stats.tolist()  # the one host sync per log interval
            n = max(stats[-1], 1)
            now = time.time()
            record = {"loss": stats[0] / n, "loss_denoise": stats[1] / n, "loss_proj": stats[2] / n,
                      "loss_cls": stats[3] / n, "grad_norm": stats[4] / n, "lr": opt.param_groups[0]["lr"],
                      "img_per_s": (step - last_step) * args.batch_size * args.gradient_accumulation_steps / (now - last_time),
                      "step_time_s": (now - last_time) / max(step - last_step, 1), "skipped_steps": bad_total}
            if cuda:
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            history.append({"step": step, **record})
            if args.report_to != "none":
                accelerator.log(record, step=step)
            log.info(f"step {step:07d} " + " ".join(f"{k}={v:.4g}" for k, v in record.items()))
            if accelerator.is_main_process:  # machine-readable twin of log.txt, for plots
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **record}) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            sums.zero_()
            count, last_time, last_step = 0, now, step

        if step % args.checkpointing_steps == 0 or step == max_steps:
            save(step)
        if sample_fn is not None and (step % args.sample_every == 0 or step == max_steps):
            sample_fn(ema, step, run_dir, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    log.info(f"done: {step} steps, {bad_total} skipped; checkpoints in {ckpt_dir}")
    return {"steps": step, "history": history, "run_dir": str(run_dir), "skipped": bad_total}


def make_sample_fn(args: argparse.Namespace, config: dict, device: torch.device):
    """EMA sample grids during training: the SDE sampler, fixed noise and classes, decoded by the VAE."""
    from PIL import Image

    from models.vae import load_vae
    from samplers import euler_maruyama_sampler

    vae = load_vae(config["vae"], device=device)  # fails at start-up, not hours into the run
    n = 16
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(n, config["in_channels"], config["input_size"], config["input_size"], generator=g)
    cls = torch.randn(n, config["cls_token_dim"], generator=g) if config["use_cls_token"] else None
    labels = torch.arange(n) % config["num_classes"]

    def sample(ema, step: int, run_dir: Path, accelerator) -> None:
        with torch.no_grad():
            z, _ = euler_maruyama_sampler(
                ema, latents.to(device), labels.to(device), cls_latents=None if cls is None else cls.to(device),
                num_steps=50, cfg_scale=1.0, cls_cfg_scale=0.0, guidance_low=0.0, guidance_high=1.0,
                path_type=config["path_type"], generator=torch.Generator(device).manual_seed(args.seed))
            img = vae.decode(z.float() / config["latents_scale"])
        img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (N, 3, H, W)
        side = int(math.ceil(math.sqrt(n)))
        H, W = img.shape[2:]
        grid = torch.zeros(3, side * H, side * W, dtype=torch.uint8)
        for i in range(n):
            r, c = divmod(i, side)
            grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = img[i]
        path = run_dir / "samples" / f"{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        if args.report_to == "tensorboard":
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("samples", grid, step)
        elif args.report_to == "wandb":
            import wandb
            accelerator.log({"samples": wandb.Image(str(path))}, step=step)

    return sample


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
