"""Train SiT + REG (or the REPA / SiT baselines) under HuggingFace accelerate.

    accelerate launch --multi_gpu --num_processes 8 train.py --model SiT-XL/2 --encoder-depth 8 \\
        --data-dir DATA --output-dir exps --exp-name reg-xl

Every flag of the authors' train.py works with the same meaning. Re-running the same command resumes
from the newest complete checkpoint in OUTPUT/EXP/checkpoints (also a run made by the authors' code).
The layout of that folder is described in reg.checkpoints.CheckpointDir; the step itself is
reg.train_step.train_step.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataset import CustomDataset
from evaluations.during_training import EvalStopped, InTrainingEval  # Inception and the metrics load when asked
from models.encoders import ENCODERS, encoder_activations, load_encoders, parse_enc_type
from models.sit import CLASS_DROPOUT_PROB, SiT_models, default_encoder_depth, model_depth
from models.vae import decoding_vae
from reg import folder_lock, processes, stop_signals
from reg.checkpoints import CheckpointDir, CheckpointError
from reg.data_check import DATA_CHECKS, SAMPLE_SIZE, check_content
from reg.hub import portable_vae_spec
from reg.loading import build_model_from_config, load_into, read_weights
from reg.mixed_precision import resolve_mixed_precision
from reg.resume_flags import HYPER, check_resume, parse_allow_run_change, run_folder_argv
from reg.run_log import METRICS_FILE, append_record, best_fid_step, read_metrics, trim_torn_tail, write_records
from reg.throughput import Meter, peak_tflops, training_flops_per_image
from reg.trackers import REPORT_TO_CHOICES, check_wandb_env, check_wandb_id, parse_report_to, wandb_run
from reg.train_step import ADAMW_IMPLS, StepConfig, StepSampler, make_optimizer, step_seed, train_step
from reg.utils import (ArgumentParser, HelpFormatter, UserError, append_text, atomic_json_dump, atomic_write,
                       finite_float, run_main, set_fp32_precision)
from samplers import SAMPLER_MODES

METHODS = ("reg", "repa", "sit")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    _add_model_args(p.add_argument_group("model"))
    _add_data_args(p.add_argument_group("data"))
    _add_encoder_args(p.add_argument_group("encoder"))
    _add_loss_args(p.add_argument_group("loss"))
    _add_optim_args(p.add_argument_group("optimisation"))
    _add_precision_args(p.add_argument_group("precision and speed"))
    _add_logging_args(p.add_argument_group("logging and checkpoints"))
    _add_eval_args(p.add_argument_group("evaluation during training (FID of the EMA model)"))
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if (run_dir := p.parse_known_args(argv)[0].resume) is not None:
            argv = [*run_folder_argv(run_dir, p), *argv]  # the recorded flags first: the command line's win
        args = p.parse_args(argv)
        validate_args(args)
    except ValueError as e:  # UserError, and the encoder table's ValueError
        p.error(str(e))
    return args


def _add_model_args(g) -> None:
    g.add_argument("--model", default="SiT-XL/2", help=f"one of {', '.join(SiT_models)}")
    g.add_argument("--method", default="reg", choices=METHODS,
                   help="reg: class token + alignment; repa: alignment only; sit: neither (no encoder loaded)")
    g.add_argument("--encoder-depth", type=int, default=None,
                   help="block (1-based) whose output is aligned (None: the paper's, 4 for S/B, 8 for L/XL)")
    g.add_argument("--projector-dim", type=int, default=2048, help="hidden width of the REPA projector MLP")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="LayerNorm on q and k")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True, help="PyTorch SDPA (flash) attention")
    g.add_argument("--num-classes", type=int, default=1000, help="1 for an unlabelled dataset")
    g.add_argument("--ops-head", type=int, default=16, help="accepted for the original's command lines; unused there too")


def _add_data_args(g) -> None:
    g.add_argument("--data-dir", default="data", help="folder holding the images and vae-sd/ (or their .zip)")
    g.add_argument("--resolution", type=int, default=256, help="image side; any multiple of 16")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per micro-step, split over processes")
    g.add_argument("--num-workers", type=int, default=4)
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="replace an unreadable image/latent (deterministically, logged once, counted) instead of stopping")
    g.add_argument("--data-check", default="sample", choices=DATA_CHECKS,
                   help=f"before the first step, compare the data with encode's record (docs/data.md#the-data-check): "
                        f"sample = pairing, labels and sizes of every item and the sha256 of {SAMPLE_SIZE} seeded items; "
                        "full = the sha256 of every file; off = pairing and labels only")


def _add_encoder_args(g) -> None:
    g.add_argument("--enc-type", default="dinov2-vit-b", help=f"comma-separated; from {', '.join(ENCODERS)}")
    g.add_argument("--enc-weights", default=None,
                   help="local encoder weights file/dir (comma-separated per encoder), 'random' for smoke tests; "
                        "default: $REG_ENC_WEIGHTS, the torch.hub cache, then the HF hub cache")


def _add_loss_args(g) -> None:
    g.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    g.add_argument("--prediction", default="v", choices=["v"], help="REG predicts the velocity")
    g.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"], help="time sampling")
    g.add_argument("--proj-coeff", type=finite_float(0), default=None, help="alignment loss weight (None: 0.5; 0 for --method sit)")
    g.add_argument("--cls", type=finite_float(0), default=0.03, help="class-token loss weight (REG)")
    g.add_argument("--cfg-prob", type=finite_float(0, 1, hi_open=True), default=0.1,
                   help="--legacy's extra label drop, as in the original; the model always drops labels with p 0.1")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's early runs: drop labels a second time before the model's own dropout")


def _add_optim_args(g) -> None:
    g.add_argument("--epochs", type=int, default=1400)
    g.add_argument("--max-train-steps", type=int, default=1_000_000)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--learning-rate", type=finite_float(0, lo_open=True), default=1e-4)
    g.add_argument("--adam-beta1", type=finite_float(0, 1, hi_open=True), default=0.9)
    g.add_argument("--adam-beta2", type=finite_float(0, 1, hi_open=True), default=0.999)
    g.add_argument("--adam-weight-decay", type=finite_float(0), default=0.0)
    g.add_argument("--adam-epsilon", type=finite_float(0, lo_open=True), default=1e-8)
    g.add_argument("--adamw", default="fused", choices=ADAMW_IMPLS, help="AdamW kernel (fused is fastest on GPU and CPU)")
    g.add_argument("--max-grad-norm", type=finite_float(0, lo_open=True), default=1.0,
                   help="gradient clipping norm (> 0; a large value clips in name only)")
    g.add_argument("--ema-decay", type=finite_float(0, 1, hi_open=True), default=0.9999)
    g.add_argument("--max-bad-steps", type=int, default=20,
                   help="stop after this many consecutive non-finite losses (each is skipped)")


def _add_precision_args(g) -> None:
    g.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="None: `accelerate launch --mixed_precision` (ACCELERATE_MIXED_PRECISION), else `accelerate "
                        "config`'s default file, else bf16 on GPU, no on CPU; the log says which")
    g.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and encoder (None: on for GPU)")
    g.add_argument("--peak-tflops", type=finite_float(0, lo_open=True), default=None,
                   help="device peak for the logged MFU (None: looked up from the GPU name; no MFU on CPU)")
    add_speed_args(g)


def _add_logging_args(g) -> None:
    g.add_argument("--output-dir", default="exps")
    g.add_argument("--exp-name", default=None, help="run folder name (None: derived from the model and method)")
    g.add_argument("--logging-dir", default="logs", help="tracker folder, relative to the run folder")
    g.add_argument("--report-to", default="tensorboard",
                   help=f"tracker(s), as accelerate names them: {', '.join(REPORT_TO_CHOICES)}, or a comma-separated list")
    g.add_argument("--wandb-id", default=None,
                   help="wandb run to continue (any run, the authors' included; None: $WANDB_RUN_ID, else the id in "
                        "the run folder's wandb_run_id.txt, else a new run). $WANDB_RESUME sets the resume mode")
    g.add_argument("--log-every", type=int, default=100,
                   help="steps between logged averages; 1 gives per-step curves as the original (one more host sync "
                        "per step, see docs/compat.md)")
    g.add_argument("--checkpointing-steps", type=int, default=10_000, help="model + EMA are kept at every one")
    g.add_argument("--keep-last", type=int, default=3, help="optimizer states kept (older ones are pruned)")
    g.add_argument("--keep-weights-every", type=int, default=0, metavar="STEPS",
                   help="prune model checkpoints: keep those at multiples of STEPS (a multiple of "
                        "--checkpointing-steps), the newest --keep-weights-last, the best FID and pinned ones "
                        "(docs/training.md#disk); 0 keeps every checkpoint")
    g.add_argument("--keep-weights-last", type=int, default=3, metavar="N",
                   help="with --keep-weights-every: the newest N checkpoints are kept too")
    g.add_argument("--resume-step", type=int, default=0, help="resume from this step; 0 = newest complete checkpoint")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="resume the run in RUN_DIR with the flags of its args.json; flags given here win (classed as "
                        "on any resume, docs/resuming.md), --resume-step is not carried over")
    g.add_argument("--init-from", default=None,
                   help="start from these weights (any checkpoint generate.py loads) with a fresh optimizer at step 0")
    g.add_argument("--sample-every", "--sampling-steps", dest="sample_every", type=int, default=0,
                   help="steps between EMA sample grids (0 = off)")
    g.add_argument("--vae", default=None, help="VAE that decodes sample grids and evaluations (default: "
                   "sd-vae-ft-ema for SD-VAE latents, as the original; the data's own codec otherwise)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--allow-run-change", default=None, metavar="FLAG[,FLAG]",
                   help="resume although these run-defining flags changed (docs/resuming.md); recorded in args.json")


def _add_eval_args(g) -> None:
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations, and the last step (0 = off)")
    g.add_argument("--eval-samples", type=int, default=10_000)
    g.add_argument("--eval-ref", default=None, help="ADM reference batch .npz, or a statistics file from --save-stats")
    g.add_argument("--eval-mode", default="ode", choices=list(SAMPLER_MODES),
                   help="sampler of the evaluation, as generate.py's --mode (unipc: accurate in few --eval-steps)")
    g.add_argument("--eval-steps", type=int, default=50)
    g.add_argument("--eval-cfg", type=finite_float(0), default=1.0, help="1 = no guidance")
    g.add_argument("--eval-cls-cfg", type=finite_float(0), default=0.0)
    g.add_argument("--eval-guidance-high", type=finite_float(0, 1), default=1.0)
    g.add_argument("--eval-batch-size", type=int, default=64, help="per process")
    g.add_argument("--inception-weights", default=None,
                   help="Inception-v3 weights file ('random' for smoke tests; None: $REG_INCEPTION_WEIGHTS, then the "
                        "torch hub cache)")


def add_speed_args(g) -> None:
    """Step speed-ups (docs/performance.md): each exact or within a tolerance pinned by tests/test_speed.py,
    each off by default until measured on a GPU (benchmarks/gpu_check.sh)."""
    g.add_argument("--attn-split", action=argparse.BooleanOptionalAction, default=False,
                   help="the class token's query row in its own attention call (1 + 256 rows tile, 257 do not)")
    g.add_argument("--device-skip", action=argparse.BooleanOptionalAction, default=False,
                   help="skip a non-finite step on the device (fused AdamW's found_inf): no host sync per step; "
                        "skips are counted and --max-bad-steps checked at each log interval")
    g.add_argument("--ema-lerp", action=argparse.BooleanOptionalAction, default=False,
                   help="EMA as one lerp kernel (differs from the original's formula by rounding only)")
    g.add_argument("--ddp-bucket-mb", type=finite_float(0, lo_open=True), default=None, help="DDP gradient bucket size (None: DDP's 25 MB)")
    g.add_argument("--ddp-bucket-view", action=argparse.BooleanOptionalAction, default=False,
                   help="DDP gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy)")
    g.add_argument("--ddp-static-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="DDP static_graph (the same parameters take part in every step, as here)")
    g.add_argument("--ddp-bf16-allreduce", action=argparse.BooleanOptionalAction, default=False,
                   help="all-reduce gradients in bf16 (half the bytes; rounds the averaged gradient to bf16)")
    g.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


def validate_args(args: argparse.Namespace) -> None:
    if args.model not in SiT_models:
        raise UserError(f"unknown --model {args.model!r}; choose from {', '.join(SiT_models)}")
    if args.resolution <= 0 or args.resolution % 16:
        raise UserError(f"--resolution must be a positive multiple of 16, got {args.resolution}")
    if args.method == "sit":
        if args.proj_coeff not in (None, 0):
            raise UserError("--method sit has no alignment loss: drop --proj-coeff or set it to 0")
        args.proj_coeff = 0.0
    elif args.proj_coeff is None:
        args.proj_coeff = 0.5
    # the float flags' finiteness and ranges are checked by their argparse types (utils.finite_float)
    depth = model_depth(args.model)
    if args.encoder_depth is None:
        args.encoder_depth = default_encoder_depth(args.model)
    if args.proj_coeff > 0 and not 1 <= args.encoder_depth <= depth:
        raise UserError(f"--encoder-depth must be in [1, {depth}] for {args.model}, got {args.encoder_depth}")
    if args.method != "sit":
        parse_enc_type(args.enc_type)
    for name in ("batch_size", "gradient_accumulation_steps", "log_every", "checkpointing_steps", "max_train_steps",
                 "epochs", "max_bad_steps", "keep_last", "eval_samples", "eval_steps", "eval_batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    for name in ("sample_every", "eval_every", "resume_step", "num_workers"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    parse_allow_run_change(args.allow_run_change)
    check_retention(args)
    if args.eval_every and not args.eval_ref:
        raise UserError("--eval-every needs --eval-ref (an ADM reference batch .npz or a --save-stats file)")
    if args.device_skip and (args.adamw != "fused" or args.mixed_precision == "fp16"):
        raise UserError("--device-skip needs --adamw fused and no fp16 (whose GradScaler skips steps itself)")
    if args.ddp_bucket_mb is not None and args.ddp_bucket_mb <= 0:
        raise UserError("--ddp-bucket-mb must be positive")
    if args.resume and os.path.abspath(os.path.join(args.output_dir, args.exp_name)) != os.path.abspath(args.resume):
        raise UserError(f"--resume {args.resume} and --output-dir/--exp-name "
                        f"{os.path.join(args.output_dir, args.exp_name)} name different run folders: give one")
    if args.init_from and args.resume_step:
        raise UserError("--init-from starts a new run at step 0; it cannot be combined with --resume-step")
    if args.projector_dim <= 0 or args.num_classes <= 0:
        raise UserError("--projector-dim and --num-classes must be positive")
    if (args.eval_every or args.sample_every) and args.seed < 0:
        raise UserError(f"--seed {args.seed}: the evaluation and the sample grids draw image i from (--seed, i), "
                        "which needs --seed >= 0")
    if args.eval_every and args.eval_samples < 2:
        raise UserError("--eval-samples must be >= 2 (an FID needs a covariance)")
    if args.eval_every and not os.path.isfile(args.eval_ref):
        raise UserError(f"--eval-ref {args.eval_ref} is not a file")
    if args.wandb_id is not None:  # kept in the run folder: a bad id would fail every rerun
        check_wandb_id(args.wandb_id, "--wandb-id")
    if "wandb" in parse_report_to(args.report_to):  # unknown or missing tracker packages fail here, not after start-up
        check_wandb_env(args.wandb_id)
    if args.exp_name is not None and (not args.exp_name.strip() or args.exp_name in (".", "..")):
        raise UserError(f"--exp-name {args.exp_name!r} is not a folder name")
    if args.exp_name is None:
        enc = args.enc_type if args.method != "sit" else "noenc"
        args.exp_name = f"{args.model.replace('/', '-')}-{args.method}-{args.path_type}-{enc}"


def check_retention(args: argparse.Namespace) -> None:
    """--keep-weights-every / --keep-weights-last (the retention policy of model checkpoints)."""
    every = args.keep_weights_every
    if every < 0 or every % args.checkpointing_steps:
        raise UserError(f"--keep-weights-every {every} must be 0 (keep every checkpoint) or a multiple of "
                        f"--checkpointing-steps {args.checkpointing_steps}")
    if args.keep_weights_last < 1:
        raise UserError(f"--keep-weights-last must be >= 1 (the newest checkpoint is always kept), got "
                        f"{args.keep_weights_last}")


# ----------------------------------------------------------------------------- logging

class Logger:
    """log.txt, metrics.jsonl and stdout, on the main process only."""

    def __init__(self, accelerator, run_dir: Path):
        self.acc, self.run_dir = accelerator, run_dir

    def info(self, msg: str) -> None:
        if self.acc.is_main_process:
            from tqdm import tqdm
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            tqdm.write(line)
            append_text(self.run_dir / "log.txt", line + "\n")

    def metrics(self, record: dict, *, tracker: bool = True) -> None:
        """One line of metrics.jsonl (the machine-readable twin of log.txt) and the tracker."""
        if tracker and self.acc.log_with:
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.acc.is_main_process:
            append_record(self.run_dir / METRICS_FILE, record)  # strict JSON: a non-finite value is null

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.run_dir / METRICS_FILE, warn=self.info)

    def set_aside_metrics(self, step: int, ckpts: CheckpointDir, aside: Path | None) -> None:
        """Move metrics.jsonl lines after `step`, the step this run starts from (0 for a fresh start), into the
        folder of the set-aside checkpoints, or a new abandoned-<time>/ (never deleted): they are another
        attempt's, one that ended before its next checkpoint, and this run must not inherit them."""
        if not self.acc.is_main_process:
            return
        records = self.read_metrics()
        later = [r for r in records if r.get("step", 0) > step]
        if not later:
            return
        aside = aside or ckpts.aside_folder()
        write_records(aside / METRICS_FILE, later)
        write_records(self.run_dir / METRICS_FILE, [r for r in records if r.get("step", 0) <= step])
        self.info(f"{len(later)} metrics.jsonl line(s) after step {step}, of an attempt that ended before its next "
                  f"checkpoint, moved to {aside / METRICS_FILE}")


