"""ADM-exact FID / sFID / Inception Score / Precision / Recall, in PyTorch (no TensorFlow): the command line,
and the one place to import the evaluator's API from.

Every number in this field is reported with OpenAI's ADM evaluator (guided-diffusion/evaluations,
TensorFlow 1 graph of Inception-v3 2015-12-05). This package reproduces it (docs/design.md#evaluation):

- Network (evaluations/inception.py): torch-fidelity's `FeatureExtractorInceptionV3`, an exact port of
  that graph (TF1 bilinear resize to 299, (x - 128) / 128, same weights
  `weights-inception-2015-12-05-6726825d.pth`).
- Features (evaluations/features.py): FID on pool_3 (2048-d); sFID on `mixed_6/conv` =
  `Mixed_6d.branch1x1` after BN+ReLU, first 7 channels, flattened channels-last (17*17*7 = 2023-d);
  IS on softmax(pool_3 @ W), W the 2048x1008 logits weight without bias.
- Metrics (evaluations/metrics.py): ADM's statistics, Fréchet distance, Inception Score, and
  precision/recall with ADM's k-NN manifolds (k=3).
- Inputs (evaluations/npz.py): npz files streamed in batches, CRC-checked.

Usage (ADM's positional form; REG's evaluator flags work unchanged):

    python -m evaluations.evaluator VIRTUAL_imagenet256_labeled.npz samples.npz --save-path out.json
    python evaluations/evaluator.py --ref_batch REF.npz --sample_batch SAMPLE.npz --save_path DIR \
        --cfg_cond 1 --step 4000000 --num_steps 250 --cfg 2.3 --cls_cfg 2.3 --gh 0.85
    python -m evaluations.evaluator REF.npz --save-stats ref_stats.npz   # features of one batch, once

In memory (in-training FID, guidance sweeps; images go from the decoder straight into Inception):

    model = build_inception(resolve_weights(None), "cuda")
    ref = load_reference("VIRTUAL_imagenet256_labeled.npz", model, cache_path="ref_stats.npz")
    acc = FeatureAccumulator(model)
    acc.add(uint8_images)            # any number of times; (N, 3, H, W) or (N, H, W, 3)
    metrics = compute_metrics(ref, acc.finish())

The metric functions (`frechet_distance`, `inception_score`, `precision_recall`) are importable from
here too and work on plain NumPy arrays.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`python evaluations/evaluator.py`, as REG's eval.sh does): hand over to the module form,
    # as preprocessing/dataset_tools.py does (which says why)
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-m", "evaluations.evaluator", *sys.argv[1:]], _env)

import argparse
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# The evaluator's API lives in its modules; the names that other code imports from here stay importable
# (evaluations/during_training.py, sweep.py, benchmarks/run.py, docs/evaluation.md's examples).
from evaluations.common import EvalInputError, InceptionWeightsError, default_device, log  # noqa: F401
from evaluations.features import (BatchFeatures, FeatureAccumulator, batch_from_features, compute_metrics,  # noqa: F401
                                  extract_features, load_batch, load_reference, save_statistics)
from evaluations.inception import (INCEPTION_FILENAME, WEIGHTS_ENV, InceptionV3, build_inception,  # noqa: F401
                                   resolve_weights)
from evaluations.metrics import compute_statistics, frechet_distance, inception_score, precision_recall  # noqa: F401
from evaluations.npz import BatchInfo, NpzImageReader, inspect_batch  # noqa: F401
from reg.utils import ArgumentParser, atomic_json_dump, atomic_write_bytes, finite_float, run_main

# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m evaluations.evaluator",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ADM-exact FID / sFID / IS / precision / recall without TensorFlow "
                    "(docs/design.md#evaluation). Accepts REG's evaluations/evaluator.py flags unchanged.")
    g = p.add_argument_group("inputs")
    g.add_argument("batches", nargs="*", metavar="NPZ",
                   help="REF.npz SAMPLE.npz (ADM's order), or one NPZ together with --save-stats")
    g.add_argument("--ref_batch", "--ref-batch", default=None, help="reference batch (flag form of REF.npz)")
    g.add_argument("--sample_batch", "--sample-batch", default=None, help="sample batch (flag form of SAMPLE.npz)")
    g = p.add_argument_group("outputs")
    g.add_argument("--save_path", "--save-path", default=None,
                   help="PATH ending in .json: write the metrics there as JSON. Any other PATH, as in REG's "
                        "evaluator: create the folder PATH if missing, write the five metric lines to PATH + "
                        "num_steps + step + cfg + gh + cls_cfg + 'cfg_cond_true.txt' (or 'cfg_cond_false.txt'), "
                        "concatenated without a separator, and the JSON beside it (same name, .json)")
    g.add_argument("--save-stats", "--save_stats", default=None,
                   help="write mu/sigma/mu_s/sigma_s + pool_3 features of the sample batch (or of the only "
                        "batch given) to this .npz; pass it later instead of the images")
    g = p.add_argument_group("run description (REG's evaluator flags: they only name the text file, "
                             "and are recorded in the JSON)")
    g.add_argument("--cfg_cond", default=1, type=int, help="1: name ends in cfg_cond_true.txt, 0: cfg_cond_false.txt")
    g.add_argument("--step", default=1, type=int, help="training step of the checkpoint")
    g.add_argument("--num_steps", default=250, type=int, help="sampling steps")
    g.add_argument("--cfg", default=1.0, type=finite_float(0), help="classifier-free guidance scale")
    g.add_argument("--cls_cfg", default=1.0, type=finite_float(0), help="class-token guidance scale")
    g.add_argument("--gh", default=1.0, type=finite_float(0, 1), help="guidance high (guidance while t <= gh)")
    g = p.add_argument_group("Inception network")
    g.add_argument("--inception-weights", default=None,
                   help=f"local {INCEPTION_FILENAME}, or 'random' (smoke tests only); if unset: "
                        f"${WEIGHTS_ENV}, else torch-fidelity's download into the torch hub checkpoints dir")
    g.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    g.add_argument("--device", default=None, help="cuda / cpu; if unset: cuda when available")
    g.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)

    positional = list(args.batches)
    if args.ref_batch is None and positional:
        args.ref_batch = positional.pop(0)
    if args.sample_batch is None and positional:
        args.sample_batch = positional.pop(0)
    if positional:
        p.error(f"too many input files: {args.batches} (give REF.npz SAMPLE.npz)")
    if args.ref_batch is None or (args.sample_batch is None and args.save_stats is None):
        p.error("need REF.npz and SAMPLE.npz (or one NPZ with --save-stats)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def original_text_path(save_path: str, num_steps: int, step: int, cfg: float, gh: float, cls_cfg: float,
                       cfg_cond: int) -> str:
    """REG evaluations/evaluator.py main(): the result file's name is these values concatenated onto
    save_path without a separator (so it lands next to the folder save_path, not inside it)."""
    tail = "cfg_cond_true.txt" if cfg_cond else "cfg_cond_false.txt"
    return save_path + str(num_steps) + str(step) + str(cfg) + str(gh) + str(cls_cfg) + tail


@dataclass
class OutputPlan:
    json_path: Optional[str] = None
    text_path: Optional[str] = None
    stats_path: Optional[str] = None
    make_dir: Optional[str] = None  # REG's evaluator creates save_path as a folder


def _check_writable(path: str, flag: str, inputs: Sequence[str]) -> None:
    if os.path.isdir(path):
        raise EvalInputError(f"{flag}: {path} is a directory; the output file cannot be written there")
    for src in inputs:
        if src and os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise EvalInputError(f"{flag}: {path} is the input batch {src}; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise EvalInputError(f"{flag}: cannot create the folder for {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvalInputError(f"{flag}: cannot write {path}: {existing} is not writable")


def plan_outputs(args: argparse.Namespace) -> OutputPlan:
    """Every output path, checked before any image is read (a bad one used to fail after the work)."""
    plan, inputs = OutputPlan(), [args.ref_batch, args.sample_batch]
    if args.save_path:
        if args.save_path.endswith(".json"):
            plan.json_path = args.save_path
        else:
            # REG's evaluator creates the folder save_path when missing (its text file lands beside it)
            plan.make_dir = None if os.path.exists(args.save_path) else args.save_path
            plan.text_path = original_text_path(args.save_path, args.num_steps, args.step, args.cfg, args.gh,
                                                args.cls_cfg, args.cfg_cond)
            plan.json_path = plan.text_path[:-len(".txt")] + ".json"
            if plan.make_dir:
                _check_writable(plan.make_dir, "--save_path", inputs)
            _check_writable(plan.text_path, "--save_path", inputs)
        _check_writable(plan.json_path, "--save_path", inputs)
    if args.save_stats:
        _check_writable(args.save_stats, "--save-stats", inputs)
        plan.stats_path = args.save_stats
    return plan


METRIC_LINES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                ("Precision", "precision"), ("Recall", "recall"))


def original_text(metrics: dict) -> str:
    """The five lines REG's evaluator writes, in its format ("{}".format of each value)."""
    return "".join("{}: {}\n".format(label, metrics[key]) for label, key in METRIC_LINES)


