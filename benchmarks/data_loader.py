"""The training data reader at ImageNet scale, before and after its index (docs/data.md#the-index):

    python -m benchmarks.data_loader --work DIR                  # 1,281,167 items (builds DIR/imagenet once)
    python -m benchmarks.data_loader --work DIR --quick          # 2,000 items (tests/test_data_index.py runs it)
    python -m benchmarks.data_loader --work DIR --sections throughput

startup: a REG data folder as two zips of tiny members (16 px PNGs, 2x2 latents) with encode's record,
    written directly (a few minutes for 1.28M items, kept in DIR). "before" is the reader as it was
    (CustomDataset(use_index=False): every process lists both zips and holds the listing as Python objects);
    "after" reads the index, built once beforehand (its build is timed on its own). Each figure comes from a
    fresh process: the dataset's construction (seconds, RSS growth), a DataLoader with 2 workers (seconds to
    the first batch; PSS of the rank and its workers from /proc/PID/smaps_rollup), and the data check
    (--data-check sample, full). The page cache is warm for both sides.
throughput: photo-like 256 px PNGs of ~120 KB (benchmarks.gpu_check.photo_like_image) and SD-VAE-sized
    latents in a zip, read through the index: ms per item on one core (read + PNG decode + latent), img/s
    with 1 and 2 workers, and the workers per GPU that the training rates of benchmarks/RESULTS.md need.

Timings are printed, never asserted (tests/test_data_index.py runs --quick so that this cannot rot).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

IMAGENET_ITEMS = 1_281_167
QUICK_ITEMS = 2_000
TARGETS = {"start-up s": 2.0, "first batch s": 3.0, "PSS MB": 400.0}  # after the index (the targets)
GPU_RATES = {"SiT-XL/2 + REG": 458.0, "SiT-B/2 + REG": 1532.0}  # img/s on one H200 at 64 per GPU (RESULTS.md)
DATE = (2024, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same bytes at every build


# ----------------------------------------------------------------------------- the layout

def write_zip(path: Path, members) -> None:
    """An uncompressed zip of (name, bytes) pairs, written under a temporary name and renamed when whole."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name, DATE), data)
    os.replace(tmp, path)


