"""FID during training (train.py --eval-every): the EMA model is sampled with the same per-image seeds
at every evaluation, sharded over all processes, and its images go straight from the decoder into
Inception (no PNGs). The reference statistics are computed once and kept in the run folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reg.processes import gather_features
from reg.seeded_images import NonFiniteSampleError


class InTrainingEval:
    def __init__(self, args: argparse.Namespace, config: dict, accelerator, log):
        from evaluations.evaluator import build_inception, load_reference, resolve_weights
        from models.vae import load_vae

        self.args, self.config, self.accelerator, self.log = args, config, accelerator, log
        device = accelerator.device
        # everything that can fail (weights, reference, VAE) fails at start-up, not hours into the run
        self.inception = build_inception(resolve_weights(args.inception_weights), device=device)
        self.vae = load_vae(config["vae"], device=device)
        self.ref = None
        if accelerator.is_main_process:
            cache = Path(args.output_dir) / args.exp_name / "eval_reference.npz"
            self.ref = load_reference(args.eval_ref, self.inception, cache_path=str(cache))
        self.done = {r["step"] for r in log.read_metrics() if "fid" in r}
        cuda_bf16 = device.type == "cuda" and accelerator.mixed_precision == "bf16"
        self.dtype = torch.bfloat16 if cuda_bf16 else None

    def due(self, step: int, max_steps: int) -> bool:
        return (step % self.args.eval_every == 0 or step == max_steps) and step not in self.done

    @torch.no_grad()
    def sample_features(self, ema: torch.nn.Module, step: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """This process's share of the images, straight into Inception: (indices, features). Image i's
        seed depends only on (--seed, i), so every evaluation sees the same noise and classes."""
        from evaluations.evaluator import FeatureAccumulator
        from reg.seeded_images import generate_images

        a, accelerator = self.args, self.accelerator
        features = FeatureAccumulator(self.inception)
        indices: list[int] = []
        mine = range(accelerator.process_index, a.eval_samples, accelerator.num_processes)
        # the training bar stands still meanwhile: this one shows the evaluation moving (main process only)
        bar = tqdm(total=len(mine), desc=f"FID at step {step}" if step is not None else "FID", unit="img",
                   disable=not accelerator.is_main_process, leave=False)
        for idx, images, _ in generate_images(
                ema, self.vae, mine, global_seed=a.seed,
                num_classes=self.config["num_classes"], balanced=True, mode=a.eval_mode, num_steps=a.eval_steps,
                cfg_scale=a.eval_cfg, cls_cfg_scale=a.eval_cls_cfg, guidance_high=a.eval_guidance_high,
                path_type=self.config["path_type"], latents_scale=self.config["latents_scale"],
                batch_size=a.eval_batch_size, device=accelerator.device, dtype=self.dtype):
            features.add(images)
            indices += list(idx)
            bar.update(len(idx))
        bar.close()
        return np.asarray(indices), features.features()

    def run(self, ema: torch.nn.Module, step: int) -> dict | None:
        """Evaluate the EMA model at `step`; the main process logs and returns the record."""
        from evaluations.evaluator import batch_from_features, compute_metrics

        a, accelerator = self.args, self.accelerator
        start = time.time()
        indices, features, error = [], None, None
        try:
            indices, features = self.sample_features(ema, step)
        except NonFiniteSampleError as e:
            error = str(e)
        errors = [error]
        if accelerator.num_processes > 1:  # every rank learns of a failure on any rank
            errors = [None] * accelerator.num_processes
            torch.distributed.all_gather_object(errors, error)
        record = None
        if failed := [e for e in errors if e is not None]:
            # never a FID from NaN images; the weights themselves are checked at every checkpoint
            if accelerator.is_main_process:
                self.log.info(f"WARNING: eval at step {step} skipped, no FID logged: {failed[0]}")
        elif (merged := gather_features(indices, features, accelerator.num_processes)) is not None:
            sample = batch_from_features(merged["pool"], merged["spatial"], merged["logits"], name=f"step {step}")
            metrics = compute_metrics(self.ref, sample)
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "eval_time_s": time.time() - start,
                      "eval_samples": a.eval_samples, "eval_mode": a.eval_mode, "eval_steps": a.eval_steps,
                      "eval_cfg": a.eval_cfg, "eval_cls_cfg": a.eval_cls_cfg}
            self.log.metrics(record)
            self.log.info(f"eval at step {step}: FID {metrics['fid']:.3f} sFID {metrics['sfid']:.3f} "
                          f"IS {metrics['inception_score']:.2f} P {metrics['precision']:.3f} R {metrics['recall']:.3f} "
                          f"({a.eval_samples} images, {record['eval_time_s']:.1f} s)")
        self.done.add(step)
        accelerator.wait_for_everyone()
        return record
