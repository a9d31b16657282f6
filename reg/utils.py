"""Small helpers every stage shares: atomic file writes, strict JSON, the fp32 matmul precision switch,
and what every command-line tool shares (--help format, checked float flags, one-line user errors).

Ground floor: imports nothing from this repository, so the evaluator, the preprocessing tools,
the checkpoint code and the entry points can all use it. torch is imported inside the functions that
need it: the torch-free tools (synthetic data, the run comparison) then start in a fraction of a second
instead of the seconds torch takes to import.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import hashlib
import json
import math
import re
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

# ----------------------------------------------------------------------------- user errors


class UserError(ValueError):
    """A mistake the user must fix: a bad flag value, a missing or unusable file or folder, a folder held
    by another run. The message names the flag or the path. The command-line entry points print it as
    one line and exit non-zero; bugs raise anything else and keep their traceback."""


# ----------------------------------------------------------------------------- storage errors

# What the storage says when it refuses a write: the machine's state, not a bug. Named with the path.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system"}


class StorageError(UserError):
    """A write the storage refused (full disk, quota, read-only file system). The message names the path;
    `errno` keeps the cause's number."""

    def __init__(self, path: str | os.PathLike, code: int):
        self.path, self.errno = os.fspath(path), code
        super().__init__(f"cannot write {self.path}: {STORAGE_ERRNOS[code]}")


