"""Resuming with a changed command line: what happens to each train.py flag.

Every flag of train.py (its argparse dest) is in exactly one class, in FLAG_CLASSES below, the single
source of truth (docs/resuming.md shows the same table; tests/test_resume_flags.py checks both ways):

- "run": defines the run (model, data, objective, seed). Changing one on resume would train a different
  model from the middle of this one, so it is refused, naming each flag old -> new, unless
  --allow-run-change names it (then it is applied and recorded, as a hyperparameter).
- "hyper": a hyperparameter a researcher may change on resume (lr, Adam settings, clipping, EMA decay,
  batch, precision). The new value is applied, logged once, and recorded in the history.
- "operational": how the run is executed and watched (steps, intervals, workers, logging, evaluation,
  kernels, paths). Accepted silently.

The history, a list of {"step", "flag", "old", "new"}, is carried from checkpoint to checkpoint inside
their `args` and written to args.json beside the values in effect.

Kept out of train.py so that it stays a table plus two small functions, readable without the training
code, and importable by the docs test without torch.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reg.utils import UserError

RUN, HYPER, OPERATIONAL = "run", "hyper", "operational"

# dest -> (class, why). Add every new train.py flag here, and its row to docs/resuming.md
# (`python reg/resume_flags.py` prints the table).
FLAG_CLASSES: dict[str, tuple[str, str]] = {
    # model and objective: the weights' meaning
    "model": (RUN, "architecture; the checkpoint's tensors fix it"),
    "method": (RUN, "which losses are trained (reg / repa / sit)"),
    "encoder_depth": (RUN, "block whose output is aligned"),
    "projector_dim": (RUN, "projector width; the checkpoint's tensors fix it"),
    "qk_norm": (RUN, "architecture"),
    "num_classes": (RUN, "label table size; the checkpoint's tensors fix it"),
    "resolution": (RUN, "latent size; the checkpoint's tensors fix it"),
    "enc_type": (RUN, "the alignment and class-token targets"),
    "path_type": (RUN, "the interpolant: linear and cosine train different velocity fields"),
    "prediction": (RUN, "what the network predicts"),
    "weighting": (RUN, "time sampling: part of the objective"),
    "proj_coeff": (RUN, "alignment loss weight: part of the objective"),
    "cls": (RUN, "class-token loss weight: part of the objective"),
    "cfg_prob": (RUN, "--legacy's extra label drop: part of the objective"),
    "legacy": (RUN, "REPA's double label dropout: part of the objective"),
    "seed": (RUN, "data order and per-step noise: exact resume relies on it"),
    "data_dir": (RUN, "the data trained on (its path; the content is checked by the dataset)"),
    # hyperparameters one may change on resume
    "learning_rate": (HYPER, "set in the optimizer's param groups after its state is loaded"),
    "adam_beta1": (HYPER, "set in the param groups after the state is loaded"),
    "adam_beta2": (HYPER, "set in the param groups after the state is loaded"),
    "adam_weight_decay": (HYPER, "set in the param groups after the state is loaded"),
    "adam_epsilon": (HYPER, "set in the param groups after the state is loaded"),
    "max_grad_norm": (HYPER, "used by every later step"),
    "ema_decay": (HYPER, "used by every later EMA update"),
    "batch_size": (HYPER, "global batch; the data position is recomputed from the step (docs/resuming.md)"),
    "gradient_accumulation_steps": (HYPER, "as --batch-size"),
    "mixed_precision": (HYPER, "numerics of later steps (e.g. fp16 -> bf16 after overflows)"),
    "allow_tf32": (HYPER, "numerics of later matmuls"),
    "ema_lerp": (HYPER, "numerics of later EMA updates (rounding only)"),
    "ddp_bf16_allreduce": (HYPER, "numerics of later gradients (all-reduced in bf16)"),
    # operational
    "fused_attn": (OPERATIONAL, "attention kernel; same function"),
    "ops_head": (OPERATIONAL, "unused (accepted for the original's command lines)"),
    "num_workers": (OPERATIONAL, "data loading processes"),
    "skip_bad_samples": (OPERATIONAL, "what to do with an unreadable file"),
    "data_check": (OPERATIONAL, "how much of the data is compared with its encode record at start"),
    "enc_weights": (OPERATIONAL, "where the encoder weights are found (--enc-type says which encoder)"),
    "epochs": (OPERATIONAL, "when to stop"),
    "max_train_steps": (OPERATIONAL, "when to stop"),
    "adamw": (OPERATIONAL, "AdamW kernel; same update, same state"),
    "max_bad_steps": (OPERATIONAL, "when to give up on non-finite steps"),
    "compile": (OPERATIONAL, "torch.compile"),
    "compile_mode": (OPERATIONAL, "torch.compile mode"),
    "attn_split": (OPERATIONAL, "attention kernel split; same function"),
    "device_skip": (OPERATIONAL, "where the finite check runs; same updates"),
    "ddp_bucket_mb": (OPERATIONAL, "DDP bucket size; same gradients"),
    "ddp_bucket_view": (OPERATIONAL, "DDP memory layout; same gradients"),
    "ddp_static_graph": (OPERATIONAL, "DDP graph caching; same gradients"),
    "peak_tflops": (OPERATIONAL, "for the logged MFU"),
    "output_dir": (OPERATIONAL, "where the run folder is (moving it is fine)"),
    "exp_name": (OPERATIONAL, "the run folder's name"),
    "logging_dir": (OPERATIONAL, "tracker folder"),
    "report_to": (OPERATIONAL, "tracker"),
    "wandb_id": (OPERATIONAL, "which wandb run the curves go to"),
    "log_every": (OPERATIONAL, "log interval"),
    "checkpointing_steps": (OPERATIONAL, "checkpoint interval"),
    "keep_last": (OPERATIONAL, "optimizer states kept"),
    "keep_weights_every": (OPERATIONAL, "model checkpoints kept (the retention policy)"),
    "keep_weights_last": (OPERATIONAL, "model checkpoints kept (the retention policy)"),
    "resume_step": (OPERATIONAL, "which checkpoint to resume from"),
    "init_from": (OPERATIONAL, "ignored when resuming"),
    "sample_every": (OPERATIONAL, "sample grid interval"),
    "vae": (OPERATIONAL, "decoder for sample grids and evaluations"),
    "eval_every": (OPERATIONAL, "evaluation interval"),
    "eval_samples": (OPERATIONAL, "evaluation setting (recorded in every FID line)"),
    "eval_ref": (OPERATIONAL, "evaluation setting"),
    "eval_mode": (OPERATIONAL, "evaluation setting (recorded in every FID line)"),
    "eval_steps": (OPERATIONAL, "evaluation setting (recorded in every FID line)"),
    "eval_cfg": (OPERATIONAL, "evaluation setting (recorded in every FID line)"),
    "eval_cls_cfg": (OPERATIONAL, "evaluation setting (recorded in every FID line)"),
    "eval_guidance_high": (OPERATIONAL, "evaluation setting"),
    "eval_batch_size": (OPERATIONAL, "evaluation batch"),
    "inception_weights": (OPERATIONAL, "where the Inception weights are found"),
    "allow_run_change": (OPERATIONAL, "this override itself"),
    "resume": (OPERATIONAL, "the run folder whose args.json gives the other flags (not carried to the next --resume)"),
}

HISTORY_KEY = "history"  # in args.json and in the checkpoints' args: not a flag
# Choices of one launch, not of the run: `train.py --resume RUN` never takes them from args.json (a recorded
# --resume-step would set aside every checkpoint written since).
LAUNCH_ONLY = ("resume", "resume_step")
# The authors' train.py calls a few flags otherwise (their args Namespace is stored in their checkpoints).
OFFICIAL_NAMES = {"sampling_steps": "sample_every"}


@dataclass(frozen=True)
class Change:
    dest: str
    kind: str
    old: Any
    new: Any

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def __str__(self) -> str:
        return f"{self.flag} {self.old!r} -> {self.new!r}"


def parse_allow_run_change(text: str | None) -> set[str]:
    """--allow-run-change path-type,cls (with or without --, dashes or underscores) -> {'path_type', 'cls'}.
    Only run-defining flags may be named."""
    if not text:
        return set()
    dests = {t.strip().lstrip("-").replace("-", "_") for t in text.split(",") if t.strip()}
    bad = sorted(d for d in dests if FLAG_CLASSES.get(d, (None,))[0] != RUN)
    if bad:
        run_flags = ", ".join("--" + d.replace("_", "-") for d, (k, _) in FLAG_CLASSES.items() if k == RUN)
        named = ", ".join("--" + d.replace("_", "-") for d in bad)
        raise UserError(f"--allow-run-change {text}: {named} is not a run-defining flag; "
                        f"those are {run_flags} (hyperparameters and operational flags may change freely)")
    return dests


def saved_args(saved: Any) -> dict | None:
    """A checkpoint's `args` as a dict of our dests: ours (a dict), the authors' (an argparse.Namespace
    under their names), or None (none recorded)."""
    if saved is None:
        return None
    d = dict(vars(saved)) if isinstance(saved, argparse.Namespace) else dict(saved) if isinstance(saved, dict) else None
    if d is None:
        return None
    for theirs, ours in OFFICIAL_NAMES.items():
        if theirs in d and ours not in d:
            d[ours] = d.pop(theirs)
    return d


def _same(dest: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if dest == "data_dir" and isinstance(old, str) and isinstance(new, str):
        return os.path.normpath(old) == os.path.normpath(new) or os.path.realpath(old) == os.path.realpath(new)
    return False


def changes(saved: dict, now: dict) -> list[Change]:
    """The flags whose value differs, in FLAG_CLASSES order. A flag the checkpoint does not record (an
    older version of ours, the authors' code) is not compared. Keys outside the table are not flags (values
    code put on args); tests/test_resume_flags.py makes sure every flag is in the table."""
    return [Change(dest, kind, saved[dest], now[dest]) for dest, (kind, _) in FLAG_CLASSES.items()
            if dest in saved and dest in now and not _same(dest, saved[dest], now[dest])]


def check_resume(saved: Any, args: argparse.Namespace, *, step: int, where: str) -> list[Change]:
    """Compare the checkpoint's args with the command line (a resume from `where` at `step`).

    Raises UserError naming every run-defining change not allowed by --allow-run-change. Otherwise sets
    args.history (the checkpoint's, plus one entry per applied run or hyper change) and returns the
    changes to apply and log (operational ones are left out)."""
    old = saved_args(saved) or {}
    now = {k: v for k, v in vars(args).items() if k != HISTORY_KEY}
    found = changes(old, now)
    allowed = parse_allow_run_change(getattr(args, "allow_run_change", None))
    refused = [c for c in found if c.kind == RUN and c.dest not in allowed]
    if refused:
        raise UserError(
            f"resuming {where} with changed run-defining flags: {', '.join(map(str, refused))}. Restore them, "
            f"start a new run (another --exp-name, or --init-from), or, on purpose, pass --allow-run-change "
            f"{','.join(c.flag[2:] for c in refused)} (docs/resuming.md)")
    applied = [c for c in found if c.kind in (RUN, HYPER)]
    history = list(old.get(HISTORY_KEY) or [])
    history += [{"step": int(step), "flag": c.flag, "old": c.old, "new": c.new} for c in applied]
    args.history = history
    return applied


def run_folder_argv(run_dir: str | os.PathLike, parser: argparse.ArgumentParser) -> list[str]:
    """`train.py --resume RUN_DIR`: the flags recorded in RUN_DIR/args.json (ours, or the authors' names) as a
    command line of `parser`, to be followed by the command line's own flags, which win. The run folder is
    RUN_DIR as it is now (--output-dir and --exp-name from its path: it may have moved); LAUNCH_ONLY flags and
    flags args.json does not record keep their defaults."""
    run_dir = Path(os.path.abspath(run_dir))
    path = run_dir / "args.json"
    try:
        saved = saved_args(json.loads(path.read_text()))
    except FileNotFoundError as e:
        hint = f"; to resume from step {run_dir.name}, use --resume-step" if run_dir.name.isdigit() else ""
        raise UserError(f"--resume {run_dir}: no args.json there, so it is no run folder of train.py{hint}") from e
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {run_dir}: cannot read {path} ({e})") from e
    if saved is None:
        raise UserError(f"--resume {run_dir}: {path} does not hold the flags of a run (a JSON object)")
    saved.update(output_dir=str(run_dir.parent), exp_name=run_dir.name)
    argv = []
    for action in parser._actions:
        value = saved.get(action.dest)
        if not action.option_strings or value is None or action.dest in LAUNCH_ONLY:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f"{flag}={value}")  # one token: a value starting with '-' is not read as a flag
        else:
            raise UserError(f"--resume {run_dir}: {path} holds {action.dest} = {value!r}, not a value of {flag}")
    return argv


def markdown_table() -> str:
    """The table of docs/resuming.md, from FLAG_CLASSES."""
    rows = ["| flag | class | why |", "|---|---|---|"]
    for kind in (RUN, HYPER, OPERATIONAL):
        rows += [f"| `--{d.replace('_', '-')}` | {k} | {why} |" for d, (k, why) in FLAG_CLASSES.items() if k == kind]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
