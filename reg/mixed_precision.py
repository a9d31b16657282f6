"""Which mixed precision train.py runs in, and where that came from: --mixed-precision, `accelerate launch
--mixed_precision`, `accelerate config`, else ours (bf16 on GPU). Reads the environment and files only; does not
import accelerate."""
from __future__ import annotations

import json
import os
from pathlib import Path

from reg.utils import UserError

PRECISIONS = ("no", "fp16", "bf16")


# ----------------------------------------------------------------------------- mixed precision


def accelerate_config_file() -> Path | None:
    """`accelerate config`'s default file (the rule accelerate.commands.config uses), if it exists."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    folder = Path(os.path.expanduser(home)) / "accelerate"
    for name in ("default_config.yaml", "default_config.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_mixed_precision(flag: str | None, *, cuda: bool) -> tuple[str, str]:
    """(precision, where it came from): --mixed-precision, else $ACCELERATE_MIXED_PRECISION (which
    `accelerate launch` always sets: its --mixed_precision, else its config file's value, else "no"),
    else the mixed_precision of `accelerate config`'s default file (plain python / torchrun), else ours:
    bf16 on GPU, no on CPU.

    A launcher's "no" that no config file states is the launcher's own default, not a choice (a bare
    `accelerate launch train.py` sets it): it does not turn our bf16 off; --mixed-precision no does."""
    if flag:
        return flag, "--mixed-precision"
    config_value, config_source = _config_file_precision()
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if env and not (env == "no" and not config_value):
        source = "ACCELERATE_MIXED_PRECISION (accelerate launch)"
        return _checked(env, source), source
    if config_value:
        return _checked(config_value, config_source), config_source
    default = "default (bf16 on GPU, no on CPU)"
    if env:
        default += "; accelerate launch's own default 'no' is not taken as a choice"
    return ("bf16" if cuda else "no"), default


def _config_file_precision() -> tuple[str, str]:
    """The mixed_precision of `accelerate config`'s default file ("" when there is none), and its name."""
    path = accelerate_config_file()
    if path is None:
        return "", ""
    import yaml  # accelerate's own dependency
    text = path.read_text()
    try:
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except Exception as e:
        raise UserError(f"accelerate config file {path} is unreadable: {e}") from e
    if not isinstance(config, (dict, type(None))):  # `accelerate config` writes a mapping of settings
        raise UserError(f"accelerate config file {path} holds a {type(config).__name__}, not a mapping of settings; "
                        f"rewrite it with `accelerate config`")
    return str((config or {}).get("mixed_precision") or "").lower(), f"accelerate config {path}"


def _checked(value: str, source: str) -> str:
    if value not in PRECISIONS:
        raise UserError(f"mixed precision {value!r} from {source} is not supported here; "
                        f"pass --mixed-precision {'/'.join(PRECISIONS)}")
    return value
