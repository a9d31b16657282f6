"""What a results folder was made from: a checkpoint's identity, and the guard that refuses to add to a
folder with other settings (generate.py's sample folders, sweep.py's output), so one npz or table never
mixes results of two checkpoints or two settings."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from reg.hub import HUB_WEIGHTS, resolve_checkpoint
from reg.utils import UserError


def checkpoint_identity(spec: str) -> dict:
    """What tells two checkpoint files apart cheaply: resolved path, size, mtime and the sha256 of
    the first MiB. generate.py stores it so a resumed run cannot mix images of two checkpoints."""
    path = resolve_checkpoint(spec).resolve()
    if path.is_dir():  # a Hub folder: its weights
        path = path / HUB_WEIGHTS
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_first_mib": head}


def check_same_settings(record: Path, settings: dict, keys: Sequence[str], *, holds_results: bool,
                        hint: str) -> None:
    """The run-identity guard of generate.py and sweep.py: results in a folder may only be added to with
    the same settings. `record` is the folder's JSON of the settings its results were made with; every
    key of `keys` must be equal (compared as JSON), else the error lists each as old -> new. Results
    without a record (`holds_results`) are of unknown settings and refused too. `hint`: what to do instead."""
    if not record.exists():
        if holds_results:
            raise UserError(f"{record.parent} holds results but no {record.name} (made by another program or an "
                            f"older version?): their settings are unknown, so they cannot be added to; {hint}")
        return
    try:
        old = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {record} ({e}); {hint}") from e
    differ = [k for k in keys if json.dumps(old.get(k), sort_keys=True) != json.dumps(settings[k], sort_keys=True)]
    if differ:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in differ)
        raise UserError(f"{record.parent} holds results made with other settings ({detail}); {hint}")