def _describe(info: BatchInfo) -> dict:
    return {"file": os.path.basename(info.path), "path": os.path.abspath(info.path),
            "size_bytes": os.path.getsize(info.path), "num_images": info.num_images,
            "image_shape": list(info.image_shape) if info.image_shape else None,
            "stored_statistics": info.stored_stats}


def main(args: argparse.Namespace) -> dict:
    start = time.time()
    verbose = not args.quiet
    device = torch.device(args.device) if args.device else default_device()
    k = 3

    # Check every input and output before the expensive part, so a bad path fails in seconds.
    infos = [inspect_batch(p) for p in (args.ref_batch, args.sample_batch) if p is not None]
    if len(infos) == 2:
        for info in infos:
            if info.num_images < k + 1:
                raise EvalInputError(f"{info.path}: {info.num_images} images, but precision/recall with k={k} "
                                     f"needs at least {k + 1} per batch (ADM uses 50000 samples, 10000 refs)")
        shapes = [info.image_shape for info in infos]
        if None not in shapes and shapes[0][:2] != shapes[1][:2]:
            msg = (f"reference {infos[0].path} is {shapes[0][0]}x{shapes[0][1]} but samples {infos[1].path} are "
                   f"{shapes[1][0]}x{shapes[1][1]}: Inception resizes both to 299, but such FIDs are not comparable "
                   "with published ones (use the reference batch of the samples' resolution)")
            log(f"warning: {msg}", verbose)
            warnings.warn(msg)
    plan = plan_outputs(args)
    if plan.make_dir:
        os.makedirs(plan.make_dir, exist_ok=True)

    model = build_inception(resolve_weights(args.inception_weights), device, verbose)
    if len(infos) == 1:  # stats-only mode: one batch in, its statistics out
        batch = load_batch(infos[0], model, args.batch_size, need_logits=False, verbose=verbose)
        save_statistics(plan.stats_path, batch, model)
        log(f"wrote statistics of {infos[0].path} to {plan.stats_path}", verbose)
        return {"saved_stats": plan.stats_path}

    ref = load_batch(infos[0], model, args.batch_size, need_logits=False, verbose=verbose)
    sample = load_batch(infos[1], model, args.batch_size, need_logits=True, verbose=verbose)
    if plan.stats_path:
        save_statistics(plan.stats_path, sample, model)
        log(f"wrote statistics of {sample.info.path} to {plan.stats_path}", verbose)

    log("computing evaluations...", verbose)
    metrics = compute_metrics(ref, sample, k=k, device=device)
    print(original_text(metrics), end="", flush=True)

    result = dict(metrics)
    result.update({"ref_batch": _describe(ref.info), "sample_batch": _describe(sample.info),
                   "inception_weights": model.weights, "inception_weights_id": model.weights_id, "k": k,
                   "device": str(device), "seconds": round(time.time() - start, 2),
                   "run": {key: getattr(args, key) for key in ("cfg_cond", "step", "num_steps", "cfg", "cls_cfg", "gh")}})
    if model.random_weights:
        result["warning"] = "random Inception weights: these numbers are meaningless"
    if plan.text_path:
        atomic_write_bytes(plan.text_path, original_text(metrics).encode())
        log(f"wrote {plan.text_path}", verbose)
    if plan.json_path:
        atomic_json_dump(result, plan.json_path, sort_keys=False, nan_as_null=True)
        log(f"wrote {plan.json_path}", verbose)
    return result


if __name__ == "__main__":
    run_main(main, parse_args)  # EvalInputError is a UserError, InceptionWeightsError a FileNotFoundError
