"""Speed benchmarks of the shipped code, each against a baseline measured in the same run.

    python -m benchmarks.run                                  # GPU: SiT-B/2 and SiT-XL/2, all sections
    python -m benchmarks.run --quick                          # tiny sizes; automatic on CPU
    python -m benchmarks.run --sections train --models SiT-XL/2 --out xl.json

1. train:  `reg.train_step.train_step` (the function train.py runs) on a synthetic batch. Two settings of the
   same function, built as train.py builds them:
   baseline  = Accelerator(mixed_precision="no"), eager, make_optimizer(impl="for-loop") (the original's
               precision-free, uncompiled, per-parameter AdamW);
   optimised = train.py's defaults: bf16 on GPU, torch.compile of model and encoder on GPU, fused AdamW.
   Step k is seeded as train.py seeds it, and both start from the same weights, so step 0 computes the
   same loss: the run prints both and their difference. Also FLOPs per image
   (`training_flops_per_image`), TFLOP/s, MFU (`peak_tflops`), peak memory and compile (warm-up) time.
2. sample: `reg.seeded_images.generate_images` (generate.py's loop) with the 250-step SDE, cfg 2.3, cls-cfg 2.3,
   guidance t <= 0.85: eager fp32 vs compiled bf16.
3. eval:   Inception features in images/s (ADM's synchronous batches of 64 vs the evaluator's prefetching
   reader), and the five ADM metrics on 50K x 10K random features; their sum estimates a 50K evaluation.

Weights are random (speed does not depend on them). Timings are printed and written as JSON (--out),
never asserted. On a CPU the run is the --quick one, on one thread, and exists so that it cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from models.encoders import load_encoders
from models.sit import build_model, parse_model_name
from reg.seeded_images import generate_images
from reg.throughput import peak_tflops, training_flops_per_image
from reg.train_step import StepConfig, make_optimizer, step_seed, train_step
from reg.utils import ArgumentParser, finite_float, fp32_precision, nan_to_null

CFG_SCALE, CLS_CFG_SCALE, GUIDANCE_HIGH = 2.3, 2.3, 0.85  # REG eval.sh / generate.py settings
ADM_EVAL_BATCH = 64  # ADM's evaluator feeds Inception 64 images at a time
FULL = dict(models="SiT-B/2,SiT-XL/2", batch_size=32, resolution=256, enc_type="dinov2-vit-b", warmup=3, steps=10,
            sample_model="SiT-XL/2", sample_batch=32, sample_steps=250, eval_images=5000, eval_batch=100,
            metric_samples=50_000, metric_refs=10_000)
QUICK = dict(models="SiT-T/2", batch_size=4, resolution=32, enc_type="dinov2-vit-s", warmup=1, steps=2,
             sample_model="SiT-T/2", sample_batch=4, sample_steps=10, eval_images=2, eval_batch=2,
             metric_samples=0, metric_refs=200)
SECTIONS = ("train", "sample", "eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny sizes (SiT-T/2, 32 px); automatic on CPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=None, help="also write every figure as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU: steadier on a shared box)")
    p.add_argument("--precision", choices=["no", "bf16"], default=None,
                   help="the optimised arm's mixed precision (default: bf16 on GPU, no on CPU, as train.py)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in the optimised arms (default: on GPU only, as train.py)")
    p.add_argument("--compile-backend", default="inductor", help="'aot_eager' only traces (for CPU tests)")
    p.add_argument("--adamw", default="fused", choices=["fused", "foreach", "for-loop"], help="optimised arm's AdamW")
    p.add_argument("--peak-tflops", type=finite_float(0, lo_open=True), default=None, help="device bf16 peak for the MFU (default: by GPU name)")
    p.add_argument("--models", default=None, help=f"comma-separated (full: {FULL['models']})")
    for key in ("batch_size", "resolution", "warmup", "steps", "sample_batch", "sample_steps", "eval_images",
                "eval_batch", "metric_samples", "metric_refs"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"full: {FULL[key]}")
    p.add_argument("--enc-type", default=None, help=f"encoder in the step, random weights (full: {FULL['enc_type']})")
    p.add_argument("--sample-model", default=None, help=f"full: {FULL['sample_model']}")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    args.quick = args.quick or args.device == "cpu"
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.compile = cuda if args.compile is None else args.compile
    args.threads = (0 if cuda else 1) if args.threads is None else args.threads
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        if not args.sections or set(args.sections) - set(SECTIONS):
            raise ValueError(f"--sections must be a subset of {','.join(SECTIONS)}, got {args.sections}")
        for name in [*args.models, args.sample_model]:
            parse_model_name(name)
        if args.warmup < 1 or args.steps < 1:
            raise ValueError("--warmup and --steps must be >= 1 (step 0 compiles and is never timed)")
    except ValueError as e:
        p.error(str(e))
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def compile_kwargs(args: argparse.Namespace) -> dict:
    return {"backend": args.compile_backend}


def quiet_encoders(enc_type: str, resolution: int, device: torch.device) -> list:
    with warnings.catch_warnings():  # the random-weights banner: expected, speed only
        warnings.simplefilter("ignore")
        return load_encoders(enc_type, weights="random", resolution=resolution, device=device)


def sit_kwargs(name: str, resolution: int, z_dim: int) -> dict:
    """The paper's REG model at this resolution (encoder depth 4 for S/B/T, 8 for L/XL; REG train.sh)."""
    depth = 8 if parse_model_name(name)[0] in ("L", "XL") else 4
    return dict(input_size=resolution // 8, in_channels=4, num_classes=1000, z_dims=[z_dim], encoder_depth=depth,
                use_cls_token=True, cls_token_dim=z_dim, fused_attn=True)


