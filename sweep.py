"""Guidance sweep: evaluate one checkpoint over a grid of sampler settings, in one command.

    python sweep.py --ckpt exps/NAME/checkpoints/ema_4000000.safetensors --ref-batch VIRTUAL_imagenet256_labeled.npz \\
        --out sweeps/NAME-4M --num-samples 10000 --num-steps 250 \\
        --cfg-scale 1,1.8,2.3,2.8 --cls-cfg-scale 1.5,2.3 --guidance-high 0.7,0.85,1.0
    torchrun --nproc_per_node 8 sweep.py ...       # every process samples its share; rank 0 scores

Every list flag takes comma-separated values and the grid is their product (--mode, --num-steps,
--cfg-scale, --cls-cfg-scale, --guidance-low, --guidance-high). Every setting samples the same image
indices 0..N-1 with the same per-image seeds as generate.py (reg.seeded_images.generate_images), so settings
differ only by the sampler, never by the noise or the classes. Images stay in memory: decoded on the
GPU, fed to the Inception network (evaluations.evaluator.FeatureAccumulator), gathered to rank 0.
The reference batch's statistics are computed once and cached in the output folder.

Output folder (resumable: rerun the same command after a kill; finished settings are skipped):
    sweep.json              what every result depends on (checkpoint identity, reference, seed, count, ...);
                            a rerun with other values is refused
    settings/KEY.json       one file per finished setting: its settings and metrics (written atomically)
    results.json, results.md  the table, best FID first, with the paper's numbers for the model size
    fid.png                 FID against the cfg scale (one line per value of the other swept settings)
    reference-stats.npz     the cached reference statistics
Settings with cfg-scale <= 1 are unguided: --cls-cfg-scale and the interval do not act there, so
they are sampled once. Settings with guidance-low > guidance-high are skipped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from reg import folder_lock, processes, stop_signals
from reg.checkpoints import CheckpointError, pin_checkpoint, unpin_checkpoint
from reg.hub import OFFICIAL_HUB_REPO
from reg.loading import LoadedGenerator, load_generator
from reg.processes import gather_features
from reg.run_identity import check_same_settings, checkpoint_identity
from reg.seeded_images import autocast_dtype, generate_images
from reg.utils import (ArgumentParser, HelpFormatter, UserError, atomic_json_dump, atomic_write, finite_floats,
                       run_main, set_fp32_precision)
from samplers import SAMPLER_MODES

# What every stored metric depends on besides its own sampler setting.
MANIFEST_KEYS = ("checkpoint", "ema", "reference", "inception_weights_id", "global_seed", "num_samples",
                 "balanced", "precision", "tf32", "vae", "latents_scale", "path_type", "model", "model_config")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r} ({e})") from e


def _modes(text: str) -> list[str]:
    modes = [v.strip() for v in text.split(",") if v.strip()]
    bad = [m for m in modes if m not in SAMPLER_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"modes must be among {', '.join(SAMPLER_MODES)}, got {bad}")
    return modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("checkpoint and reference")
    g.add_argument("--ckpt", type=str, default=f"hf:{OFFICIAL_HUB_REPO}", help="as generate.py's --ckpt")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="the EMA weights")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's old decoder_blocks.* checkpoints (as generate.py)")
    g.add_argument("--vae", type=str, default=None,
                   help="as generate.py's --vae (default: ema for SD-VAE latents, else the checkpoint's codec)")
    g.add_argument("--path-type", type=str, choices=["linear", "cosine"], default=None,
                   help="interpolant (default: the checkpoint's)")
    g.add_argument("--ref-batch", type=str, required=True, help="reference npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    g.add_argument("--inception-weights", type=str, default=None,
                   help="Inception-2015 .pth (default: the evaluator's; 'random' for smoke tests)")
    g.add_argument("--out", type=str, required=True, help="output folder (resumable)")

    g = p.add_argument_group("grid (comma-separated lists; the grid is their product)")
    g.add_argument("--mode", type=_modes, default="sde",
                   help="sde, ode, dpm2m and/or unipc (as generate.py's --mode)")
    g.add_argument("--num-steps", type=_ints, default="250", help="sampler steps")
    g.add_argument("--cfg-scale", type=finite_floats(0), default="1,1.5,2.3", help="guidance scales (<= 1: unguided)")
    g.add_argument("--cls-cfg-scale", type=finite_floats(0), default="2.3", help="class-token guidance scales")
    g.add_argument("--guidance-low", type=finite_floats(0, 1), default="0", help="lower ends of the guidance interval")
    g.add_argument("--guidance-high", type=finite_floats(0, 1), default="0.85,1", help="upper ends of the guidance interval")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False, help="Heun (ode only)")

    g = p.add_argument_group("run")
    g.add_argument("--num-samples", type=int, default=10_000, help="images per setting (the paper: 50000)")
    g.add_argument("--global-seed", type=int, default=0, help="image i depends only on (seed, i)")
    g.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=False,
                   help="class of image i = i mod num_classes")
    g.add_argument("--per-proc-batch-size", type=int, default=64, help="images per sampler forward, per process")
    g.add_argument("--eval-batch-size", type=int, default=100, help="images per Inception forward")
    g.add_argument("--precision", type=str, choices=["fp32", "bf16", "fp64"], default="fp32",
                   help="as generate.py's --precision")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls in the sampler")
    g.add_argument("--device", type=str, default=None, help="cpu | cuda (default: cuda:LOCAL_RANK if available)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The grid


def setting_key(s: dict) -> str:
    key = f"{s['mode']}-{s['num_steps']}-cfg-{s['cfg_scale']}-clscfg-{s['cls_cfg_scale']}-gl-{s['guidance_low']}-" \
          f"gh-{s['guidance_high']}"
    return key + ("-heun" if s.get("heun") else "")


def canonical(s: dict) -> dict:
    """Unguided settings (cfg <= 1) do not depend on the class-token scale or the interval."""
    s = dict(s)
    if s["cfg_scale"] <= 1.0:
        s.update(cfg_scale=1.0, cls_cfg_scale=0.0, guidance_low=0.0, guidance_high=1.0)
    if s["mode"] != "ode":
        s["heun"] = False
    return s


def build_grid(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(requested settings, the distinct settings to sample); impossible ones are skipped."""
    requested, distinct = [], {}
    for mode, steps, cfg, cls_cfg, low, high in itertools.product(
            args.mode, args.num_steps, args.cfg_scale, args.cls_cfg_scale, args.guidance_low, args.guidance_high):
        s = {"mode": mode, "num_steps": steps, "cfg_scale": cfg, "cls_cfg_scale": cls_cfg,
             "guidance_low": low, "guidance_high": high, "heun": bool(args.heun and mode == "ode")}
        if low > high:
            warnings.warn(f"skipping guidance-low {low} > guidance-high {high}")
            continue
        if cfg < 0 or cls_cfg < 0 or steps < 1:
            raise UserError(f"impossible setting {s}: scales must be >= 0 and steps >= 1")
        requested.append(s)
        c = canonical(s)
        distinct.setdefault(setting_key(c), c)
    if not requested:
        raise UserError("the grid is empty (every combination has guidance-low > guidance-high)")
    return requested, list(distinct.values())


