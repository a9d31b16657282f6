"""Checkpoint files: safe reading, atomic writing, and the training checkpoint folder.

Formats:
  * ours, training:  OUTPUT/EXP/checkpoints/{step:07d}.pt = {"model", "ema", "steps", "config", "args"}
                     (tensors, numbers, strings and lists only: loads with weights_only=True)
  * ours, release:   ema_{step:07d}.safetensors + ema_{step:07d}.json (the model config)
  * official REG/REPA .pt files: {"model", "ema", "opt", "steps", "args": argparse.Namespace}; the
    Namespace is allow-listed for the weights_only unpickler, nothing else is.

Writes are atomic (reg.utils.atomic_write): a process killed at any moment leaves either the old file or the
new one, never half of one. Weights with a NaN or inf are never written and never loaded. Building a model from
a file is reg.loading's job; finding a file on the Hub is reg.hub's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import socket
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch

from reg.utils import UserError, atomic_json_dump, atomic_torch_save, atomic_write, clean_stale_tmp, safe_globals

PIN = ".keep"  # {step:07d}.keep (a user's) or {step:07d}.keep-OWNER (pin_checkpoint): never pruned
PRUNING = ".pruning"  # {step:07d}.pruning: an empty mark while that checkpoint's files are deleted
CHECKPOINT_FILE = re.compile(r"(?:ema_)?(\d{7})\.(?:pt|safetensors)")  # the files of one training checkpoint

# ----------------------------------------------------------------------------- safe loading

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, incomplete or with non-finite weights."""


class NonFiniteCheckpointError(CheckpointError, UserError):
    """Weights with NaN/inf: never written, never loaded or resumed from (no silent fallback past one either).
    A UserError too: the message names the file and the tensors, and the entry points print it as one line."""


def non_finite(name: str, sd: dict[str, torch.Tensor]) -> str | None:
    """None when every floating tensor of `sd` is finite, else a message naming the first bad keys."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        return None
    return f"the {name} weights are not finite ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})"


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True; argparse.Namespace (in official files) is the one allowed class."""
    try:
        with safe_globals([argparse.Namespace]):  # utils' shim: torch 2.4 has no scoped form
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        # torch's message ends with advice to drop weights_only; a checkpoint must never need that
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain data, "
                              f"which are not loaded: {first}") from e
    except Exception as e:  # truncated zip, bad magic, disk errors
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a torch file): "
                              f"{type(e).__name__}: {e}") from e


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the wrappers' prefixes: DDP's 'module.' and torch.compile's '_orig_mod.'."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def export_safetensors(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write the shareable weights (.safetensors) and the model config (.json beside it)."""
    from safetensors.torch import save_file
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "config": json.dumps(config, allow_nan=False)}))
    atomic_json_dump(config, path.with_suffix(".json"))


# ----------------------------------------------------------------------------- training checkpoint folders