@contextlib.contextmanager
def storage_errors_named(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an OSError of the storage (STORAGE_ERRNOS) becomes a StorageError naming `path`
    (a write() on a full disk reports no file name of its own)."""
    try:
        yield
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise StorageError(path, e.errno) from e
        raise


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage refusal (STORAGE_ERRNOS) behind `exc`, else None: an OSError's own, or the
    `(os error N)` that Rust I/O errors (safetensors) put in their message."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        if e is not None and (m := re.search(r"\(os error (\d+)\)", str(e))) and int(m.group(1)) in STORAGE_ERRNOS:
            return int(m.group(1))
    return None


# ----------------------------------------------------------------------------- checks before a write

# Functions called with the destination before every write of atomic_write and check_write's other callers.
# reg.folder_lock adds one: a run whose folder lock was taken over stops before it writes there again.
_WRITE_CHECKS: list[Callable[[Path], None]] = []


def add_write_check(check: Callable[[Path], None]) -> None:
    if check not in _WRITE_CHECKS:
        _WRITE_CHECKS.append(check)


def check_write(path: str | os.PathLike) -> None:
    """Run the write checks on `path` (they raise to refuse the write). Writers that do not go through
    atomic_write (appends to a log) call it themselves."""
    for check in _WRITE_CHECKS:
        check(Path(path))


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`.

    The temporary file sits in the destination folder (same file system, so os.replace is atomic on
    POSIX) and is named `.NAME.*.tmp`, the pattern `clean_stale_tmp` removes. A process killed at
    any moment leaves either the old file or the new one, never half of one. New files get the
    usual permissions (0666 & ~umask), not mkstemp's 0600. A full disk, an exceeded quota or a read-only
    file system raises StorageError naming `path` (the old file, if any, is left as it was).
    """
    path = Path(path)
    check_write(path)
    with storage_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # after write(): some writers (safetensors) replace the file and would leave mkstemp's 0600
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if (code := storage_errno(e)) is not None:
            raise StorageError(path, code) from e
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a log file in one write() call (a kill leaves at most this text torn), after the write
    checks; a full disk, an exceeded quota or a read-only file system raises StorageError naming `path`."""
    check_write(path)
    with storage_errors_named(path), open(path, "a") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, fsync=fsync)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, not the path: a full disk then raises OSError(ENOSPC)
            torch.save(obj, f)      # (torch's own writer reports it as "unexpected pos")
    atomic_write(path, write)


def atomic_json_dump(obj: Any, path: str | os.PathLike, *, sort_keys: bool = True, nan_as_null: bool = False) -> None:
    """Strict JSON (allow_nan=False): a NaN or inf raises ValueError, before anything is written, instead
    of writing `NaN`, which no JSON parser but Python's reads. Files of measured values that may come out
    non-finite (metrics) pass nan_as_null=True: such a value is written as null."""
    if nan_as_null:
        obj = nan_to_null(obj)
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def nan_to_null(obj: Any) -> Any:
    """A copy of a JSON-able structure with every non-finite float replaced by None (null in JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def clean_stale_tmp(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove `.NAME.*.tmp` files that a killed atomic_write left behind; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for f in folder.glob(f".{name}.*.tmp"):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


# ----------------------------------------------------------------------------- fp32 matmul precision
# torch >= 2.9 has the fp32_precision API (and raises when it is mixed with the legacy allow_tf32 flags);
# older torch (down to 2.4, the oldest we support) only has the allow_tf32 flags. Both are set here and
# only here: docs/compat.md lists this shim.


def _has_fp32_precision_api() -> bool:
    import torch
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def get_fp32_precision() -> tuple[str, str]:
    """(matmul, cuDNN conv) fp32 precision, each "tf32" or "ieee" (torch's "none" reads as "ieee")."""
    import torch
    if _has_fp32_precision_api():
        modes = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
        return tuple("tf32" if m == "tf32" else "ieee" for m in modes)  # type: ignore[return-value]
    return ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
            "tf32" if torch.backends.cudnn.allow_tf32 else "ieee")


def _raw_fp32_precision() -> tuple:
    """The settings exactly as torch holds them (torch >= 2.9: "none" defers to the global setting, and
    cuDNN conv defaults to "tf32"), so that a block restores them unchanged."""
    import torch
    if _has_fp32_precision_api():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_raw_fp32_precision(raw: tuple) -> None:
    import torch
    if _has_fp32_precision_api():
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = raw
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = raw


def _set_fp32_precision(matmul: str, conv: str) -> None:
    import torch
    if _has_fp32_precision_api():
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
        torch.backends.cudnn.allow_tf32 = conv == "tf32"


@contextlib.contextmanager
def fp32_precision(mode: str) -> Iterator[None]:
    """Set matmul and cuDNN conv fp32 precision to "tf32" or "ieee" inside the block, then restore.

    On torch >= 2.9 this uses the fp32_precision API only (mixing it with the legacy `allow_tf32` flags
    raises); on older torch the `allow_tf32` flags, which mean the same.
    """
    if mode not in ("tf32", "ieee"):
        raise ValueError(f"fp32 precision must be 'tf32' or 'ieee', got {mode!r}")
    before = _raw_fp32_precision()
    _set_fp32_precision(mode, mode)
    try:
        yield
    finally:
        _set_raw_fp32_precision(before)


def set_fp32_precision(mode: str) -> None:
    """Process-wide form of `fp32_precision`, for entry points that keep one setting throughout."""
    if mode not in ("tf32", "ieee"):
        raise ValueError(f"fp32 precision must be 'tf32' or 'ieee', got {mode!r}")
    _set_fp32_precision(mode, mode)


# ----------------------------------------------------------------------------- torch version shims


def safe_globals(classes: list) -> contextlib.AbstractContextManager:
    """Allow `classes` in torch.load(weights_only=True) inside the block.

    torch >= 2.5 scopes the allow-list to the block; torch 2.4 only has the process-wide
    `add_safe_globals`, so there the classes stay allowed afterwards (we only ever pass plain data
    classes such as argparse.Namespace)."""
    import torch
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(classes)
    torch.serialization.add_safe_globals(classes)
    return contextlib.nullcontext()


def initialized_dist():
    """torch.distributed when a process group is up, else None (one process, or before set-up)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


# ----------------------------------------------------------------------------- command lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help (a None default whose help
    already says what None means, "(None: ...)" or "(default: ...)", is not repeated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and ("None" in (action.help or "") or "(default: " in (action.help or "")):
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse prints nothing for a flag without help text, not even its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `prog: error: MESSAGE (see prog --help)` and exit status 2,
    instead of the whole usage block (dozens of lines for train.py) above the one line that matters."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> Callable[[str], float]:
    """An argparse `type` for a float flag: a finite number within [lo, hi] (open ends with lo_open /
    hi_open). argparse names the flag in the error: `argument --cfg-scale: must be finite, got 'nan'`.
    Every float flag of every command line uses it (tests/test_flags.py checks that)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r} ({e})") from e
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be in {_interval(lo, hi, lo_open, hi_open)}, got {text}")
        return value
    parse.__name__ = "finite float"  # argparse's fallback message: "invalid finite float value"
    parse.finite_range = (lo, hi)  # type: ignore[attr-defined]  # marks a checked float flag
    return parse


def finite_floats(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                  hi_open: bool = False) -> Callable[[str], list[float]]:
    """finite_float for a comma-separated list (sweep.py's grid axes)."""
    one = finite_float(lo, hi, lo_open=lo_open, hi_open=hi_open)

    def parse(text: str) -> list[float]:
        values = [one(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return values
    parse.__name__ = "list of finite floats"
    parse.finite_range = (lo, hi)  # type: ignore[attr-defined]
    return parse


def _interval(lo, hi, lo_open, hi_open) -> str:
    left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
    right = "inf)" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
    return f"{left}, {right}"


# ----------------------------------------------------------------------------- entry points

DEBUG_ENV = "REG_DEBUG"
# What counts as a user's mistake besides UserError: a path that is missing, of the wrong kind or not
# ours to write. Their messages name the path. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError, FileExistsError)


def _is_user_error(e: BaseException, user_errors: tuple[type[BaseException], ...]) -> bool:
    return isinstance(e, USER_ERRORS + user_errors) or (isinstance(e, OSError) and e.errno in STORAGE_ERRNOS)


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, StorageError) and e.errno in STORAGE_ERRNOS:
        where = e.filename if e.filename is not None else "(the path was not reported)"
        return f"cannot write {where}: {STORAGE_ERRNOS[e.errno]}"
    return " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds


def _prints_errors() -> bool:
    """Rank 0 of a launch prints a user's error (every rank meets the same flags and files); so does a process
    whose RANK / WORLD_SIZE are missing or malformed, since no other rank can be relied on to print it."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return True
    return rank == 0 or not 0 < rank < world


def run_main(main: Callable[..., Any], parse_args: Callable[[list[str]], Any] | None = None, *,
             user_errors: tuple[type[BaseException], ...] = ()) -> Any:
    """The `if __name__ == "__main__":` of every entry point: main(parse_args(argv)), or main() when
    parse_args is None.

    A user's mistake (USER_ERRORS, plus `user_errors`, e.g. reg.checkpoints.CheckpointError, and a write the
    storage refused: STORAGE_ERRNOS) is printed as one line, `prog: error: MESSAGE`, and the process exits
    with status 2, on every rank; only rank 0 prints. REG_DEBUG=1 in the environment shows the traceback
    instead. Any other exception is a bug: its traceback is shown as usual. Returns main's result."""
    prog = os.path.basename(sys.argv[0]) or "python"
    try:
        result = main(parse_args(sys.argv[1:])) if parse_args is not None else main()
    except Exception as e:
        if not _is_user_error(e, tuple(user_errors)) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if _prints_errors():
            print(f"{prog}: error: {_error_line(e)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
    return result


# ----------------------------------------------------------------------------- environment values and files


def env_int(name: str, default: int, *, minimum: int | None = None, env: dict | None = None) -> int:
    """An integer environment variable (`default` when unset or empty); anything else is a UserError naming
    the variable and its value."""
    text = (os.environ if env is None else env).get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError as e:
        raise UserError(f"environment variable {name}={text!r} is not an integer") from e
    if minimum is not None and value < minimum:
        raise UserError(f"environment variable {name}={text!r} must be >= {minimum}")
    return value


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's content, read in chunks (a 10 GB reference batch never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
