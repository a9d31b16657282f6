"""Helpers of benchmarks/gpu_check.sh: the synthetic inputs it trains and evaluates on, and RESULTS.md.

    python -m benchmarks.gpu_check data --dest DIR --num-images 256 --resolution 256
    python -m benchmarks.gpu_check vae --dest DIR            # a randomly initialised SD-VAE (AutoencoderKL)
    python -m benchmarks.gpu_check report --work DIR --out benchmarks/RESULTS.md

No network and no dataset: images are random blocky pictures, latents are random SD-VAE-shaped
posterior moments (N, 8, R/8, R/8) (4 latent channels, as SiT expects), in the layout train.py reads
(docs/design.md#data-layout).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

LOSS0_REL_TOL = 2e-2  # bf16 autocast against fp32 at step 0 (same seed, same weights)
MFU_TARGETS = [(32, 0.35), (64, 0.35), (128, 0.45), (256, 0.45)]  # the MFU targets (one H100/H200, XL/2 + REG; docs/performance.md)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def speed_sections(speed: dict) -> list[str]:
    """benchmarks/speed.py's figures: the A/B of each speed flag, the per-phase profile, attention, loader."""
    lines = []
    if speed.get("ab"):
        lines += ["", "## The speed flags against today's step (benchmarks/speed.py ab, one process)", ""]
        lines += table(["flag", "batch/GPU", "step ms", "img/s", "speed-up", "first step s (compile)"],
                       [[r["flag"], r["batch"], fmt(r["step_ms"], ".1f"), fmt(r["img_s"]), fmt(r["speedup"], ".3f", "x"),
                         fmt(r["first_step_s"])] for r in speed["ab"]])
        lines += ["", "Each flag is off by default until this table shows it faster at 32 per GPU. The DDP flags "
                      "(--ddp-*) act on multi-GPU runs only and cannot be timed on one GPU (docs/performance.md)."]
    if speed.get("profile"):
        cats = ["GEMM", "attention", "elementwise", "optimizer + EMA", "copies", "idle"]
        lines += ["", "## Per-phase profile of today's step (torch.profiler, ms per step)", ""]
        lines += table(["batch/GPU", "wall ms", *cats, "attention backend"],
                       [[r["batch"], fmt(r["wall_ms"]), *(fmt(r[c]) for c in cats), r["attention_backend"]]
                        for r in speed["profile"]])
    if speed.get("attn"):
        lines += ["", "## Attention microbenchmark (forward + backward)", ""]
        lines += table(["backend", "case", "tokens", "ms", "TFLOP/s (useful)"],
                       [[r["backend"], r["case"], r["tokens"], fmt(r.get("ms"), ".3f"),
                         fmt(r.get("tflops")) if r.get("ms") else r.get("error", "")] for r in speed["attn"]])
    if speed.get("loader"):
        lines += ["", "## Data loader (train.py's dataset, photo-like PNGs)", ""]
        lines += table(["workers", "img/s", "img/s per worker", "decode + latent ms (in process)", "PNG KB"],
                       [[r["workers"], fmt(r["img_s"]), fmt(r["img_s_per_worker"]), fmt(r["decode_ms"], ".2f"),
                         fmt(r["png_kb"])] for r in speed["loader"]])
    return lines


def photo_like_image(rng: np.random.Generator, resolution: int, noise: float = 5.0):
    """A smooth random picture plus Gaussian texture: its PNG is the size of a real 256 px ImageNet crop's
    (about 120 KB at 256 px; 1.1 KB for the blocky pictures used before), so it costs as much to decode."""
    import PIL.Image
    low = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(low.resize((resolution, resolution), PIL.Image.BICUBIC), dtype=np.float32)
    return PIL.Image.fromarray(np.clip(smooth + rng.normal(0, noise, smooth.shape), 0, 255).astype(np.uint8))