# ----------------------------------------------------------------------------- 1. training step

def make_batch(n: int, resolution: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """What train.py's loader delivers: uint8 images (N, 3, R, R), VAE moments (N, 8, R/8, R/8), labels."""
    g = torch.Generator().manual_seed(seed)
    lat = resolution // 8
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=g)
    moments = torch.cat([torch.randn(n, 4, lat, lat, generator=g) * 5, torch.rand(n, 4, lat, lat, generator=g) * 0.1], 1)
    labels = torch.randint(0, 1000, (n,), generator=g)
    return images.to(device), moments.to(device), labels.to(device)


class TrainArm:
    """Model, EMA, optimizer, encoders and accelerator exactly as train.py builds them, with one setting of
    (mixed precision, compile, AdamW implementation)."""

    def __init__(self, model_name: str, kwargs: dict, encoders: list, device: torch.device, *, mixed_precision: str,
                 compile: bool, adamw: str, seed: int = 0, compile_kw: dict | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)  # one process, two precisions
        self.acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
        torch.manual_seed(seed)  # both arms start from the same weights
        self.model = build_model(model_name, **kwargs).to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        opt = make_optimizer(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
                             impl=adamw)
        prepared, self.opt = self.acc.prepare(self.model, opt)
        self.train_model = torch.compile(prepared, **(compile_kw or {})) if compile else prepared
        self.encoders = [torch.compile(e, **(compile_kw or {})) for e in encoders] if compile else list(encoders)
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        self.describe = (f"{'bf16' if mixed_precision == 'bf16' else 'fp32'}, {'compiled' if compile else 'eager'}, "
                         f"{adamw} AdamW")

    def step(self, batch: tuple[torch.Tensor, ...], step: int, step_cfg: StepConfig, seed: int = 0):
        torch.manual_seed(step_seed(seed, 0, step))  # train.py's per-step reseeding
        return train_step([batch], model=self.train_model, params=self.params, ema_params=self.ema_params,
                          opt=self.opt, encoders=self.encoders, accelerator=self.acc, step_cfg=step_cfg)