# ----------------------------------------------------------------------------------------------
# Output folder


def check_manifest(out: Path, manifest: dict) -> None:
    """Results in `out` are only comparable if made with the same checkpoint, reference, seed and count
    (MANIFEST_KEYS); a new folder gets its sweep.json here."""
    settings_dir = out / "settings"
    check_same_settings(out / "sweep.json", manifest, MANIFEST_KEYS,
                        holds_results=settings_dir.is_dir() and any(settings_dir.glob("*.json")), hint="use another --out")
    if not (out / "sweep.json").exists():
        atomic_json_dump(manifest, out / "sweep.json")


def paper_numbers(model: str) -> list[dict] | None:
    """The paper's REG results for this model size (evaluations.compare.paper_reference); None when
    that table is not available, [] for a size the paper does not report."""
    try:
        from evaluations.compare import paper_reference
    except ImportError:
        return None
    try:
        rows = paper_reference(model)
    except Exception as e:  # a missing or unreadable results file must not cost the sweep's results
        warnings.warn(f"the paper's numbers are unavailable ({type(e).__name__}: {e})")
        return None
    return [r for r in rows if r.get("method") == "reg"]


def _paper_cell(paper: list[dict] | None, guided: bool) -> str:
    if paper is None:
        return "n/a (evaluations.compare not available)"
    rows = [r for r in paper if bool(r.get("guidance")) == guided and r.get("fid") is not None]
    if not rows:
        return "n/a (not reported for this size)"
    return "; ".join(f"{r['fid']} ({r['iterations'] // 1000}K it" + (f", cfg {r['cfg']}" if guided and r.get('cfg')
                                                                     else "") + ")" for r in rows)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_table(out: Path, rows: list[dict], manifest: dict, paper: list[dict] | None) -> dict:
    """results.json and results.md: every setting, best FID first, then the headline numbers."""
    rows = sorted(rows, key=lambda r: r["metrics"]["fid"])
    guided = [r for r in rows if r["cfg_scale"] > 1.0]
    unguided = [r for r in rows if r["cfg_scale"] <= 1.0]
    summary = {
        "best_guided": guided[0] if guided else None,
        "unguided": unguided[0] if unguided else None,
        "paper": paper,
    }
    atomic_json_dump({"manifest": manifest, "summary": summary, "rows": rows}, out / "results.json", nan_as_null=True)

    cols = ["mode", "num_steps", "cfg_scale", "cls_cfg_scale", "guidance_low", "guidance_high"]
    metrics = ["fid", "sfid", "inception_score", "precision", "recall"]
    lines = [f"# Guidance sweep: {manifest['model']}, {manifest['num_samples']} samples, seed {manifest['global_seed']}",
             "", f"checkpoint `{manifest['checkpoint']['path']}`, reference `{manifest['reference']['source']}`", ""]
    lines += ["| | ours: FID | paper, REG: FID |", "|---|---|---|"]
    best, unguided_row = summary["best_guided"], summary["unguided"]
    lines.append(f"| best with guidance | {_fmt(best['metrics']['fid']) + ' (' + setting_key(best) + ')' if best else 'n/a'}"
                 f" | {_paper_cell(paper, True)} |")
    lines.append(f"| without guidance (cfg 1) | {_fmt(unguided_row['metrics']['fid']) if unguided_row else 'n/a'}"
                 f" | {_paper_cell(paper, False)} |")
    lines += ["", "| " + " | ".join(cols + metrics) + " |", "|" + "---|" * (len(cols) + len(metrics))]
    for r in rows:
        lines.append("| " + " | ".join([str(r[c]) for c in cols] + [_fmt(r["metrics"].get(m)) for m in metrics]) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    return summary


def write_plot(out: Path, rows: list[dict]) -> None:
    """FID against the cfg scale, one line per combination of the other settings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = ("mode", "num_steps", "cls_cfg_scale", "guidance_low", "guidance_high")
    unguided = [r for r in rows if r["cfg_scale"] <= 1.0]
    lines: dict[tuple, list] = {}
    for r in rows:
        if r["cfg_scale"] > 1.0:
            lines.setdefault(tuple(r[k] for k in others), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for combo, rs in sorted(lines.items()):
        base = [u for u in unguided if (u["mode"], u["num_steps"]) == combo[:2]]
        pts = sorted([(r["cfg_scale"], r["metrics"]["fid"]) for r in rs + base[:1]])
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if not lines:
        pts = sorted((r["cfg_scale"], r["metrics"]["fid"]) for r in rows)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label="unguided")
    ax.set_xlabel("cfg scale")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "fid.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main


def _sample_features(features, model, codec, mine: list[int], s: dict, args, config: dict, latents_scale: float,
                     device, bar) -> None:
    """Sample this process's images of setting `s` into the feature accumulator (NonFiniteSampleError names
    an image that is not finite: no FID is computed from it)."""
    for idx, images, _ in generate_images(
            model, codec, mine, global_seed=args.global_seed, num_classes=model.num_classes,
            balanced=args.balanced, mode=s["mode"], num_steps=s["num_steps"], cfg_scale=s["cfg_scale"],
            cls_cfg_scale=s["cls_cfg_scale"], guidance_low=s["guidance_low"],
            guidance_high=s["guidance_high"], heun=s["heun"], path_type=config["path_type"],
            latents_scale=latents_scale, batch_size=args.per_proc_batch_size, device=device,
            dtype=autocast_dtype(args.precision)):
        features.add(images)
        bar.update(len(idx))
        if stop_signals.stop_requested():  # a signal: the caller discards this setting
            break


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot be meant before any model is loaded (the grid itself: build_grid)."""
    if args.num_samples < 2 or args.per_proc_batch_size < 1 or args.eval_batch_size < 1:
        raise UserError("--num-samples must be >= 2, --per-proc-batch-size and --eval-batch-size >= 1")
    if args.global_seed < 0:
        raise UserError(f"--global-seed must be >= 0, got {args.global_seed}")
    if not os.path.isfile(args.ref_batch):
        raise UserError(f"--ref-batch {args.ref_batch} is not a file")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a folder")


