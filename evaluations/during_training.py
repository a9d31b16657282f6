"""FID during training (train.py --eval-every): the EMA model is sampled with the same per-image seeds
at every evaluation, sharded over all processes, and its images go straight from the decoder into
Inception (no PNGs). The reference statistics are computed once and kept in the run folder.

Each FID record names every setting its value depends on (reg.run_log.EVAL_SETTING_KEYS: the reference's
content hash, sampler, steps, guidance, VAE, number of images, Inception weights, seed, precision); a step
counts as evaluated only under the settings of this run. A stop signal ends an evaluation after its current
batch (EvalStopped, on every rank at once); it runs again when the run resumes."""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reg import stop_signals
from reg.processes import gather_features
from reg.run_log import eval_setting
from reg.seeded_images import NonFiniteSampleError
from reg.utils import file_sha256

GO_ON, STOP, FAILED = 0, 1, 2  # what the ranks agree on after each batch (the largest wins)


class EvalStopped(Exception):
    """A stop signal ended the evaluation after its current batch, on every rank; nothing was logged."""


class InTrainingEval:
    def __init__(self, args: argparse.Namespace, config: dict, accelerator, log):
        from accelerate.utils import broadcast_object_list

        from evaluations.evaluator import build_inception, load_reference, resolve_weights
        from models.vae import load_vae

        self.args, self.config, self.accelerator, self.log = args, config, accelerator, log
        device = accelerator.device
        # everything that can fail (weights, reference, VAE) fails at start-up, not hours into the run
        self.inception = build_inception(resolve_weights(args.inception_weights), device=device)
        self.vae = load_vae(config["vae"], device=device)
        cuda_bf16 = device.type == "cuda" and accelerator.mixed_precision == "bf16"
        self.dtype = torch.bfloat16 if cuda_bf16 else None
        self.ref, settings = None, [None]
        if accelerator.is_main_process:
            cache = Path(args.output_dir) / args.exp_name / "eval_reference.npz"
            sha = file_sha256(args.eval_ref)
            self.ref = load_reference(args.eval_ref, self.inception, cache_path=str(cache), source_sha256=sha)
            settings = [self.record_settings(sha)]
        if accelerator.num_processes > 1:  # the reference is hashed once; every rank must agree on what is done
            broadcast_object_list(settings)
        self.settings = settings[0]
        mine = eval_setting(self.settings)
        self.done = {r["step"] for r in log.read_metrics() if "fid" in r and eval_setting(r) == mine}

    def record_settings(self, ref_sha256: str) -> dict:
        """What an FID of this run depends on besides the weights: stored in every record (EVAL_SETTING_KEYS)."""
        a = self.args
        return {"eval_ref_sha256": ref_sha256, "eval_mode": a.eval_mode, "eval_steps": a.eval_steps,
                "eval_cfg": a.eval_cfg, "eval_cls_cfg": a.eval_cls_cfg, "eval_guidance_low": 0.0,
                "eval_guidance_high": a.eval_guidance_high, "eval_vae": self.config["vae"],
                "eval_samples": a.eval_samples, "eval_inception": self.inception.weights_id, "eval_seed": a.seed,
                "eval_dtype": "bf16" if self.dtype == torch.bfloat16 else "fp32"}

    def due(self, step: int, max_steps: int) -> bool:
        return (step % self.args.eval_every == 0 or step == max_steps) and step not in self.done

    @torch.no_grad()
    def sample_features(self, ema: torch.nn.Module, step: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """This process's share of the images, straight into Inception: (indices, features). Image i's
        seed depends only on (--seed, i), so every evaluation sees the same noise and classes.
        After each batch the ranks agree (one all-reduce per batch) whether to go on: a stop signal on any
        rank raises EvalStopped on all, a non-finite image on any rank stops all (raised on its own rank)."""
        from evaluations.evaluator import FeatureAccumulator
        from reg.seeded_images import generate_images

        a, accelerator, world = self.args, self.accelerator, self.accelerator.num_processes
        features = FeatureAccumulator(self.inception)
        indices: list[int] = []
        mine = range(accelerator.process_index, a.eval_samples, world)
        rounds = math.ceil(math.ceil(a.eval_samples / world) / a.eval_batch_size)  # the largest share's batches
        # the training bar stands still meanwhile: this one shows the evaluation moving (main process only)
        bar = tqdm(total=len(mine), desc=f"FID at step {step}" if step is not None else "FID", unit="img",
                   disable=not accelerator.is_main_process, leave=False)
        batches = generate_images(
                ema, self.vae, mine, global_seed=a.seed,
                num_classes=self.config["num_classes"], balanced=True, mode=a.eval_mode, num_steps=a.eval_steps,
                cfg_scale=a.eval_cfg, cls_cfg_scale=a.eval_cls_cfg, guidance_high=a.eval_guidance_high,
                path_type=self.config["path_type"], latents_scale=self.config["latents_scale"],
                batch_size=a.eval_batch_size, device=accelerator.device, dtype=self.dtype)
        error, agreed = None, GO_ON
        for _ in range(rounds):  # every rank runs the same number of rounds, a shorter share idles in its last
            status = GO_ON
            try:
                idx, images, _ = next(batches)
                features.add(images)
                indices += list(idx)
                bar.update(len(idx))
            except StopIteration:
                pass
            except NonFiniteSampleError as e:
                error, status = e, FAILED
            if stop_signals.stop_requested():
                status = max(status, STOP)
            if agreed := stop_signals.max_over_ranks(status, world):
                break
        bar.close()
        if error is not None:
            raise error
        if agreed == STOP:
            raise EvalStopped(f"evaluation at step {step} stopped by a signal")
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
                      **self.settings}
            self.log.metrics(record)
            self.log.info(f"eval at step {step}: FID {metrics['fid']:.3f} sFID {metrics['sfid']:.3f} "
                          f"IS {metrics['inception_score']:.2f} P {metrics['precision']:.3f} R {metrics['recall']:.3f} "
                          f"({a.eval_samples} images, {record['eval_time_s']:.1f} s)")
        self.done.add(step)
        accelerator.wait_for_everyone()
        return record