class CheckpointDir:
    """OUTPUT/EXP/checkpoints, the one place that knows how train.py lays it out:

        {step:07d}.pt                 model, ema, steps, config, args: the original's path and keys (its eval.sh
                                      samples from it); written last, so its presence marks a complete checkpoint;
                                      kept at every --checkpointing-steps
        {step:07d}.opt.pt             the optimizer state; only the newest --keep-last are kept
        ema_{step:07d}.safetensors    the EMA weights to share and sample from (+ .json, the model config)
        {step:07d}.keep[-OWNER]       a pin: that checkpoint is never pruned (a user's, or generate.py's / sweep.py's
                                      while their results are unfinished: pin_checkpoint)
        {step:07d}.pruning            marks a checkpoint being pruned (prune_weights), until its files are gone
        abandoned-<time>/             checkpoints after a step the run was resumed from (never deleted)

    Checkpoints written by the original code hold the optimizer state inside {step:07d}.pt; they resume too.
    """

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] = print):
        self.path, self.log = Path(path), log

    def pt(self, step: int) -> Path:
        return self.path / f"{step:07d}.pt"

    def opt_path(self, step: int) -> Path:
        return self.path / f"{step:07d}.opt.pt"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        if not self.path.is_dir():
            return []
        return sorted(int(f.name[:7]) for f in self.path.glob("[0-9]" * 7 + ".pt"))

    def clean_stale(self) -> list[Path]:
        """Remove the temporary files of writes that a killed run left half done, and settle its half-done prunings."""
        self.finish_pruning()
        return clean_stale_tmp(self.path)

    def save(self, step: int, *, model: dict, ema: dict, opt: dict, config: dict, args: dict) -> None:
        """Write one checkpoint (main process only). Non-finite weights are never written."""
        for name, sd in (("model", model), ("ema", ema)):
            if problem := non_finite(name, sd):
                raise NonFiniteCheckpointError(f"refusing to save checkpoint {self.pt(step)}: {problem}")
        atomic_torch_save({"opt": opt, "steps": int(step)}, self.opt_path(step))
        export_safetensors(self.path / f"ema_{step:07d}.safetensors", ema, config)
        atomic_torch_save({"model": model, "ema": ema, "steps": int(step), "config": config, "args": args},
                          self.pt(step))  # last: marks the checkpoint complete

    def prune_optimizer_states(self, keep_last: int) -> list[Path]:
        """Delete the optimizer states of all but the newest `keep_last` checkpoints. Model and EMA weights
        are never deleted, and the newest checkpoint is never touched."""
        steps = self.steps()
        keep = set(steps[-max(keep_last, 1):])
        removed = [self.opt_path(s) for s in steps if s not in keep and self.opt_path(s).is_file()]
        for f in removed:
            f.unlink()
        return removed

    # -- the retention policy of model checkpoints (train.py --keep-weights-every / --keep-weights-last)

    def pins(self, step: int) -> list[Path]:
        return sorted(self.path.glob(f"{step:07d}{PIN}*"))

    def pin_path(self, step: int, owner: str | os.PathLike) -> Path:
        """The pin of checkpoint `step` held for the results folder `owner` (the same name on every rerun)."""
        digest = hashlib.sha1(os.path.abspath(owner).encode()).hexdigest()[:12]
        return self.path / f"{step:07d}{PIN}-{digest}"

    def pruning_path(self, step: int) -> Path:
        return self.path / f"{step:07d}{PRUNING}"

    def prune_weights(self, every: int, last: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete every file of the checkpoints that the policy does not keep; returns their steps. Kept: steps
        that are multiples of `every`, the newest `last` (at least 1: the newest, which a resume starts from),
        the steps in `protect`, and pinned ones (`{step}.keep*`). Safe under a kill at any moment (see _prune)."""
        self.finish_pruning()
        steps = self.steps()
        keep = {s for s in steps if s % every == 0} | set(steps[-max(last, 1):]) | set(protect)
        return [s for s in steps if s not in keep and self._prune(s)]

    def _prune(self, step: int) -> bool:
        """Mark the checkpoint (an empty {step}.pruning; pin_checkpoint waits while it exists), check the pins
        again (a pin taken meanwhile cancels), then delete its .pt first (from then on it is incomplete: never
        resumed, never pinned), the other files, and the mark last. A kill leaves the mark: finish_pruning."""
        if self.pins(step):
            return False
        self.pruning_path(step).touch()
        if self.pins(step):  # a reader pinned it between the two checks
            self.pruning_path(step).unlink()
            return False
        self._delete(step)
        return True

    def _delete(self, step: int) -> None:
        ema = self.path / f"ema_{step:07d}.safetensors"
        for f in (self.pt(step), self.opt_path(step), ema, ema.with_suffix(".json"), self.pruning_path(step)):
            f.unlink(missing_ok=True)

    def finish_pruning(self) -> list[int]:
        """Prunings a killed run left half done: cancelled when pinned since and nothing is deleted yet (its .pt,
        deleted first, is there), else finished. Returns their steps."""
        steps = sorted(int(f.name[:7]) for f in self.path.glob("[0-9]" * 7 + PRUNING)) if self.path.is_dir() else []
        for step in steps:
            if self.pins(step) and self.pt(step).is_file():
                self.pruning_path(step).unlink()
            else:
                self._delete(step)
        return steps

    def set_aside_after(self, step: int) -> Path | None:
        """Move every checkpoint file of a step after `step` into abandoned-<time>/ (a run resumed from an
        earlier step starts a new lineage; the old one must neither be resumed nor pruned into it)."""
        later = [f for f in self.path.glob("*") if f.is_file() and (m := re.search(r"(\d{7})", f.name))
                 and int(m.group(1)) > step]
        if not later:
            return None
        dest = self.aside_folder()
        for f in later:
            os.replace(f, dest / f.name)
        return dest

    def aside_folder(self) -> Path:
        """A new, empty abandoned-<time>/ (a suffix keeps two set-asides of one second apart)."""
        stem = self.path / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1000):
            dest = stem.with_name(stem.name + (f"-{n}" if n else ""))
            try:
                dest.mkdir(parents=True)
                return dest
            except FileExistsError:
                continue
        raise FileExistsError(f"{stem}: too many set-aside folders of this second")

    def load(self, step: int) -> dict:
        """Read checkpoint `step` for resuming: model, ema, opt, steps, and `official` (made by the original
        code). Raises when it is unreadable, has no optimizer state, or holds non-finite weights."""
        ckpt = torch_load(self.pt(step))
        if not isinstance(ckpt, dict) or not {"model", "ema", "steps"} <= set(ckpt):
            raise CheckpointError(f"{self.pt(step)} is not a training checkpoint (needs model, ema and steps)")
        ckpt["official"] = not isinstance(ckpt.get("config"), dict)
        if "opt" not in ckpt:
            if not self.opt_path(step).is_file():
                raise CheckpointError(
                    f"the optimizer state of step {step} ({self.opt_path(step).name}) was pruned (--keep-last); "
                    f"resume from a step that has one, or start a new run with --init-from {self.pt(step)}")
            ckpt["opt"] = torch_load(self.opt_path(step))["opt"]
        for name in ("model", "ema"):
            if problem := non_finite(name, ckpt[name]):
                raise NonFiniteCheckpointError(f"refusing to resume from {self.pt(step)}: {problem}; "
                                               "pick an earlier one with --resume-step")
        return ckpt

    def load_for_resume(self, resume_step: int = 0) -> dict | None:
        """--resume-step N loads exactly N; 0 loads the newest complete checkpoint, falling back to the next
        older one (with a warning naming both) when a file is truncated or unreadable. None: start afresh."""
        available = self.steps()
        if resume_step:
            if resume_step not in available:
                raise FileNotFoundError(f"--resume-step {resume_step}: {self.pt(resume_step)} does not exist "
                                        f"(have {available or 'none'})")
            return self.load(resume_step)
        failed: list[str] = []
        for step in reversed(available):
            try:
                ckpt = self.load(step)
            except NonFiniteCheckpointError:
                raise
            except CheckpointError as e:
                failed.append(f"{self.pt(step)} ({e})")
                self.log(f"WARNING: cannot resume from {self.pt(step)}: {e}")
                continue
            if failed:
                self.log(f"WARNING: resuming from the newest intact checkpoint {self.pt(step)} instead of "
                         f"{self.pt(available[-1])}")
            return ckpt
        if failed:
            raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(failed))
        return None


# ----------------------------------------------------------------------------- pins: readers of a training folder

def training_checkpoint(spec: str) -> tuple[CheckpointDir, int] | None:
    """(its folder, its step) when `spec` names a checkpoint file of a train.py run folder (…/checkpoints/
    {step:07d}.pt or ema_{step:07d}.safetensors), else None (Hub folders, hf:, other files)."""
    match = CHECKPOINT_FILE.fullmatch(os.path.basename(spec))
    path = Path(os.path.abspath(os.path.expanduser(spec)))
    if match is None or spec.startswith("hf:") or path.parent.name != "checkpoints":
        return None
    return CheckpointDir(path.parent), int(match.group(1))


def pin_checkpoint(spec: str, owner: str | os.PathLike, *, by: str, wait_s: float = 30.0) -> Path | None:
    """Keep the checkpoint `spec` from its training run's pruning (--keep-weights-every) until
    unpin_checkpoint(spec, owner): generate.py and sweep.py pin what they sample from, for their results folder
    `owner`, until their results are complete (a preempted, requeued job finds it again). Returns the pin, or None
    when `spec` is no checkpoint of a training folder, or one that no pruning will touch (it has no .pt).
    Raises CheckpointError when the checkpoint is being, or was, pruned. A folder we may not write is warned about."""
    found = training_checkpoint(spec)
    if found is None:
        return None
    ckpts, step = found
    if not ckpts.pt(step).is_file() and not ckpts.pruning_path(step).exists():
        if os.path.exists(os.path.expanduser(spec)):
            return None  # e.g. only the safetensors were kept: prune_weights only removes checkpoints with a .pt
        raise CheckpointError(f"checkpoint {spec} was deleted after it was loaded (pruned by its training run?)")
    pin = ckpts.pin_path(step, owner)
    try:
        atomic_json_dump({"by": by, "for": os.path.abspath(owner), "host": socket.gethostname(), "pid": os.getpid(),
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}, pin)
    except OSError as e:
        warnings.warn(f"cannot pin {spec} ({e}): if its training run prunes checkpoints (--keep-weights-every), a "
                      f"rerun of this command may not find it")
        return None
    deadline = time.monotonic() + wait_s
    while ckpts.pruning_path(step).exists():  # a pruning that began before the pin: cancelled by it, or completed
        if time.monotonic() > deadline:
            pin.unlink(missing_ok=True)
            raise CheckpointError(f"checkpoint {spec} is being pruned by its training run (--keep-weights-every), "
                                  f"or a pruning of it was interrupted; sample from a checkpoint it keeps "
                                  f"(docs/training.md#disk)")
        time.sleep(0.05)
    if not ckpts.pt(step).is_file():
        pin.unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint {spec} was pruned by its training run (--keep-weights-every); sample from "
                              f"a checkpoint it keeps, or pin one first (docs/training.md#disk)")
    return pin


def unpin_checkpoint(spec: str, owner: str | os.PathLike) -> None:
    """Release the pin of pin_checkpoint(spec, owner), if any (its results are complete)."""
    if (found := training_checkpoint(spec)) is not None:
        found[0].pin_path(found[1], owner).unlink(missing_ok=True)
