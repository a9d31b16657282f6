"""Which trackers train.py reports to (--report-to, as accelerate names them) and which wandb run it continues
(--wandb-id, WANDB_RUN_ID, the run folder's wandb_run_id.txt), each with the source it came from.

Reads the environment and files only: a tracker's package is only looked for, so a missing one is a clear
error at start-up and --help stays fast.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

from reg.utils import UserError, atomic_write

# accelerate's LoggerType values (accelerate 1.15; tests/test_compat.py checks the installed accelerate),
# each with the module it needs and the pip package that provides it. "all" takes every installed one.
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("torch.utils.tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "aim": (("aim",), "aim"),
    "trackio": (("trackio",), "trackio"),
    "swanlab": (("swanlab",), "swanlab"),
}
REPORT_TO_CHOICES = ("all", *TRACKERS, "none")


def _installed(modules: tuple[str, ...]) -> bool:
    for m in modules:
        try:
            if importlib.util.find_spec(m) is not None:
                if m == "torch.utils.tensorboard":  # the module ships with torch; it needs the tensorboard package
                    return importlib.util.find_spec("tensorboard") is not None
                return True
        except (ImportError, ValueError):  # a parent package missing
            continue
    return False


def parse_report_to(value: str) -> list[str]:
    """--report-to: one of REPORT_TO_CHOICES or a comma-separated list of trackers. Returns the list
    ([] for none). Every named tracker must be installed; 'all' takes the installed ones."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown or not names:
        raise UserError(f"--report-to {value!r}: unknown tracker {', '.join(unknown) or '(empty)'}; "
                        f"choose from {', '.join(REPORT_TO_CHOICES)} (or a comma-separated list)")
    if "none" in names or "all" in names:
        if len(names) > 1:
            raise UserError(f"--report-to {value!r}: 'none' and 'all' stand alone")
        return [] if names == ["none"] else [n for n, (mods, _) in TRACKERS.items() if _installed(mods)]
    for n in names:
        mods, pip_name = TRACKERS[n]
        if not _installed(mods):
            raise UserError(f"--report-to {n} needs the {pip_name} package (pip install {pip_name}); "
                            f"or use --report-to tensorboard / none")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- wandb

WANDB_RESERVED = ":;,#?/'\\"  # wandb refuses the first seven in a run id; a backslash is a path separator too
WANDB_RESUME_MODES = ("allow", "must", "never", "auto")


def check_wandb_id(run_id: str, source: str) -> str:
    """A wandb run id as wandb accepts it (no reserved character, no whitespace), checked before it is kept in
    the run folder: a bad one would be kept and fail every rerun. `source` names where it came from."""
    if not run_id or any(c in WANDB_RESERVED or c.isspace() or not c.isprintable() for c in run_id):
        raise UserError(f"{source} {run_id!r} is not a wandb run id: it must be non-empty, without whitespace and "
                        f"without any of {WANDB_RESERVED}")
    return run_id


def check_wandb_env(flag_id: str | None) -> None:
    """--wandb-id, $WANDB_RUN_ID and $WANDB_RESUME, checked before the run starts."""
    if flag_id is not None:
        check_wandb_id(flag_id, "--wandb-id")
    if env_id := os.environ.get("WANDB_RUN_ID", "").strip():
        check_wandb_id(env_id, "environment variable WANDB_RUN_ID")
    resume = os.environ.get("WANDB_RESUME", "").strip()
    if resume and resume not in WANDB_RESUME_MODES:
        raise UserError(f"environment variable WANDB_RESUME={resume!r} must be one of {', '.join(WANDB_RESUME_MODES)}")


def wandb_run(run_dir: Path, flag_id: str | None, *, write: bool) -> tuple[str, str, str]:
    """(run id, resume mode, where the id came from) for wandb.init.

    The id: --wandb-id, else $WANDB_RUN_ID, else the run folder's wandb_run_id.txt, else a new one. It is
    kept in wandb_run_id.txt (by the main process: `write`), so re-running the command without the flag
    continues the same wandb run. The resume mode is $WANDB_RESUME, else "allow" (continue the run if it
    exists: one of ours, or the authors' run whose id is passed)."""
    id_file = run_dir / "wandb_run_id.txt"
    kept = id_file.read_text().strip() if id_file.is_file() else ""
    if kept:
        check_wandb_id(kept, str(id_file))
    check_wandb_env(flag_id)
    env_id = os.environ.get("WANDB_RUN_ID", "").strip()
    if flag_id:
        run_id, source = flag_id, "--wandb-id"
    elif env_id:
        run_id, source = env_id, "WANDB_RUN_ID"
    elif kept:
        run_id, source = kept, str(id_file)
    else:
        run_id, source = secrets.token_hex(4), "new"
    if write and run_id != kept:
        atomic_write(id_file, lambda tmp: Path(tmp).write_text(run_id + "\n"))
    return run_id, os.environ.get("WANDB_RESUME", "").strip() or "allow", source