def make_layout(dest: Path, n: int, images: list[bytes], latents: list[bytes], resolution: int) -> Path:
    """DEST/imagenet_{R}_vae.zip and DEST/vae-sd.zip of n items in the layout encode writes (dataset.json with
    labels and the "vae" entry, encode_config.json, one record file per 1000 items); member i holds
    images[i % len] and latents[i % len]. Kept when already complete."""
    from preprocessing import image_name
    from preprocessing.records import ENCODE_CONFIG, HASH_DIR, content_hash

    image_zip, latent_zip = dest / f"imagenet_{resolution}_vae.zip", dest / "vae-sd.zip"
    if image_zip.exists() and latent_zip.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_zip(image_zip, ((image_name(i), images[i % len(images)]) for i in range(n)))
    names = [image_name(i).replace("/img", "/img-mean-std-").replace(".png", ".npy") for i in range(n)]
    labels = [[name, i % 1000] for i, name in enumerate(names)]
    vae = {"name": None, "latent_channels": 4, "scaling_factor": 0.18215, "resolution": resolution}
    rows = [[name, image_name(i), content_hash(images[i % len(images)]), i % 1000, len(images[i % len(images)]),
             content_hash(latents[i % len(latents)]), len(latents[i % len(latents)])] for i, name in enumerate(names)]

    def members():
        yield from ((name, latents[i % len(latents)]) for i, name in enumerate(names))
        yield "dataset.json", json.dumps({"labels": labels, "vae": vae}).encode()
        yield ENCODE_CONFIG, json.dumps({**vae, "dtype": "fp32", "source": {"num_images": n}}).encode()
        for s in range(0, n, 1000):
            record = {"algorithm": "sha256", "images": rows[s:s + 1000]}
            yield f"{HASH_DIR}/{os.path.basename(names[s])[:-4]}.json", json.dumps(record).encode()
    write_zip(latent_zip, members())
    print(f"layout: {n} items written to {dest} in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest


def tiny_members(resolution: int = 16, count: int = 16) -> tuple[list[bytes], list[bytes]]:
    """`count` distinct tiny PNGs (resolution px) and 4-channel moment files."""
    import PIL.Image
    rng = np.random.default_rng(0)
    images, latents = [], []
    for _ in range(count):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buf, "png")
        images.append(buf.getvalue())
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((8, resolution // 8, resolution // 8)).astype(np.float32))
        latents.append(buf.getvalue())
    return images, latents


def photo_members(resolution: int = 256, count: int = 64) -> tuple[list[bytes], list[bytes]]:
    """`count` photo-like PNGs of about 120 KB at 256 px, and SD-VAE-sized moment files (8, R/8, R/8)."""
    from benchmarks.gpu_check import photo_like_image
    rng = np.random.default_rng(0)
    images, latents = [], []
    for _ in range(count):
        buf = io.BytesIO()
        photo_like_image(rng, resolution).save(buf, "png")
        images.append(buf.getvalue())
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((8, resolution // 8, resolution // 8)).astype(np.float32))
        latents.append(buf.getvalue())
    return images, latents


# ----------------------------------------------------------------------------- one measurement, in a fresh process

def pss_mb(pid: int, field: str = "Pss") -> float:
    """Proportional set size of a process (shared pages divided among the processes that map them), or another
    field of /proc/PID/smaps_rollup (Pss_Anon: its private and forked memory; Pss_File: mapped files, shared
    libraries included, whose share moves with every other process on the machine that maps them)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(data: str | None, resolution: int, use_index: bool, workers: int, batch: int, checks: list[str]) -> dict:
    """Construction, first batch with `workers` workers and their PSS, and the data checks, of one reader;
    data=None: the floor, a dataset of 64 tensors in memory through the same loader."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dataset import CustomDataset
    from reg.data_check import check_content
    from reg.train_step import StepSampler

    rss0, t0 = rss_mb(), time.perf_counter()
    ds = (CustomDataset(data, resolution=resolution, num_classes=1000, use_index=use_index, report=lambda m: None)
          if data else TensorDataset(torch.zeros(64, 3, resolution, resolution, dtype=torch.uint8)))
    out = {"items": len(ds), "start-up s": time.perf_counter() - t0, "start-up RSS MB": rss_mb() - rss0}
    for mode in checks:
        t0 = time.perf_counter()
        problem, _ = check_content(ds, mode, seed=(0, 0), threads=4)
        out[f"check {mode} s"] = time.perf_counter() - t0
        assert problem is None, problem
    sampler = StepSampler(len(ds), local_batch=batch, rank=0, world=1, seed=0)
    t0 = time.perf_counter()
    it = iter(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                         generator=torch.Generator()))
    next(it)
    out["first batch s"] = time.perf_counter() - t0
    for _ in range(2 * workers):  # every worker has read a batch of its own
        next(it)
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    for field in ("Pss", "Pss_Anon", "Pss_File"):
        out[f"{field.replace('Pss', 'PSS')} MB"] = sum(pss_mb(p, field) for p in pids)
    out["PSS MB per process"] = [round(pss_mb(p), 1) for p in pids]
    del it
    return out


def measure_throughput(data: str, resolution: int, batch: int, batches: int) -> dict:
    """ms per item on one core (the best of 3 passes after a warm-up), and img/s with 1 and 2 workers."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from dataset import CustomDataset
    from reg.data_check import check_content
    ds = CustomDataset(data, resolution=resolution, num_classes=1000, report=lambda m: None)
    check_content(ds, "full", threads=4)  # the files into the page cache
    t0 = time.perf_counter()
    assert check_content(ds, "full", threads=4)[0] is None
    check_ms = 1e3 * (time.perf_counter() - t0) / len(ds)
    n, passes = min(len(ds), 64), []
    for _ in range(4):
        t0 = time.perf_counter()
        for i in range(n):
            ds[i]
        passes.append(1e3 * (time.perf_counter() - t0) / n)
    out = {"items": len(ds), "ms per item (1 core)": min(passes[1:]), "ms per item (median)": statistics.median(passes[1:]),
           "check ms per item": check_ms,
           "png KB": statistics.mean(len(ds.read_bytes("image", i)) for i in range(n)) / 1024}
    for w in (1, 2):
        sampler = RandomSampler(ds, replacement=True, num_samples=batch * (batches + 2),
                                generator=torch.Generator().manual_seed(0))
        it = iter(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=w, drop_last=True))
        next(it)  # start-up is not the steady rate
        t0, seen = time.perf_counter(), 0
        for _ in range(batches):
            seen += next(it)[0].shape[0]
        out[f"img/s, {w} worker(s)"] = seen / (time.perf_counter() - t0)
    return out


def in_fresh_process(kind: str, **kwargs) -> dict:
    """One measurement in a new Python process (nothing cached in memory from an earlier one)."""
    cmd = [sys.executable, "-m", "benchmarks.data_loader", "--measure", json.dumps({"kind": kind, **kwargs})]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sections

def startup(work: Path, n: int, resolution: int = 16, batch: int = 32) -> dict:
    from reg import data_index
    data = make_layout(work / ("imagenet" if n == IMAGENET_ITEMS else f"items-{n}"), n, *tiny_members(resolution),
                       resolution)
    for path in data_index.locations(str(data), f"imagenet_{resolution}_vae"):
        path.unlink(missing_ok=True)
    args = dict(data=str(data), resolution=resolution, workers=2, batch=batch)
    floor = in_fresh_process("reader", use_index=False, checks=[], **{**args, "data": None})
    before = in_fresh_process("reader", use_index=False, checks=[], **args)
    t0 = time.perf_counter()
    in_fresh_process("reader", use_index=True, checks=[], **{**args, "workers": 0})  # builds the index
    build_s = time.perf_counter() - t0
    after = in_fresh_process("reader", use_index=True, checks=["sample", "full"], **args)
    floor_after = in_fresh_process("reader", use_index=False, checks=[], **{**args, "data": None})  # libraries'
    # pages are shared with every process on the machine that maps them: their share moves while this runs
    index = data_index.locations(str(data), f"imagenet_{resolution}_vae")[0]
    return {"items": n, "floor": floor, "floor again": floor_after, "before": before, "after": after,
            "index build s (process)": build_s,
            "index MB": index.stat().st_size / 2**20}


def throughput(work: Path, n: int, batch: int = 32, batches: int = 8) -> dict:
    data = make_layout(work / f"photos-{n}", n, *photo_members(256, min(n, 64)), 256)
    return in_fresh_process("throughput", data=str(data), resolution=256, batch=batch, batches=batches)


def report(results: dict) -> None:
    if "startup" in results:
        r = results["startup"]
        b, a = r["before"], r["after"]
        print(f"\nstart-up on {r['items']:,} items (two zips), 2 workers, batch 32:")
        print(f"{'':24}{'before':>12}{'after':>12}{'after/before':>14}{'target':>10}")
        for key in ("start-up s", "start-up RSS MB", "first batch s", "PSS MB", "PSS_Anon MB", "PSS_File MB"):
            target = TARGETS.get(key)
            met = "" if target is None else f"<= {target:g} " + ("met" if a[key] <= target else "NOT MET")
            print(f"{key:24}{b[key]:12.2f}{a[key]:12.2f}{a[key] / b[key]:13.3f}x  {met}")
        print(f"PSS per process (rank, workers): before {b['PSS MB per process']}, after {a['PSS MB per process']}")
        for name in ("floor", "floor again"):
            f = r[name]
            print(f"the {name} (torch and 64 tensors through the same loader): PSS {f['PSS MB']:.0f} MB (anon "
                  f"{f['PSS_Anon MB']:.0f}, files {f['PSS_File MB']:.0f}); above it: before "
                  f"{b['PSS MB'] - f['PSS MB']:.0f} MB (anon {b['PSS_Anon MB'] - f['PSS_Anon MB']:.0f}), after "
                  f"{a['PSS MB'] - f['PSS MB']:.0f} MB (anon {a['PSS_Anon MB'] - f['PSS_Anon MB']:.0f})")
        print(f"index: built once in {r['index build s (process)']:.1f} s (a whole process), {r['index MB']:.0f} MB; "
              f"data check: sample {a['check sample s']:.2f} s, full {a['check full s']:.1f} s")
    if "throughput" in results:
        t = results["throughput"]
        per_core = 1e3 / t["ms per item (1 core)"]
        print(f"\nthroughput, photo-like PNGs of {t['png KB']:.0f} KB, 256 px, with the index:")
        print(f"  one core: {t['ms per item (1 core)']:.2f} ms per item at best ({per_core:.0f} img/s), "
              f"{t['ms per item (median)']:.2f} ms median")
        print(f"  DataLoader: {t['img/s, 1 worker(s)']:.0f} img/s with 1 worker, {t['img/s, 2 worker(s)']:.0f} with 2")
        print(f"  data check: {t['check ms per item']:.2f} ms per item hashed (image and latent, 4 threads), so "
              f"{t['check ms per item']:.2f} s for the default sample of 1,000")
        for model, rate in GPU_RATES.items():
            print(f"  {model} at {rate:.0f} img/s per GPU needs {rate / per_core:.1f} decoding cores (workers) per GPU")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="folder for the generated data (kept between runs)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_ITEMS:,} items instead of {IMAGENET_ITEMS:,}")
    p.add_argument("--items", type=int, default=None, help="items of the start-up layout (default: ImageNet's)")
    p.add_argument("--sections", default="startup,throughput", help="comma-separated: startup, throughput")
    p.add_argument("--out", type=Path, default=None, help="also write every figure as JSON")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON in and out
    args = p.parse_args(argv)
    if args.measure is None and args.work is None:
        p.error("--work is required")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.sections) - {"startup", "throughput"}:
        p.error(f"--sections: unknown {sorted(set(args.sections) - {'startup', 'throughput'})}")
    args.items = args.items or (QUICK_ITEMS if args.quick else IMAGENET_ITEMS)
    return args


def main(args: argparse.Namespace) -> dict:
    if args.measure is not None:
        spec = json.loads(args.measure)
        kind = spec.pop("kind")
        out = measure(**spec) if kind == "reader" else measure_throughput(**spec)
        print(json.dumps(out))
        return out
    results = {}
    if "startup" in args.sections:
        results["startup"] = startup(args.work, args.items)
    if "throughput" in args.sections:
        results["throughput"] = throughput(args.work, 64 if args.quick else 512, batches=2 if args.quick else 8)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(parse_args())