# ----------------------------------------------------------------------------- set-up pieces

def make_accelerator(args: argparse.Namespace, run_dir: Path):
    """The Accelerator, and where its mixed precision came from (reg.mixed_precision.resolve_mixed_precision)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from accelerate.utils.dataclasses import DDPCommunicationHookType
    cuda = torch.cuda.is_available()
    # every trainable parameter takes part in every step: no unused-parameter search
    ddp = dict(find_unused_parameters=False, gradient_as_bucket_view=args.ddp_bucket_view,
               static_graph=args.ddp_static_graph)
    if args.ddp_bucket_mb is not None:
        ddp["bucket_cap_mb"] = args.ddp_bucket_mb
    if args.ddp_bf16_allreduce:
        ddp["comm_hook"] = DDPCommunicationHookType.BF16
    precision, source = resolve_mixed_precision(args.mixed_precision, cuda=cuda)
    trackers = parse_report_to(args.report_to)
    return Accelerator(
        cpu=not cuda,  # without a GPU, a torchrun-style launch runs DDP over gloo
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(**ddp)],
    ), source


def model_config(args: argparse.Namespace, dataset: CustomDataset, encoders: list) -> dict:
    """Everything needed to rebuild the model and sample from it; saved with every checkpoint."""
    use_cls = args.method == "reg"
    vae = dataset.vae_info
    return {
        "model": args.model, "input_size": args.resolution // dataset.vae_stride,
        "in_channels": int(vae["latent_channels"]), "num_classes": args.num_classes,
        "z_dims": [e.embed_dim for e in encoders] if args.proj_coeff > 0 else [],
        "encoder_depth": args.encoder_depth, "projector_dim": args.projector_dim, "use_cls_token": use_cls,
        "cls_token_dim": encoders[-1].embed_dim if use_cls else None,  # REG's class token: the last encoder's
        "qk_norm": args.qk_norm,
        "fused_attn": args.fused_attn, "class_dropout_prob": CLASS_DROPOUT_PROB, "path_type": args.path_type,
        "resolution": args.resolution, "latents_scale": float(vae["scaling_factor"]),
        # which VAE encoded the data, and which decodes samples (ft-ema for SD-VAE latents, as the authors)
        "encode_vae": portable_vae_spec(vae.get("name")) if vae.get("name") else None,
        "vae": portable_vae_spec(args.vae or decoding_vae(vae.get("name"))),
        "enc_type": args.enc_type if encoders else None,
        "encoder_acts": encoder_activations(args.enc_type) if encoders else None,  # warn_encoder_activations
        "method": args.method,
    }


def restore(args: argparse.Namespace, ckpts: CheckpointDir, model, ema, opt, log: Logger) -> int:
    """Resume (newest checkpoint, or --resume-step), else --init-from, else nothing. Returns the step.
    A resume compares the command line with the checkpoint's args first (reg.resume_flags.check_resume)."""
    if not log.acc.is_main_process:
        read_metrics(log.run_dir / METRICS_FILE)  # a broken line raises on every rank alike, not on rank 0 alone
    elif warning := trim_torn_tail(log.run_dir / METRICS_FILE):
        log.info(warning)  # a kill mid-append; the next append must start on a line of its own
    ckpt = ckpts.load_for_resume(args.resume_step)
    args.history = []
    if ckpt is None:
        if args.init_from:
            hint = "--init-from takes weights of the model this command line builds (--model, --num-classes, ...)"
            load_into(model, read_weights(args.init_from, use_ema=False)[0], source=f"--init-from {args.init_from}",
                      hint=hint)
            load_into(ema, read_weights(args.init_from, use_ema=True)[0], source=f"--init-from {args.init_from}",
                      hint=hint)
            log.info(f"initialised model and EMA from {args.init_from}; fresh optimizer, step 0")
        log.set_aside_metrics(0, ckpts, None)
        return 0
    step = int(ckpt["steps"])
    changed = check_resume(ckpt.get("args"), args, step=step, where=str(ckpts.pt(step)))  # refuses run changes
    hint = ("the model this command line builds differs from the run's; --allow-run-change cannot change its "
            "architecture: start a new run (another --exp-name) with --init-from instead")
    load_into(model, ckpt["model"], source=f"checkpoint {ckpts.pt(step)}", hint=hint)
    load_into(ema, ckpt["ema"], source=f"checkpoint {ckpts.pt(step)}", hint=hint)
    opt.load_state_dict(ckpt["opt"])
    keep_label_dropout(ckpt, model, log)
    warn_class_token_source(ckpt, log)
    warn_encoder_activations(ckpt, log)
    apply_optimizer_flags(args, opt)  # after the state: load_state_dict restored the old lr, betas, ...
    if changed:
        log.info(f"resumed with changed flags (applied from step {step}, recorded in args.json): "
                 + ", ".join(f"{c}{'' if c.kind == HYPER else ' (run-defining, --allow-run-change)'}" for c in changed))
    if args.init_from:
        log.info(f"--init-from {args.init_from} ignored: the run folder has checkpoints, resuming instead")
    if ckpt["official"]:
        log.info("this checkpoint was written by the original REG code: model, EMA, optimizer and step are "
                 "restored; its random state and data order cannot be, so later batches differ from the original's")
    aside = ckpts.set_aside_after(step) if log.acc.is_main_process else None
    if aside is not None:
        log.info(f"resumed from an earlier step than the newest: later checkpoints moved to {aside}")
    log.set_aside_metrics(step, ckpts, aside)
    log.info(f"resumed from {ckpts.pt(step)} at step {step}")
    return step


