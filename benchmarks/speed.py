"""The step speed-ups of docs/performance.md, measured piece by piece (benchmarks/gpu_check.sh runs them):

    python -m benchmarks.speed attn    --out attn.json       # SDPA (B, 16, T, 72): T=256, 257, 1+256 split
    python -m benchmarks.speed loader  --data DIR --out loader.json   # PNG decode + loader, img/s per worker
    python -m benchmarks.speed ab      --out ab.json         # today's step vs each flag, and a profile

`ab` times reg.train_step.train_step (as benchmarks/run.py's TrainArm builds it: train.py's settings) with
today's StepConfig and with each speed flag, in one process on one compiled model (the flags that change
the graph recompile), and profiles the step by kernel category (GEMM, attention with its backend,
elementwise, optimizer + EMA, copies, idle). Timings are medians, never asserted; `--quick` (automatic on
CPU) runs tiny sizes so the code cannot rot (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from models.sit import split_sdpa

BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call: `iters` calls queued back to back, one sync at the end (no host sync in between)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


# ----------------------------------------------------------------------------- attention

def bench_attention(device: torch.device, batch: int, heads: int, head_dim: int, quick: bool) -> list[dict]:
    """Forward + backward of SDPA at 256 tokens (what tiles), 257 (REG's), and 257 split 1 + 256, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    backends = BACKENDS if device.type == "cuda" else ("MATH", "FLASH_ATTENTION")  # CPU has math and a flash
    for backend in backends:
        for label, tokens, split in (("T=256", 256, False), ("T=257", 257, False), ("T=257 split 1+256", 257, True)):
            tokens = tokens if not quick else tokens // 16 + (tokens % 2)
            q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))

            def step():
                out = split_sdpa(q, k, v, 1) if split else F.scaled_dot_product_attention(q, k, v)
                out.backward(torch.ones_like(out))

            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    s = timed(step, device, 2 if quick else 5, 2 if quick else 20)
            except RuntimeError as e:  # a backend that cannot take this shape/dtype here
                rows.append({"backend": backend, "case": label, "tokens": tokens, "ms": None, "error": str(e)[:120]})
                continue
            # useful FLOPs: 4 matmuls of forward + backward's 8/2... counted as 3.5x the forward's 2 (QK^T, PV)
            flops = 3.5 * 2 * 2 * batch * heads * tokens * tokens * head_dim
            rows.append({"backend": backend, "case": label, "tokens": tokens, "ms": 1e3 * s,
                         "tflops": flops / s / 1e12})
    return rows


# ----------------------------------------------------------------------------- data loader

def bench_loader(data: Path, resolution: int, workers: list[int], batch: int, batches: int) -> list[dict]:
    """train.py's CustomDataset through a DataLoader: images/s with N workers, and per worker; plus the
    decode cost of one image in this process (ms)."""
    from torch.utils.data import DataLoader, RandomSampler

    from dataset import CustomDataset
    ds = CustomDataset(str(data), resolution=resolution)
    n, passes = min(len(ds), 32), []
    for _ in range(4):  # the first pass reads the files into the page cache; the best of the rest (shared CPUs)
        t0 = time.perf_counter()
        for i in range(n):
            ds[i]
        passes.append(1e3 * (time.perf_counter() - t0) / n)
    per_image_ms = min(passes[1:])
    sizes = [p.stat().st_size for p in sorted(data.rglob("*.png"))[:64]]
    rows = [{"workers": 0, "img_s": 1e3 / per_image_ms, "img_s_per_worker": 1e3 / per_image_ms,
             "decode_ms": per_image_ms, "png_kb": statistics.mean(sizes) / 1024 if sizes else None}]
    for w in workers:
        sampler = RandomSampler(ds, replacement=True, num_samples=batch * (batches + 1),
                                generator=torch.Generator().manual_seed(0))  # any number of batches from a small set
        it = iter(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=w, drop_last=True))
        next(it)  # worker start-up is not the steady rate
        t0, seen = time.perf_counter(), 0
        for _ in range(batches):
            seen += next(it)[0].shape[0]
        s = time.perf_counter() - t0
        rows.append({"workers": w, "img_s": seen / s, "img_s_per_worker": seen / s / w, "decode_ms": None,
                     "png_kb": rows[0]["png_kb"]})
    return rows


# ----------------------------------------------------------------------------- A/B of the step and its profile

FLAGS = {  # name -> (StepConfig changes, attention split)
    "today": ({}, False),
    "--device-skip": ({"device_skip": True}, False),
    "--ema-lerp": ({"ema_lerp": True}, False),
    "--attn-split": ({}, True),
    "all three": ({"device_skip": True, "ema_lerp": True}, True),
}
CATEGORIES = ("GEMM", "attention", "elementwise", "optimizer + EMA", "copies")


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "cudnn_sdpa", "sdpa", "softmax")):
        return "attention"
    if any(s in n for s in ("adam", "foreach", "multi_tensor", "lerp", "ema")):
        return "optimizer + EMA"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "addmm", "aten::mm", "bmm", "matmul", "linear",
                            "conv", "_mm_", "fused_mm", "tem_fused")):  # cuBLAS, CUTLASS, inductor's Triton GEMMs
        return "GEMM"
    if any(s in n for s in ("memcpy", "memset", "copy", "aten::to", "aten::cat", "fused_cat")):
        return "copies"
    return "elementwise"


