"""metrics.jsonl: the one writer and the one reader of a training run's machine-readable log.

One JSON object per line, each with an integer "step": training lines (loss terms, lr, throughput) every
--log-every steps, evaluation lines (fid, ...) at --eval-every. Lines are strict JSON: a non-finite value
(a NaN loss, an inf FID) is written as null, since `NaN` is not JSON and breaks every other reader.

A process killed mid-append (or a full disk) leaves a torn last line. `read_metrics` skips it and says
so; `trim_torn_tail` (train.py, before a resumed run appends) cuts it off the file. A line that does
not parse anywhere else is an error naming the file and line: something other than a kill wrote it.

Imports only the standard library and utils: train.py, evaluations/plot_losses.py, evaluations/compare.py and the
benchmarks all read through here, and the last three start without torch.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from reg.utils import UserError, atomic_write_bytes, nan_to_null

METRICS_FILE = "metrics.jsonl"


def dumps_record(record: dict) -> str:
    """One metrics line (without the newline): strict JSON, non-finite numbers as null."""
    return json.dumps(nan_to_null(record), allow_nan=False)


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one line. One write() call of the whole line: a kill leaves at most this line torn."""
    with open(path, "a") as f:
        f.write(dumps_record(record) + "\n")


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace the file atomically with these records (a resume drops the lines after its step)."""
    atomic_write_bytes(path, "".join(dumps_record(r) + "\n" for r in records).encode())


def _parse(path: str, lines: list[str]) -> tuple[list[dict], str | None]:
    """(records, note about a torn last line or None). Raises UserError for a bad line elsewhere."""
    records, note = [], None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if i == last:
                note = f"{path}:{i + 1}: skipped an unfinished last line (torn by a kill mid-write): {line[:60]!r}"
                continue
            raise UserError(f"{path}:{i + 1}: not a metrics record ({e}); only the last line may be torn "
                            f"by a kill, so something else wrote this file") from e
        records.append(record)
    return records, note


def read_metrics(path: str | os.PathLike, *, warn: Callable[[str], None] | None = None,
                 missing_ok: bool = True) -> list[dict]:
    """Every record of a metrics.jsonl, in file order (a resumed run rewrites its later lines, so file
    order is step order per lineage). A torn last line is skipped, reported through `warn`.
    A missing file gives [] (or FileNotFoundError naming it when missing_ok is False)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"metrics file {path} does not exist (train.py writes it every --log-every steps)")
    with open(path, encoding="utf-8", errors="replace") as f:
        records, note = _parse(path, f.read().split("\n"))
    if note and warn is not None:
        warn(note)
    return records


def trim_torn_tail(path: str | os.PathLike) -> str | None:
    """Cut a torn last line off the file (before appending to it again); returns a warning, or None
    when the file is intact. A bad line elsewhere raises UserError naming file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    records, note = _parse(path, text.split("\n"))
    if note is None and (not data or data.endswith(b"\n")):
        return None
    write_records(path, records)  # also adds the newline a torn-but-parseable last line lacked
    return f"WARNING: {note or f'{path}: the last line had no newline; added'}; the file now ends at its last intact line"


def latest_per_step(records: list[dict], key: Callable[[dict], Any] = lambda r: r["step"]) -> list[dict]:
    """The last record of each key (a resumed run may repeat a step), in key order of the step."""
    by_key = {key(r): r for r in records}
    return sorted(by_key.values(), key=lambda r: r["step"])


def best_fid_step(records: list[dict]) -> int | None:
    """The step of the lowest FID among metrics.jsonl's evaluation records (None: no finite one yet)."""
    scored = [r for r in records if isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"])]
    return int(min(scored, key=lambda r: r["fid"])["step"]) if scored else None