def keep_label_dropout(ckpt: dict, model, log: Logger) -> None:
    """Runs of ours started before --cfg-prob took the authors' meaning stored it as the model's label
    dropout (config `class_dropout_prob`): such a run continues with its own value, never another objective."""
    stored = ckpt["config"].get("class_dropout_prob") if not ckpt["official"] else None
    if stored is not None and float(stored) != model.y_embedder.dropout_prob:
        model.y_embedder.dropout_prob = float(stored)
        log.info(f"label dropout {stored} kept from the checkpoint (it was --cfg-prob when this run started; "
                 f"new runs always use {CLASS_DROPOUT_PROB}, as the original)")


def warn_encoder_activations(ckpt: dict, log: Logger) -> None:
    """A run whose encoders now run another activation than when it started (its config's `encoder_acts`;
    runs of ours from before it was recorded ran timm's exact GELU in CLIP-L and SigLIP 2, which now use
    QuickGELU and the tanh GELU of their originals): its REPA and class-token targets change from this step."""
    config = ckpt["config"] if not ckpt["official"] else {}
    if not config or not config.get("enc_type"):
        return
    try:
        now = encoder_activations(config["enc_type"])
    except UserError:
        return  # an encoder this version does not know: the command line's --enc-type is refused elsewhere
    then = config.get("encoder_acts") or dict.fromkeys(now, "default")
    changed = {n: (then.get(n, "default"), a) for n, a in now.items() if then.get(n, "default") != a}
    if changed:
        log.info("WARNING: this run started with other encoder activations ("
                 + ", ".join(f"{n}: {old} -> {new}" for n, (old, new) in changed.items())
                 + "; 'default' is timm's exact GELU): its REPA and class-token targets change from this step on "
                   "(docs/encoders.md); finish it with the version it started with to keep them")