def make_data(dest: Path, num_images: int, resolution: int, num_classes: int = 1000, seed: int = 0,
              image_dir: str | None = None) -> None:
    """DATA/imagenet_{R}_vae/00000/img*.png, DATA/vae-sd/00000/img-mean-std-*.npy and vae-sd/dataset.json,
    plus DATA/ref.npz (128 images, the evaluator's reference batch)."""
    rng = np.random.default_rng(seed)
    img_dir, lat_dir = dest / (image_dir or f"imagenet_{resolution}_vae") / "00000", dest / "vae-sd" / "00000"
    img_dir.mkdir(parents=True, exist_ok=True)
    lat_dir.mkdir(parents=True, exist_ok=True)
    lat, labels = resolution // 8, []
    for i in range(num_images):
        photo_like_image(rng, resolution).save(img_dir / f"img{i:08d}.png")
        moments = np.concatenate([rng.standard_normal((4, lat, lat)) * 5, rng.random((4, lat, lat)) * 0.1])
        np.save(lat_dir / f"img-mean-std-{i:08d}.npy", moments.astype(np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", int(rng.integers(num_classes))])
    meta = {"labels": labels, "vae": {"name": None, "latent_channels": 4, "scaling_factor": 0.18215,
                                      "resolution": resolution}}
    (dest / "vae-sd" / "dataset.json").write_text(json.dumps(meta))
    np.savez(dest / "ref.npz", rng.integers(0, 256, (128, resolution, resolution, 3), dtype=np.uint8))


def make_vae(dest: Path) -> None:
    """A randomly initialised AutoencoderKL with the SD-VAE's architecture, saved with
    save_pretrained so that train.py --vae DIR loads it like a downloaded one."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215).save_pretrained(str(dest))


def read_run(run_dir: Path) -> dict:
    """Steady-state figures of one train.py run from its metrics.jsonl: the first log interval holds the
    compilation and is left out of the medians; its excess over them is the compile time."""
    from reg.run_log import METRICS_FILE, read_metrics  # the one reader of metrics.jsonl
    records = read_metrics(run_dir / METRICS_FILE, warn=print)
    train = [r for r in records if "img_per_s" in r]
    steady = train[1:] or train
    med = lambda key: statistics.median(r[key] for r in steady) if all(key in r for r in steady) else None  # noqa: E731
    args = json.loads((run_dir / "args.json").read_text())
    interval = args["log_every"]
    out = {k: med(k) for k in ("img_per_s", "step_time_s", "tflops", "mfu", "peak_mem_gb")}
    speed_flags = [f"--{k.replace('_', '-')}" + (f" {v}" if not isinstance(v, bool) else "")
                   for k, v in args.items() if k in ("attn_split", "device_skip", "ema_lerp", "compile_mode")
                   and v not in (False, "default")]
    out.update(model=args["model"], batch=args["batch_size"], steps=train[-1]["step"] if train else 0,
               flags=" ".join(speed_flags),
               compile_s=(train[0]["step_time_s"] - out["step_time_s"]) * interval if len(train) > 1 else None,
               loss_first_interval=train[0].get("loss") if train else None)
    ev = [r for r in records if "eval_time_s" in r]
    if ev:
        per_10k = ev[-1]["eval_time_s"] * 10_000 / ev[-1]["eval_samples"]
        out.update(eval_samples=ev[-1]["eval_samples"], eval_time_s=ev[-1]["eval_time_s"], eval_10k_s=per_10k,
                   eval_10k_in_steps=per_10k / out["step_time_s"] if out["step_time_s"] else None)
    return out


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def write_report(work: Path, out: Path, command: str) -> int:
    """RESULTS.md from the train.py runs and benchmarks/run.py's JSON; returns the number of failed checks."""
    import torch
    parts = [json.loads(p.read_text()) for p in sorted(work.glob("bench_*.json"))]
    bench = {**(parts[0] if parts else {}), "rows": [r for p in parts for r in p["rows"]],
             "table": "\n\n".join(p["table"] for p in parts) or "(not run)"}
    runs = [read_run(d) for d in sorted((work / "exps").glob("*")) if (d / "metrics.jsonl").is_file()]
    failures = (work / "failures.txt").read_text().split("\n") if (work / "failures.txt").is_file() else []
    failures = [f for f in failures if f.strip()]
    device = bench.get("device_name") or (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    lines = [f"# GPU check results", "",
             f"- device: {device}", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"- torch: {torch.__version__}", f"- command: `{command}`",
             f"- phase times (s): {(work / 'phases.txt').read_text().strip() if (work / 'phases.txt').is_file() else 'n/a'}",
             "", "Synthetic data, random encoder / Inception / VAE weights: speed only, no quality figures.", "",
             "## Training through train.py (its defaults: bf16, compile, fused AdamW on GPU)", "",
             "| model | flags | batch/GPU | steps | img/s | step s | TFLOP/s | MFU | peak GB | compile s | 10K eval s "
             "| = train steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["model"], bool(r["flags"]), r["batch"])):
        lines.append(f"| {r['model']} | {r['flags'] or 'defaults'} | {r['batch']} | {r['steps']} | {fmt(r['img_per_s'])} | {fmt(r['step_time_s'], '.3f')} "
                     f"| {fmt(r['tflops'])} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')} | {fmt(r['peak_mem_gb'], '.1f')} "
                     f"| {fmt(r['compile_s'])} | {fmt(r.get('eval_10k_s'))} | {fmt(r.get('eval_10k_in_steps'), '.0f')} |")
    ev = [r for r in runs if "eval_time_s" in r]
    for r in ev:
        lines += ["", f"In-training evaluation ({r['model']}, train.py's eval defaults: ODE 50 steps, no guidance, "
                      f"bf16 EMA model, SD-VAE decode, Inception): {r['eval_samples']} images took "
                      f"{r['eval_time_s']:.1f} s, so 10K images take about {r['eval_10k_s']:.0f} s, the time of "
                      f"{fmt(r['eval_10k_in_steps'], '.0f')} training steps at batch {r['batch']} on this device."]
    speed: dict = {}
    for part in sorted(work.glob("speed_*.json")):
        speed.update(json.loads(part.read_text()))
    lines += speed_sections(speed)
    lines += ["", "## benchmarks/run.py (each against its baseline, same process)", "", bench["table"]]
    checks = []
    for r in bench["rows"]:
        if r["section"] == "train" and r["path"] == "optimised":
            ok = r["loss0_rel_diff"] <= LOSS0_REL_TOL
            checks.append((f"{r['model']}: step-0 loss, {r['config']} vs fp32 eager: relative difference "
                           f"{r['loss0_rel_diff']:.1e} <= {LOSS0_REL_TOL:.0e}", ok))
            checks.append((f"{r['model']}: {r['speedup']:.2f}x the fp32-eager baseline (target >= 1.5x)", None))
    for r in runs:
        if r["mfu"] is not None and r["model"] == "SiT-XL/2":
            target = next((t for b, t in MFU_TARGETS if r["batch"] <= b), MFU_TARGETS[-1][1])
            checks.append((f"{r['model']} at {r['batch']} per GPU ({r.get('flags') or 'defaults'}): MFU "
                           f"{100 * r['mfu']:.1f}% (target >= {100 * target:.0f}%)",
                           r["mfu"] >= target if not r.get("flags") else None))
    for r in bench["rows"]:
        if r["section"] == "sample" and r["path"] == "optimised":
            checks.append((f"sampling {r['model']}: {r['speedup']:.2f}x eager fp32 (target >= 2x)", None))
        if r["section"] == "eval" and r["task"].startswith("estimated"):
            checks.append((f"evaluator: {r['task']} about {r['seconds']:.0f} s (target <= 120 s for 50K)", None))
    lines += ["", "## Checks", ""]
    lines += [f"- {'PASS' if ok else 'FAIL' if ok is not None else 'info'}: {text}" for text, ok in checks]
    lines += [f"- FAIL: phase `{f}` failed (see its log)" for f in failures]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return sum(ok is False for _, ok in checks) + len(failures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--dest", type=Path, required=True)
    d.add_argument("--num-images", type=int, default=256)
    d.add_argument("--resolution", type=int, default=256)
    v = sub.add_parser("vae")
    v.add_argument("--dest", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    a = p.parse_args(argv)
    if a.cmd == "data":
        make_data(a.dest, a.num_images, a.resolution)
    elif a.cmd == "vae":
        make_vae(a.dest)
    else:
        return min(write_report(a.work, a.out, a.command), 1)
    return 0


if __name__ == "__main__":
    import sys

    from reg.utils import run_main
    sys.exit(run_main(main))  # main's result: the number of failed checks