def bench_training(args: argparse.Namespace, device: torch.device, peak: float | None) -> list[dict]:
    rows = []
    encoders = quiet_encoders(args.enc_type, args.resolution, device)
    z_dim = encoders[0].embed_dim
    batch = make_batch(args.batch_size, args.resolution, device, args.seed)
    step_cfg = StepConfig()
    arms = [("baseline", dict(mixed_precision="no", compile=False, adamw="for-loop")),
            ("optimised", dict(mixed_precision=args.precision, compile=args.compile, adamw=args.adamw))]
    for name in args.models:
        kwargs = sit_kwargs(name, args.resolution, z_dim)
        base = flops = None
        for label, setting in arms:
            reset_memory(device)
            arm = TrainArm(name, kwargs, encoders, device, seed=args.seed, compile_kw=compile_kwargs(args), **setting)
            if flops is None:  # one count per model: the arms share its architecture
                flops = training_flops_per_image(arm.model, encoders, cls_dim=z_dim, resolution=args.resolution)
            t0 = time.perf_counter()
            first = arm.step(batch, 0, step_cfg, args.seed).terms.tolist()  # step 0: compiles; its loss is compared
            for k in range(1, args.warmup):
                arm.step(batch, k, step_cfg, args.seed)
            sync(device)
            warm = time.perf_counter() - t0
            t1 = time.perf_counter()
            for k in range(args.warmup, args.warmup + args.steps):
                arm.step(batch, k, step_cfg, args.seed)
            sync(device)
            step_s = (time.perf_counter() - t1) / args.steps
            img_s = args.batch_size / step_s
            row = dict(section="train", model=name, path=label, config=arm.describe, batch=args.batch_size,
                       img_per_s=img_s, step_ms=1e3 * step_s, warmup_s=warm, peak_mem_gb=peak_memory_gb(device),
                       gflop_per_img=flops / 1e9, tflops=img_s * flops / 1e12,
                       mfu=img_s * flops / 1e12 / peak if peak else None, loss0=first[0])
            base = base or row
            row["speedup"] = img_s / base["img_per_s"]
            row["loss0_rel_diff"] = abs(row["loss0"] - base["loss0"]) / abs(base["loss0"])
            rows.append(row)
            print(f"  train {name} {label}: {img_s:.1f} img/s, loss at step 0 {first[0]:.6f}", file=sys.stderr)
            del arm
    return rows


# ----------------------------------------------------------------------------- 2. sampling