@torch.no_grad()
@processes.command("sweep.py", launcher="torchrun")
def main(args: argparse.Namespace) -> dict | None:
    from evaluations import evaluator

    check_args(args)
    requested, distinct = build_grid(args)
    info = processes.init_distributed(args.device)
    try:
        if args.num_samples < info.world_size:
            raise UserError(f"--num-samples {args.num_samples} < {info.world_size} processes")
        return _sweep(args, info, requested, distinct, evaluator)
    finally:
        info.close()


def _sweep(args, info: processes.DistInfo, requested: list[dict], distinct: list[dict], evaluator) -> dict | None:
    set_fp32_precision("tf32" if args.tf32 else "ieee")
    loaded = load_generator(args.ckpt, use_ema=args.ema, legacy=args.legacy, precision=args.precision, vae=args.vae,
                            device=info.device, overrides={"path_type": args.path_type})
    inception = evaluator.build_inception(args.inception_weights, info.device, verbose=info.is_main)
    manifest = build_manifest(args, loaded, inception.weights_id)
    out = Path(args.out)
    settings_dir = out / "settings"
    ref = None
    folder_lock.hold_folder(out, hint="choose another --out", rank=info.rank, world=info.world_size)

    def prepare() -> None:
        nonlocal ref
        settings_dir.mkdir(parents=True, exist_ok=True)
        check_manifest(out, manifest)
        pin_checkpoint(args.ckpt, out, by="sweep.py")  # kept from its run's pruning until the table is written
        ref = evaluator.load_reference(args.ref_batch, inception, cache_path=str(out / "reference-stats.npz"),
                                       batch_size=args.eval_batch_size)

    info.main_first(prepare)
    todo = [s for s in distinct if not (settings_dir / f"{setting_key(s)}.json").exists()]
    if info.is_main:
        print(f"sweep {out}: {len(distinct)} distinct settings ({len(requested)} requested), "
              f"{len(distinct) - len(todo)} already done, {args.num_samples} images each on "
              f"{info.world_size} process(es)", flush=True)
    for n, s in enumerate(todo):
        if not _run_setting(args, info, loaded, s, f"{n + 1}/{len(todo)}", evaluator, inception, ref, settings_dir):
            # a signal: this setting is discarded, the finished kept
            raise stop_signals.stopped(f"{n} setting(s) finished in {out}, {setting_key(s)} discarded", is_main=info.is_main)
        info.barrier()
    if not info.is_main:
        return None
    rows = _collect_rows(requested, settings_dir)
    summary = write_table(out, rows, manifest, paper_numbers(loaded.config["model"]))
    write_plot(out, rows)
    unpin_checkpoint(args.ckpt, out)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'fid.png'}")
    return summary