def attention_backend(names: list[str]) -> str:
    joined = " ".join(n.lower() for n in names)
    for key, label in (("cudnn", "cuDNN"), ("flash", "flash"), ("fmha", "efficient (cutlass fmha)"),
                       ("efficient", "efficient"), ("math", "math")):
        if key in joined:
            return label
    return "n/a"


def profile_step(step, device: torch.device, steps: int) -> dict:
    """Kernel time by category over `steps` steps (CUDA kernels on a GPU, CPU ops' self time on a CPU),
    and idle = wall time - busy time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    totals = dict.fromkeys(CATEGORIES, 0.0)
    attn_names = []
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if cuda and getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and not ev.key.startswith("aten::"):
            continue
        cat = category(ev.key)
        totals[cat] += us / 1e3 / steps
        if cat == "attention":
            attn_names.append(ev.key)
    busy = sum(totals.values())
    wall_ms = 1e3 * wall / steps
    return {"wall_ms": wall_ms, **{k: v for k, v in totals.items()}, "idle": max(wall_ms - busy, 0.0),
            "attention_backend": attention_backend(attn_names)}


def bench_ab(args: argparse.Namespace, device: torch.device) -> dict:
    from benchmarks import run as bench
    from reg.train_step import StepConfig
    encoders = bench.quiet_encoders(args.enc_type, args.resolution, device)
    z = encoders[0].embed_dim
    out = {"ab": [], "profile": []}
    for batch_size in args.batches:
        batch = bench.make_batch(batch_size, args.resolution, device, seed=0)
        bench.reset_memory(device)
        arm = bench.TrainArm(args.model, bench.sit_kwargs(args.model, args.resolution, z), encoders, device,
                             mixed_precision=args.precision, compile=args.compile, adamw="fused",
                             compile_kw={"backend": args.compile_backend})
        base = StepConfig()
        counter = iter(range(10**9))
        for name, (changes, split) in FLAGS.items():
            if batch_size != args.batches[0] and name != "today":
                continue  # the A/B at the first batch size (the paper's 32 per GPU); profiles at each
            arm.model.attn_split = split
            step_cfg = replace(base, **changes)
            t0 = time.perf_counter()
            arm.step(batch, next(counter), step_cfg)  # compiles when the graph changed
            sync(device)
            warm = time.perf_counter() - t0
            s = timed(lambda: arm.step(batch, next(counter), step_cfg), device, args.warmup, args.steps)
            out["ab"].append({"flag": name, "batch": batch_size, "step_ms": 1e3 * s, "img_s": batch_size / s,
                              "first_step_s": warm})
            if name == "today":
                out["profile"].append({"batch": batch_size, **profile_step(
                    lambda: arm.step(batch, next(counter), step_cfg), device, max(1, args.steps // 2))})
        base_ms = next(r["step_ms"] for r in out["ab"] if r["flag"] == "today" and r["batch"] == args.batches[0])
        for r in out["ab"]:
            r["speedup"] = base_ms / r["step_ms"] if r["batch"] == args.batches[0] else None
        del arm
    return out


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", help="comma-separated subset of attn,loader,ab (one process)")
    p.add_argument("--out", type=Path, required=True, help="JSON with every figure")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes (automatic on CPU)")
    p.add_argument("--data", type=Path, help="loader: a dataset folder (benchmarks.gpu_check data --photo)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--workers", default="4,8", help="loader: comma-separated worker counts")
    p.add_argument("--batches", default=None, help="ab: per-GPU batch sizes; A/B at the first, profile at each")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--compile-backend", default="inductor")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.quick = args.quick or args.device == "cpu"
    cuda = args.device == "cuda"
    args.resolution = args.resolution or (32 if args.quick else 256)
    args.model = args.model or ("SiT-T/2" if args.quick else "SiT-XL/2")
    args.enc_type = "dinov2-vit-s" if args.quick else "dinov2-vit-b"
    args.batches = [int(b) for b in (args.batches or ("4" if args.quick else "32,128")).split(",")]
    args.steps = args.steps or (1 if args.quick else 20)
    args.warmup = 0 if args.quick else 3  # after the first (compiling) step
    args.precision, args.compile = ("bf16", True) if cuda else ("no", False)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not args.what or set(args.what) - {"attn", "loader", "ab"}:
        p.error(f"what must be a subset of attn,loader,ab, got {args.what}")
    if "loader" in args.what and args.data is None:
        p.error("loader needs --data")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = {}
    if "attn" in args.what:
        result["attn"] = bench_attention(device, 2 if args.quick else 32, 16 if not args.quick else 2, 72, args.quick)
    if "loader" in args.what:
        result["loader"] = bench_loader(args.data, args.resolution, args.workers, 4 if args.quick else 64,
                                        2 if args.quick else 20)
    if "ab" in args.what:
        result.update(bench_ab(args, device))
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
