"""Small helpers every stage shares: atomic file writes, the fp32 matmul precision switch and the
--help format of every command-line tool.

Ground floor: imports nothing from this repository, so the evaluator, the preprocessing tools,
the checkpoint code and the entry points can all use it. torch is imported inside the functions that
need it: the torch-free tools (synthetic data, the run comparison) then start in a fraction of a second
instead of the seconds torch takes to import.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

# ----------------------------------------------------------------------------- user errors


class UserError(ValueError):
    """A mistake the user must fix: a bad flag value, a missing or unusable file or folder, a folder held
    by another run. The message names the flag or the path. The command-line entry points print it as
    one line and exit non-zero; bugs raise anything else and keep their traceback."""


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`.

    The temporary file sits in the destination folder (same file system, so os.replace is atomic on
    POSIX) and is named `.NAME.*.tmp`, the pattern `clean_stale_tmp` removes. A process killed at
    any moment leaves either the old file or the new one, never half of one. New files get the
    usual permissions (0666 & ~umask), not mkstemp's 0600.
    """
    path = Path(path)
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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, fsync=fsync)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json_dump(obj: Any, path: str | os.PathLike, *, sort_keys: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
    atomic_write(path, write)


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


# ----------------------------------------------------------------------------- command lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help (a None default whose help
    already says what None means, "(None: ...)", is not repeated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and "None" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