def build_manifest(args: argparse.Namespace, loaded: LoadedGenerator, inception_weights_id: str) -> dict:
    """sweep.json: what every stored metric depends on besides its own sampler setting (MANIFEST_KEYS)."""
    ref_stat = os.stat(args.ref_batch)
    config = loaded.config
    return {
        "checkpoint": checkpoint_identity(args.ckpt), "ema": args.ema,
        "reference": {"source": os.path.abspath(args.ref_batch), "size": ref_stat.st_size,
                      "mtime_ns": ref_stat.st_mtime_ns},
        "inception_weights_id": inception_weights_id, "global_seed": args.global_seed,
        "num_samples": args.num_samples, "balanced": args.balanced, "precision": args.precision, "tf32": args.tf32,
        "vae": loaded.vae_spec, "latents_scale": loaded.latents_scale, "path_type": config["path_type"],
        "model": config["model"], "model_config": config,
    }


def _run_setting(args, info: processes.DistInfo, loaded: LoadedGenerator, s: dict, progress: str, evaluator, inception, ref,
                 settings_dir: Path) -> bool:
    """Sample setting `s` on every process; rank 0 scores it and writes settings/KEY.json. False when a signal
    stopped some process: the setting is left unwritten."""
    start = time.perf_counter()
    mine = list(range(info.rank, args.num_samples, info.world_size))  # the same indices for every setting
    features = evaluator.FeatureAccumulator(inception, batch_size=args.eval_batch_size)
    bar = tqdm(total=len(mine), desc=f"setting {progress} {setting_key(s)}", unit="img",
               disable=not info.is_main, leave=False)  # this process's share; the main process shows it
    info.run_together(lambda: _sample_features(features, loaded.model, loaded.codec, mine, s, args, loaded.config,
                                               loaded.latents_scale, info.device, bar))
    bar.close()
    if stop_signals.any_rank_stopping(info.world_size):
        return False
    feats = gather_features(mine, features.features(), info.world_size)
    if not info.is_main:
        return True
    batch = evaluator.batch_from_features(feats["pool"], feats["spatial"], feats["logits"],
                                          name=setting_key(s), image_shape=features.image_shape)
    metrics = evaluator.compute_metrics(ref, batch)
    seconds = time.perf_counter() - start
    atomic_json_dump({**s, "metrics": metrics, "seconds": seconds}, settings_dir / f"{setting_key(s)}.json",
                     nan_as_null=True)
    print(f"[{progress}] {setting_key(s)}: FID {metrics['fid']:.3f}, sFID {metrics['sfid']:.3f}, "
          f"IS {metrics['inception_score']:.2f} ({seconds:.0f} s)", flush=True)
    return True


def _collect_rows(requested: list[dict], settings_dir: Path) -> list[dict]:
    """One row per requested setting, with the metrics of its distinct setting; one per distinct unguided one."""
    rows, seen = [], set()
    for s in requested:
        c = canonical(s)
        if c["cfg_scale"] <= 1.0:  # one row per distinct unguided setting
            if setting_key(c) in seen:
                continue
            seen.add(setting_key(c))
            s = c
        done = json.loads((settings_dir / f"{setting_key(c)}.json").read_text())
        rows.append({**s, "metrics": done["metrics"]})
    return rows


if __name__ == "__main__":
    run_main(main, parse_args, user_errors=(CheckpointError,))