def bench_sampling(args: argparse.Namespace, device: torch.device) -> list[dict]:
    z_dim = quiet_encoders(args.enc_type, args.resolution, "meta")[0].embed_dim
    torch.manual_seed(args.seed)
    model = build_model(args.sample_model, **sit_kwargs(args.sample_model, args.resolution, z_dim)).to(device).eval()
    rows = []
    for label, compiled, dtype in (("baseline", False, None),
                                   ("optimised", args.compile, torch.bfloat16 if args.precision == "bf16" else None)):
        reset_memory(device)
        m = torch.compile(model, dynamic=False, **compile_kwargs(args)) if compiled else model  # as generate.py

        def run(steps: int) -> None:
            for _ in generate_images(m, lambda z: z[:, :3].clamp(-1, 1), range(args.sample_batch), global_seed=args.seed,
                                     num_classes=1000, mode="sde", num_steps=steps, cfg_scale=CFG_SCALE,
                                     cls_cfg_scale=CLS_CFG_SCALE, guidance_high=GUIDANCE_HIGH, latents_scale=1.0,
                                     batch_size=args.sample_batch, device=device, dtype=dtype):
                pass
            sync(device)

        with fp32_precision("tf32"):  # generate.py's default --tf32
            t0 = time.perf_counter()
            run(min(10, args.sample_steps))  # compiles both graphs: batch N, and the CFG-doubled 2N for t <= 0.85
            warm = time.perf_counter() - t0
            t1 = time.perf_counter()
            run(args.sample_steps)
            run_s = time.perf_counter() - t1
        row = dict(section="sample", model=args.sample_model, path=label,
                   config=f"{'compiled' if compiled else 'eager'} {'bf16' if dtype else 'fp32'}",
                   batch=args.sample_batch, steps=args.sample_steps, img_per_s=args.sample_batch / run_s,
                   seconds=run_s, warmup_s=warm, peak_mem_gb=peak_memory_gb(device))
        row["speedup"] = row["img_per_s"] / (rows[0]["img_per_s"] if rows else row["img_per_s"])
        rows.append(row)
        print(f"  sample {label}: {row['img_per_s']:.2f} img/s", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- 3. evaluator

def bench_evaluator(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from evaluations.evaluator import (NpzImageReader, batch_from_features, build_inception, compute_metrics,
                                       extract_features)
    with warnings.catch_warnings(), contextlib.redirect_stderr(open(os.devnull, "w")):
        warnings.simplefilter("ignore")
        inception = build_inception("random", device=device, verbose=False)
    n, rows = args.eval_images, []
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.npz")
        np.savez(path, rng.integers(0, 256, (n, args.resolution, args.resolution, 3), dtype=np.uint8))
        reader = NpzImageReader(path)

        @torch.no_grad()
        def adm() -> np.ndarray:  # ADM: read a batch, run it, copy it back, repeat
            out = []
            with fp32_precision("ieee"):
                for b in reader.batches(ADM_EVAL_BATCH):
                    out.append(inception(torch.from_numpy(np.array(b)).to(device).permute(0, 3, 1, 2))[0].cpu().numpy())
            return np.concatenate(out)

        results = {}
        for label, fn, config in (("baseline", adm, f"ADM: batches of {ADM_EVAL_BATCH}, synchronous"),
                                  ("optimised", lambda: extract_features(reader, inception, args.eval_batch,
                                                                         verbose=False)["pool"],
                                   f"evaluator: batches of {args.eval_batch}, prefetching reader")):
            with torch.no_grad(), fp32_precision("ieee"):  # warm-up: cuDNN autotuning and allocator
                inception(torch.zeros(min(n, args.eval_batch if label == "optimised" else ADM_EVAL_BATCH), 3,
                                      args.resolution, args.resolution, dtype=torch.uint8, device=device))
            sync(device)
            t0 = time.perf_counter()
            results[label] = fn()
            sync(device)
            dt = time.perf_counter() - t0
            rows.append(dict(section="eval", task="Inception features", path=label, config=config,
                             size=f"{n} imgs {args.resolution}px", img_per_s=n / dt, seconds=dt))
        diff = float(np.abs(results["baseline"] - results["optimised"]).max())
        for row in rows:
            row["speedup"], row["max_abs_diff"] = row["img_per_s"] / rows[0]["img_per_s"], diff

    def features(count: int, shift: float):
        g = np.random.default_rng(count)
        return batch_from_features(g.standard_normal((count, 2048), dtype=np.float32) + shift,
                                   g.standard_normal((count, 2023), dtype=np.float32),
                                   g.standard_normal((count, 1008), dtype=np.float32))
    if not args.metric_samples:  # --metric-samples 0: Inception only (the metrics' eigh is slow on a CPU)
        return rows
    ref, sample = features(args.metric_refs, 0.0), features(args.metric_samples, 0.1)
    t0 = time.perf_counter()
    metrics = compute_metrics(ref, sample, device=device)
    dt = time.perf_counter() - t0
    rows.append(dict(section="eval", task="FID, sFID, IS, precision/recall", path="optimised",
                     config="evaluator.compute_metrics", size=f"{args.metric_samples}x{args.metric_refs} feats",
                     img_per_s=None, seconds=dt, speedup=None, metrics=metrics))
    rows.append(dict(section="eval", task=f"estimated {args.metric_samples} image evaluation", path="optimised",
                     config="features at the evaluator's rate + metrics", size="", img_per_s=None, speedup=None,
                     seconds=args.metric_samples / rows[1]["img_per_s"] + dt))
    print(f"  eval: {rows[1]['img_per_s']:.1f} img/s Inception, metrics {dt:.1f} s", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- report

def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table(headers: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(line) + " |" for line in lines])


def report(results: dict) -> str:
    rows, parts = results["rows"], []
    train = [r for r in rows if r["section"] == "train"]
    if train:
        parts.append(f"Training step (reg.train_step.train_step): batch {train[0]['batch']}, {results['resolution']} px, "
                     f"{results['enc_type']} in the step; loss 0 = the loss of step 0 (same seed and weights)")
        parts.append(table(["model", "path", "config", "img/s", "step ms", "warm-up s", "peak GB", "GFLOP/img",
                            "TFLOP/s", "MFU", "speed-up", "loss 0", "loss 0 rel. diff"],
                           [[r["model"], r["path"], r["config"], fmt(r["img_per_s"]), fmt(r["step_ms"]),
                             fmt(r["warmup_s"]), fmt(r["peak_mem_gb"], ".2f"), fmt(r["gflop_per_img"]),
                             fmt(r["tflops"], ".2f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f", "%"),
                             fmt(r["speedup"], ".2f", "x"), f"{r['loss0']:.6f}", f"{r['loss0_rel_diff']:.1e}"]
                            for r in train]))
    sample = [r for r in rows if r["section"] == "sample"]
    if sample:
        parts.append(f"Sampling (reg.seeded_images.generate_images): SDE {sample[0]['steps']} steps, cfg {CFG_SCALE}, "
                     f"cls-cfg {CLS_CFG_SCALE}, guidance t <= {GUIDANCE_HIGH}, batch {sample[0]['batch']}")
        parts.append(table(["model", "path", "config", "img/s", "s/batch", "warm-up s", "peak GB", "speed-up"],
                           [[r["model"], r["path"], r["config"], fmt(r["img_per_s"], ".2f"), fmt(r["seconds"], ".2f"),
                             fmt(r["warmup_s"]), fmt(r["peak_mem_gb"], ".2f"), fmt(r["speedup"], ".2f", "x")]
                            for r in sample]))
    ev = [r for r in rows if r["section"] == "eval"]
    if ev:
        parts.append("Evaluator (random Inception weights and features: speed only)")
        parts.append(table(["task", "path", "config", "size", "img/s", "seconds", "speed-up", "check"],
                           [[r["task"], r["path"], r["config"], r["size"], fmt(r["img_per_s"]), fmt(r["seconds"], ".2f"),
                             fmt(r["speedup"], ".2f", "x"),
                             f"max abs diff {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""] for r in ev]))
    return "\n\n".join(parts)


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python -m benchmarks.run " + " ".join(args.argv),
                   device_name=name, torch=torch.__version__, peak_bf16_tflops=peak, quick=args.quick,
                   resolution=args.resolution, enc_type=args.enc_type, rows=[])
    print(f"REG benchmarks on {name}, torch {torch.__version__}, peak bf16 {fmt(peak, '.0f', ' TFLOP/s')}", flush=True)
    try:
        if "train" in args.sections:
            results["rows"] += bench_training(args, device, peak)
        if "sample" in args.sections:
            results["rows"] += bench_sampling(args, device)
        if "eval" in args.sections:
            results["rows"] += bench_evaluator(args, device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a bigger process (the tests)
    results["table"] = report(results)
    print("\n" + results["table"], flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(nan_to_null(results), f, indent=1, default=str, allow_nan=False)
    return results


if __name__ == "__main__":
    from reg.utils import run_main
    run_main(main, parse_args)
