"""One CPU training step of ours against the authors' REG code, measured side by side in one run.

    python benchmarks/cpu_vs_original.py --original-dir /tmp/reg_original [--rounds 3]

--original-dir is a checkout of the authors' REG repository (train.py, loss.py, dataset.py, utils.py,
models/) with the DINOv2 torch.hub source in ORIGINAL/dinov2_hub (hubconf.py + dinov2/; e.g. a checkout of
facebookresearch/dinov2). Nothing is downloaded; this script does not fetch that code.

Setting: SiT-B/2 + REG, DINOv2-B with random weights, 128 px, batch 4, fp32, --num-workers 0, synthetic data
(gpu_check's maker: random 128 px PNGs and 4-channel 16x16 latent moments, in REG's imagenet_256_vae layout,
which both datasets read).

- ours:   train.py itself, as a user runs it on a CPU (its defaults there: fp32, eager, fused AdamW). Per step
          = (time of a 12-step run - time of a 2-step run) / 10, so the data loading, the loop and the
          logging count, and start-up and the final checkpoint cancel.
- theirs: the authors' step timed in-process: their CustomDataset + DataLoader (shuffle, workers 0), their
          sample_posterior, SILoss, update_ema (from their train.py / loss.py), default torch AdamW, their
          models/sit.py, their torch.hub DINOv2, and their per-step logging (.item() of five gathered terms).
          One deviation: their preprocess_raw_image resizes to 224 * (res // 256), which is 0 at 128 px, so
          the encoder input here is 224 * res / 256 = 112 px (what the formula means; our encoder does this).

Runs alternate ours / theirs (ABAB...) and the medians are reported with the load average (`uptime`) seen
by each run, since other processes on a shared machine slow either side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> float:
    return os.getloadavg()[0]


def env(args: argparse.Namespace, **extra: str) -> dict:
    """Both sides run with the same thread count (OMP_NUM_THREADS): on a shared 2-core machine two OpenMP
    threads against other processes wait at barriers and both sides slow down erratically (5x seen)."""
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    return {**os.environ, **threads, **extra}


def time_ours(work: Path, steps: int, args: argparse.Namespace) -> float:
    out = work / "exps"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--encoder-depth", "4",
           "--enc-type", "dinov2-vit-b", "--enc-weights", "random", "--data-dir", str(work / "data"),
           "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--num-workers", "0",
           "--max-train-steps", str(steps), "--log-every", "100", "--checkpointing-steps", "1000000",
           "--report-to", "none", "--output-dir", str(out), "--exp-name", f"ours{steps}-{time.time_ns()}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env(args, HF_HUB_OFFLINE="1"))
    dt = time.perf_counter() - t0
    subprocess.run(["rm", "-rf", str(out)], check=True)  # a B/2 checkpoint is 2 GB
    return dt


def time_theirs(work: Path, args: argparse.Namespace) -> list[float]:
    """Per-step seconds of their loop, from a fresh process (their modules shadow ours by name)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--original-dir", str(args.original_dir),
           "--work", str(work), "--model", args.model, "--resolution", str(args.resolution),
           "--batch-size", str(args.batch_size), "--steps", str(args.long - args.short), "--warmup", str(args.short)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=args.original_dir,
                          env=env(args, PYTHONPATH=str(args.original_dir)))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(args: argparse.Namespace) -> None:
    """The authors' loop body (REG train.py L285-367), with their functions, on CPU."""
    sys.path.insert(0, str(args.original_dir))
    import warnings
    warnings.filterwarnings("ignore")
    import timm
    import torch
    from accelerate import Accelerator
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torch.utils.data import DataLoader
    from torchvision.transforms import Normalize

    import train as their
    from dataset import CustomDataset
    from loss import SILoss
    from models.sit import SiT_models

    torch.manual_seed(0)
    acc = Accelerator(cpu=True, mixed_precision="no")
    enc = torch.hub.load(str(args.original_dir / "dinov2_hub"), "dinov2_vitb14", source="local", pretrained=False)
    del enc.head  # their utils.load_encoders
    grid = args.resolution * 224 // 256 // 14
    enc.pos_embed.data = timm.layers.pos_embed.resample_abs_pos_embed(enc.pos_embed.data, [grid, grid])
    enc.head = torch.nn.Identity()
    enc.eval()
    model = SiT_models[args.model](input_size=args.resolution // 8, num_classes=1000, use_cfg=True, z_dims=[768],
                                   encoder_depth=4, fused_attn=True, qk_norm=False)
    ema = their.deepcopy(model)
    their.requires_grad(ema, False)
    scale = torch.tensor([0.18215] * 4).view(1, 4, 1, 1)
    bias = torch.zeros(1, 4, 1, 1)
    loss_fn = SILoss(prediction="v", path_type="linear", encoders=[enc], accelerator=acc, latents_scale=scale,
                     latents_bias=bias, weighting="uniform")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    loader = DataLoader(CustomDataset(str(args.work / "data")), batch_size=args.batch_size, shuffle=True,
                        num_workers=0, pin_memory=True, drop_last=True)
    their.update_ema(ema, model, decay=0)
    model.train()
    ema.eval()
    model, opt, loader = acc.prepare(model, opt, loader)
    size = args.resolution * 224 // 256  # see the module docstring: their formula gives 0 at 128 px
    norm = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    times, data = [], iter(())
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        try:
            raw_image, x, y = next(data)
        except StopIteration:
            data = iter(loader)
            raw_image, x, y = next(data)
        x, labels = x.squeeze(dim=1), y
        with torch.no_grad():
            x = their.sample_posterior(x, latents_scale=scale, latents_bias=bias)
            with acc.autocast():
                z = enc.forward_features(torch.nn.functional.interpolate(norm(raw_image / 255.), size, mode="bicubic"))
                cls_token = z["x_norm_clstoken"]
                zs = [torch.cat([cls_token.unsqueeze(1), z["x_norm_patchtokens"]], dim=1)]
        with acc.accumulate(model):
            loss1, proj_loss1, _, _, loss2 = loss_fn(model, x, dict(y=labels), zs=zs, cls_token=cls_token,
                                                     time_input=None, noises=None)
            loss_mean, loss_mean_cls, proj_loss_mean = loss1.mean(), loss2.mean() * 0.03, proj_loss1.mean() * 0.5
            loss = loss_mean + proj_loss_mean + loss_mean_cls
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            their.update_ema(ema, model)
        _ = [acc.gather(v).mean().detach().item() for v in (loss, loss_mean, proj_loss_mean, loss_mean_cls, grad_norm)]
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original-dir", type=Path, required=True, help="checkout of the authors' REG code")
    p.add_argument("--work", type=Path, default=Path("/tmp/cpu_vs_original"), help="scratch folder (data, runs)")
    p.add_argument("--rounds", type=int, default=3, help="ours/theirs pairs, alternating")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both sides (0: leave as is)")
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--short", type=int, default=2, help="steps of the short run of ours (theirs: warm-up steps)")
    p.add_argument("--long", type=int, default=12, help="steps of the long run of ours")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    for f in ("train.py", "loss.py", "dataset.py", "models/sit.py", "dinov2_hub/hubconf.py"):
        if not (args.original_dir / f).is_file():
            p.error(f"--original-dir {args.original_dir}: no {f} (see --help)")
    data = args.work / "data"
    if not (data / "vae-sd" / "dataset.json").is_file():
        sys.path.insert(0, str(ROOT))
        from benchmarks.gpu_check import make_data
        make_data(data, 64, args.resolution, image_dir="imagenet_256_vae")
    ours, theirs = [], []
    for r in range(args.rounds):
        load0 = load_average()
        short = time_ours(args.work, args.short, args)
        long = time_ours(args.work, args.long, args)
        ours.append(((long - short) / (args.long - args.short), (load0 + load_average()) / 2))
        load0 = load_average()
        times = time_theirs(args.work, args)
        theirs.append((statistics.median(times), (load0 + load_average()) / 2))
        print(f"round {r + 1}: ours {ours[-1][0]:.3f} s/step (load {ours[-1][1]:.2f}), "
              f"theirs {theirs[-1][0]:.3f} s/step (load {theirs[-1][1]:.2f})", flush=True)
    o, t = statistics.median(x for x, _ in ours), statistics.median(x for x, _ in theirs)
    print(f"\n{args.model} + REG, DINOv2-B (random), {args.resolution} px, batch {args.batch_size}, fp32, CPU "
          f"({os.cpu_count()} cores, {args.threads or 'default'} thread(s)), {args.rounds} alternating rounds:\n"
          f"  ours   {o:.3f} s/step (median; train.py, {args.long}-step minus {args.short}-step run)\n"
          f"  theirs {t:.3f} s/step (median of in-process steps)\n  ratio  {o / t:.2f}x")


if __name__ == "__main__":
    main()