def warn_class_token_source(ckpt: dict, log: Logger) -> None:
    """Runs of ours written before `encode_vae` was recorded took REG's class token from the FIRST of several
    encoders; it is now the last one's, as in REG. Same widths: the run goes on with the new target (said
    here); other widths: the class-token layers do not load (the strict load names them)."""
    config = ckpt["config"] if not ckpt["official"] else {}
    enc_type = config.get("enc_type") or ""
    if config and "encode_vae" not in config and config.get("use_cls_token") and "," in enc_type:
        log.info(f"WARNING: this run ({enc_type}) started when REG's class token came from the first encoder; "
                 f"it now comes from the last, as in the original code")


def apply_optimizer_flags(args: argparse.Namespace, opt: torch.optim.Optimizer) -> None:
    """The command line's lr, betas, weight decay and eps in every param group (a resumed optimizer
    state carries the values it was saved with; the ones in effect are the command line's)."""
    for group in opt.param_groups:
        group.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                     weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def write_run_files(args: argparse.Namespace, config: dict, accelerator, log: Logger) -> None:
    """args.json (the command line in effect, as resumes compare it), config.json, and the trackers."""
    if accelerator.is_main_process:
        atomic_json_dump(vars(args), log.run_dir / "args.json")
        atomic_json_dump(config, log.run_dir / "config.json")
    init_trackers(args, accelerator, log.run_dir, log)


def init_trackers(args: argparse.Namespace, accelerator, run_dir: Path, log: Logger | None = None) -> None:
    """wandb: the run is named after --exp-name, its files go under the run folder and its id is kept
    there (reg.trackers.wandb_run: --wandb-id > $WANDB_RUN_ID > wandb_run_id.txt), so an auto-resumed
    run continues the same wandb run. $WANDB_PROJECT names the project (default REG, as the original)."""
    trackers = parse_report_to(args.report_to)
    if not trackers:
        return
    kwargs, project = {}, "REG"
    if "wandb" in trackers:
        run_id, resume, source = wandb_run(run_dir, args.wandb_id, write=accelerator.is_main_process)
        project = os.environ.get("WANDB_PROJECT") or project
        kwargs = {"wandb": {"name": args.exp_name, "dir": str(run_dir), "resume": resume, "id": run_id}}
        if log is not None:
            log.info(f"wandb run {run_id} ({source}), project {project}, resume {resume!r}")
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(project, config=config, init_kwargs=kwargs)


# ----------------------------------------------------------------------------- main

@processes.command("train.py")  # SLURM launch check, stop signals, the run folder's lock released at the end
def main(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    # ---- set-up: accelerator, run folder, precision
    accelerator, precision_source, log, ckpts = setup_run(args)
    device, rank, world, run_dir = accelerator.device, accelerator.process_index, accelerator.num_processes, log.run_dir
    # initialisation, the same on every rank: DDP broadcasts rank 0's weights, but the EMA copy is made before
    # (a rank-dependent seed, as the original's, gave every other rank its own EMA start); each step reseeds below
    torch.manual_seed(step_seed(args.seed, 0, -1))

    # ---- data, encoders, model, EMA, optimizer
    dataset = load_dataset(args, accelerator, log)
    model, ema, opt, encoders, config, step = build_models(args, dataset, ckpts, log, device)
    check_data(args, dataset, step, accelerator, log)  # at every start and resume, before the first step
    flops = training_flops_per_image(model, encoders, cls_dim=config["cls_token_dim"], resolution=args.resolution)

    # ---- wrap for DDP / mixed precision / compile, and the data order that follows from the step
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    ddp_model, opt = accelerator.prepare(model, opt)  # opt too: under fp16 the GradScaler steps through it
    mode = None if args.compile_mode == "default" else args.compile_mode
    train_model = torch.compile(ddp_model, mode=mode) if use_compile else ddp_model
    encoders = [torch.compile(e, mode=mode) for e in encoders] if use_compile else encoders
    loader, max_steps = make_loader(args, dataset, step, rank=rank, world=world, device=device)
    step_cfg = step_config(args, config)

    write_run_files(args, config, accelerator, log)  # args.json, config.json, the trackers
    log.info(f"{args.model} ({args.method}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"{len(dataset)} images ({dataset.layout}), global batch {args.batch_size} x "
             f"{args.gradient_accumulation_steps} accumulation, {world} processes, precision "
             f"{accelerator.mixed_precision} (from {precision_source}), compile {use_compile}, {flops / 1e9:.1f} GFLOPs/image, "
             f"steps {step} -> {max_steps}")
    evaluator, write_preview = make_samplers(args, config, accelerator, log, ema, step, max_steps)

    # ---- the loop
    meter = Meter(accelerator, images_per_step=args.batch_size * args.gradient_accumulation_steps,
                  flops_per_image=flops, peak=peak_tflops(device, args.peak_tflops), proj_coeff=args.proj_coeff,
                  cls_coeff=args.cls, step=step)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    data_iter, history, saved_at = iter(loader), [], step  # saved_at: the last checkpoint's step (or the start)
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    stop = stop_signals.StepStop(world)  # SIGTERM/SIGUSR1 on any rank: every rank stops at the same step
    model.train()
    while step < max_steps:
        torch.manual_seed(step_seed(args.seed, rank, step))  # exact resume without saved RNG states
        batches = [next(data_iter) for _ in range(args.gradient_accumulation_steps)]
        bad = sum(b[3].sum() for b in batches) if args.skip_bad_samples else 0
        batches = [tuple(t.to(device, non_blocking=True) for t in b[:3]) for b in batches]
        result = train_step(batches, model=train_model, params=params, ema_params=ema_params, opt=opt,
                            encoders=encoders, accelerator=accelerator, step_cfg=step_cfg)
        step += 1
        bar.update(1)
        meter.add(result.terms, result.finite, bad)
        if not isinstance(result.finite, torch.Tensor) and not result.finite:  # --device-skip: at the log step
            check_bad_step(args, meter, step, ckpts, log, fp16=accelerator.scaler is not None)
        if step % args.log_every == 0 or step == max_steps:
            history.append(log_interval(args, meter, step, opt, ckpts, log))
            bar.set_postfix_str(progress_text(history[-1]), refresh=False)  # the interval's average: no extra sync
        if step % args.checkpointing_steps == 0 or step == max_steps:
            if save_checkpoint(accelerator, ckpts, step, model, ema, opt, config, args, meter, log,
                               saved_at=saved_at, final=step == max_steps):
                saved_at = step
        if evaluator is not None and evaluator.due(step, max_steps):
            try:
                evaluator.run(ema, step)
            except EvalStopped:  # a signal during the evaluation: this step's checkpoint, then exit
                stop.close()
                stop_at_step(accelerator, ckpts, step, model, ema, opt, config, args, meter, log, saved_at)
        if write_preview is not None and (step % args.sample_every == 0 or step == max_steps):
            write_preview(ema, step, run_dir, accelerator)
        if stop.due(step) and step < max_steps:
            stop_at_step(accelerator, ckpts, step, model, ema, opt, config, args, meter, log, saved_at)
    stop.close()
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    log.info(f"done: {step} steps, {meter.skipped_total} skipped; checkpoints in {ckpts.path}")
    return {"steps": step, "history": history, "run_dir": str(run_dir), "skipped": meter.skipped_total}


def make_samplers(args: argparse.Namespace, config: dict, accelerator, log: Logger, ema, step: int,
                  max_steps: int) -> tuple:
    """(the FID evaluator of --eval-every, the grid writer of --sample-every), each None when off. A run that
    was stopped or killed during the evaluation or the grid of the step it resumes from makes them now."""
    evaluator = InTrainingEval(args, config, accelerator, log) if args.eval_every else None
    write_preview = None
    if args.sample_every and accelerator.is_main_process:
        write_preview = make_preview_writer(args, config, accelerator.device, log)
        if step and step % args.sample_every == 0:
            write_preview(ema, step, log.run_dir, accelerator, missing_only=True)
    if evaluator is not None and step and evaluator.due(step, max_steps):
        try:
            evaluator.run(ema, step)
        except EvalStopped:  # its checkpoint exists: nothing else to save
            raise stop_signals.stopped(f"the evaluation of step {step} runs again on resume",
                                       is_main=accelerator.is_main_process) from None
    return evaluator, write_preview


def setup_run(args: argparse.Namespace) -> tuple:
    """The Accelerator and its precision's source, the log and the checkpoint folder; the run folder is
    held (reg.folder_lock.hold_folder) and its unfinished checkpoint writes are cleaned."""
    run_dir = Path(args.output_dir) / args.exp_name
    accelerator, precision_source = make_accelerator(args, run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    folder_lock.hold_folder(run_dir, hint="choose another --output-dir/--exp-name", rank=rank, world=world)
    log = Logger(accelerator, run_dir)
    ckpts = CheckpointDir(run_dir / "checkpoints", log=log.info)
    if accelerator.is_main_process:
        ckpts.path.mkdir(parents=True, exist_ok=True)
        ckpts.clean_stale()
    accelerator.wait_for_everyone()
    if args.allow_tf32:
        set_fp32_precision("tf32")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    return accelerator, precision_source, log, ckpts


def load_dataset(args: argparse.Namespace, accelerator, log: Logger) -> CustomDataset:
    """The dataset; rank 0 first, so that only it builds the data index (once) and the others load it. An error
    of rank 0 is raised by every rank after the barrier, none left waiting."""
    def make() -> CustomDataset:
        return CustomDataset(args.data_dir, resolution=args.resolution, num_classes=args.num_classes,
                             skip_bad_samples=args.skip_bad_samples, report=log.info)
    dataset, error = None, None
    if accelerator.is_main_process:
        try:
            dataset = make()
        except Exception as e:  # re-raised below, after the barrier
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    if dataset is None:
        dataset = make()
    if len(dataset) < args.batch_size:
        raise UserError(f"--data-dir {args.data_dir} holds {len(dataset)} items, fewer than one global batch "
                        f"(--batch-size {args.batch_size})")
    return dataset


def check_data(args: argparse.Namespace, dataset: CustomDataset, step: int, accelerator, log: Logger) -> None:
    """--data-check: the data against encode's record (reg.data_check.check_content), each rank hashing its share of a
    sample seeded by (--seed, step); the first difference on any rank stops every rank, naming the file."""
    from accelerate.utils import gather_object
    rank, world = accelerator.process_index, accelerator.num_processes
    problem, checked = check_content(dataset, args.data_check, seed=(args.seed, step), rank=rank, world=world)
    problems = [p for p in (gather_object([problem]) if world > 1 else [problem]) if p]
    if problems:
        raise UserError(problems[0])
    log.info(checked)


def build_models(args: argparse.Namespace, dataset: CustomDataset, ckpts: CheckpointDir, log: Logger,
                 device: torch.device) -> tuple:
    """(model, ema, opt, encoders, config, step): the encoders, the model and its EMA copy and the
    optimizer, restored from the run's checkpoint (or --init-from); `step` is where the run goes on."""
    encoders = []
    if args.method == "reg" or args.proj_coeff > 0:  # plain SiT never loads the encoder
        encoders = load_encoders(args.enc_type, weights=args.enc_weights, resolution=args.resolution, device=device)
        if "random" in (args.enc_weights, os.environ.get("REG_ENC_WEIGHTS")):
            log.info("WARNING: encoders use RANDOM weights (smoke test only)")
    config = model_config(args, dataset, encoders)
    model = build_model_from_config(config).to(device)
    model.attn_split = args.attn_split  # a runtime switch, not in the config (the EMA copy inherits it)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, impl=args.adamw)
    step = restore(args, ckpts, model, ema, opt, log)
    config["class_dropout_prob"] = model.y_embedder.dropout_prob  # as kept by restore
    return model, ema, opt, encoders, config, step


def make_loader(args: argparse.Namespace, dataset: CustomDataset, step: int, *, rank: int, world: int,
                device: torch.device) -> tuple[DataLoader, int]:
    """The loader that goes on from `step` (StepSampler: the data order is a function of the step), and
    the last step (--max-train-steps or --epochs, whichever comes first)."""
    local_batch = args.batch_size // world
    sampler = StepSampler(len(dataset), local_batch=local_batch, rank=rank, world=world, seed=args.seed,
                          start_batch=step * args.gradient_accumulation_steps)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0,
                        generator=torch.Generator())  # its own RNG: creating it must not consume the global one
    max_steps = min(args.max_train_steps, args.epochs * sampler.batches_per_epoch // args.gradient_accumulation_steps)
    return loader, max_steps


def step_config(args: argparse.Namespace, config: dict) -> StepConfig:
    """What reg.train_step.train_step needs from the command line and the model's config."""
    return StepConfig(path_type=args.path_type, weighting=args.weighting, prediction=args.prediction,
                      proj_coeff=args.proj_coeff, cls_coeff=args.cls, max_grad_norm=args.max_grad_norm,
                      ema_decay=args.ema_decay, latents_scale=config["latents_scale"], use_cls=config["use_cls_token"],
                      use_proj=bool(config["z_dims"]), num_classes=args.num_classes,
                      legacy_drop_prob=args.cfg_prob if args.legacy else 0.0, device_skip=args.device_skip,
                      ema_lerp=args.ema_lerp)


def log_interval(args: argparse.Namespace, meter: Meter, step: int, opt, ckpts: CheckpointDir, log: Logger) -> dict:
    """The averages since the last log line: metrics.jsonl, the tracker and log.txt; --device-skip's
    skips are checked here. Returns the record."""
    record = meter.flush(step, opt.param_groups[0]["lr"])
    log.metrics(record)
    log.info(f"step {step:07d} " + " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
    if meter.longest_run:
        check_bad_interval(args, meter, step, ckpts, log)
    return record


def progress_text(record: dict) -> str:
    """The progress bar's loss: the average of the last log interval (`record`, from Meter.flush)."""
    return f"loss={record['loss']:.4f}" if "loss" in record else "loss=n/a (every step skipped)"


def check_bad_step(args, meter: Meter, step: int, ckpts: CheckpointDir, log: Logger, fp16: bool) -> None:
    hint = " (fp16 loss-scale overflows are normal in the first steps)" if fp16 else ""
    log.info(f"step {step}: non-finite loss or gradient, update skipped ({meter.skipped_run} in a row, "
             f"{meter.skipped_total} in all){hint}")
    if meter.skipped_run >= args.max_bad_steps:
        raise RuntimeError(
            f"{meter.skipped_run} consecutive non-finite losses at step {step} (limit --max-bad-steps "
            f"{args.max_bad_steps}); stopping. {last_good_checkpoint(ckpts, step - meter.skipped_run + 1)} "
            "Check the data for NaN latents, lower --learning-rate, or use bf16 instead of fp16.")


def check_bad_interval(args, meter: Meter, step: int, ckpts: CheckpointDir, log: Logger) -> None:
    """--device-skip: the skips are known at the log interval only, so --max-bad-steps is checked there
    against the longest run of consecutive skips in the interval (the run stops up to --log-every steps
    later than without the flag)."""
    log.info(f"steps up to {step}: non-finite loss or gradient, updates skipped (longest run in this interval "
             f"{meter.longest_run}, {meter.skipped_total} in all)")
    if meter.longest_run >= args.max_bad_steps:
        meter.skipped_run = max(meter.skipped_run, meter.longest_run)
        check_bad_step(args, meter, step, ckpts, log, fp16=False)


def last_good_checkpoint(ckpts: CheckpointDir, first_skipped: int) -> str:
    """Names the newest checkpoint from before the first skipped step of the current run of skips: one
    written later holds the weights that diverged (finite, but producing non-finite losses)."""
    good = [s for s in ckpts.steps() if s < first_skipped]
    if not good:
        return f"No checkpoint was written before step {first_skipped}, the first skipped one."
    return (f"The last checkpoint from before step {first_skipped}, the first skipped one, is {ckpts.pt(good[-1])} "
            f"(resume it with --resume-step {good[-1]}).")


def stop_at_step(accelerator, ckpts: CheckpointDir, step: int, model, ema, opt, config: dict,
                 args: argparse.Namespace, meter: Meter, log: Logger, saved_at: int) -> None:
    """A stop signal: log the steps since the last log line, write a full checkpoint at this step (a normal
    one: pruning, --resume-step and set-aside apply) unless one was just written, and exit with
    reg.stop_signals.EXIT_STOPPED (docs/cluster.md)."""
    if meter.last_step != step:
        log.metrics(meter.flush(step, opt.param_groups[0]["lr"]))
    if saved_at != step:
        save_checkpoint(accelerator, ckpts, step, model, ema, opt, config, args, meter, log, saved_at=saved_at)
    log.info(f"stopped by {stop_signals.stop_requested() or 'a signal on another process'} at step {step}")
    raise stop_signals.stopped(f"checkpoint {ckpts.pt(step)} written", is_main=accelerator.is_main_process)


def save_checkpoint(accelerator, ckpts: CheckpointDir, step: int, model, ema, opt, config: dict,
                    args: argparse.Namespace, meter: Meter, log: Logger, *, saved_at: int = 0,
                    final: bool = False) -> bool:
    """Write checkpoint `step`, unless every step since the last checkpoint (step `saved_at`, or the
    start of the run) was skipped: that would save the weights that diverged again, under a newer name
    that a resume would pick. Returns whether it was written; raises on the last step instead."""
    meter.sync_counts()  # --device-skip: the skips made so far (a no-op otherwise)
    if meter.skipped_run >= step - saved_at:
        since = f"checkpoint {saved_at}" if saved_at and saved_at in ckpts.steps() else f"step {saved_at}"
        message = (f"no update was made since {since} (every step up to {step} had a non-finite loss or "
                   f"gradient); not saving checkpoint {step}")
        if final:
            raise RuntimeError(f"{message}. {last_good_checkpoint(ckpts, step - meter.skipped_run + 1)} "
                               "Check the data and the checkpoint it resumed from.")
        log.info(f"WARNING: {message}")
        return False
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
        ckpts.save(step, model=cpu(model), ema=cpu(ema), opt=opt.state_dict(), config=config, args=vars(args))
        ckpts.prune_optimizer_states(args.keep_last)
        log.info(f"saved checkpoint {ckpts.pt(step)}")
        apply_retention(args, ckpts, log)
    accelerator.wait_for_everyone()
    return True


def apply_retention(args: argparse.Namespace, ckpts: CheckpointDir, log: Logger) -> None:
    """The retention policy, after a checkpoint is written (main process): besides the steps it keeps, the
    checkpoint of the best FID in metrics.jsonl stays, and pinned ones (reg.checkpoints.pin_checkpoint)."""
    if not args.keep_weights_every:
        return
    best = best_fid_step(log.read_metrics())
    protect = [] if best is None else [best]
    if pruned := ckpts.prune_weights(args.keep_weights_every, args.keep_weights_last, protect=protect):
        log.info(f"pruned checkpoints {', '.join(map(str, pruned))} (--keep-weights-every {args.keep_weights_every}, "
                 f"--keep-weights-last {args.keep_weights_last})")


# ----------------------------------------------------------------------------- EMA samples and evaluation

def make_preview_writer(args: argparse.Namespace, config: dict, device: torch.device, log: Logger):
    """The writer of the preview grids of --sample-every (samples/STEP.png): 16 EMA images, the same seeds every
    time (SDE, 50 steps, no guidance); unrelated to generate.py's --grid (reg/class_grid.py)."""
    from torchvision.utils import make_grid, save_image

    from models.vae import load_vae
    from reg.seeded_images import NonFiniteSampleError, generate_images

    vae = load_vae(config["vae"], device=device)  # fails at start-up, not hours into the run

    def sample(ema, step: int, run_dir: Path, accelerator, missing_only: bool = False) -> None:
        path = run_dir / "samples" / f"{step:07d}.png"
        if stop_signals.stop_requested() or (missing_only and path.is_file()):
            return  # a stop: save the checkpoint first; a resumed run makes the grid it missed
        try:
            images = torch.cat([img for _, img, _ in generate_images(
                ema, vae, range(16), global_seed=args.seed, num_classes=config["num_classes"], balanced=True,
                mode="sde", num_steps=50, cfg_scale=1.0, cls_cfg_scale=0.0, path_type=config["path_type"],
                latents_scale=config["latents_scale"], batch_size=16, device=device)])  # (16, H, W, 3) uint8
        except NonFiniteSampleError as e:  # no black grid; the weights are checked at every checkpoint
            log.info(f"WARNING: sample grid at step {step} skipped: {e}")
            return
        grid = make_grid(images.permute(0, 3, 1, 2).float() / 255, nrow=4, padding=0)  # (3, 4H, 4W)
        atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
        trackers = parse_report_to(args.report_to)
        if "tensorboard" in trackers:
            accelerator.get_tracker("tensorboard", unwrap=True).add_image("samples", grid, step)
        if "wandb" in trackers:
            import wandb
            accelerator.get_tracker("wandb").log({"samples": wandb.Image(str(path))}, step=step)

    return sample


if __name__ == "__main__":
    run_main(main, parse_args, user_errors=(CheckpointError,))
