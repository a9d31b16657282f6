"""metrics.jsonl: the one writer and the one reader of a training run's machine-readable log.

One JSON object per line, each with an integer "step": training lines (loss terms, lr, throughput) every
--log-every steps, evaluation lines (fid, ... and the settings they were measured with) at
--eval-every. Lines are strict JSON: a non-finite value
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

from reg.utils import UserError, append_text, atomic_write_bytes, nan_to_null

METRICS_FILE = "metrics.jsonl"
# What an evaluation record's FID depends on besides the weights (evaluations/during_training.py writes them
# all): records that differ in any of them are separate series, never one curve. Older records lack some: None.
EVAL_SETTING_KEYS = ("eval_ref_sha256", "eval_mode", "eval_steps", "eval_cfg", "eval_cls_cfg", "eval_guidance_low",
                     "eval_guidance_high", "eval_vae", "eval_samples", "eval_inception", "eval_seed", "eval_dtype")
# the metrics of an evaluation record
EVAL_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def dumps_record(record: dict) -> str:
    """One metrics line (without the newline): strict JSON, non-finite numbers as null."""
    return json.dumps(nan_to_null(record), allow_nan=False)


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one line. One write() call of the whole line: a kill leaves at most this line torn."""
    append_text(path, dumps_record(record) + "\n")


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


def eval_setting(record: dict) -> tuple:
    """The series an evaluation record belongs to: its values of EVAL_SETTING_KEYS."""
    return tuple(record.get(k) for k in EVAL_SETTING_KEYS)


def eval_series(records: list[dict]) -> dict[tuple, list[dict]]:
    """The evaluation records (those with a `fid`) by series (eval_setting), each the last record of each step
    in step order, series in order of first appearance."""
    series: dict[tuple, list[dict]] = {}
    for r in records:
        if "fid" in r:
            series.setdefault(eval_setting(r), []).append(r)
    return {key: latest_per_step(rs) for key, rs in series.items()}


def varying_settings(settings: set[tuple]) -> set[str]:
    """The EVAL_SETTING_KEYS in which some of these series (eval_setting tuples) differ."""
    return {k for i, k in enumerate(EVAL_SETTING_KEYS) if len({s[i] for s in settings}) > 1}


# the settings every series label shows; the others only where the series shown together differ in them
LABEL_ALWAYS = {"eval_mode": "{}", "eval_steps": "{} steps", "eval_cfg": "cfg {}", "eval_cls_cfg": "cls-cfg {}",
                "eval_samples": "{} samples"}
LABEL_WHEN_VARYING = {"eval_ref_sha256": "reference {:.8}", "eval_vae": "VAE {}", "eval_inception": "Inception {:.15}",
                      "eval_seed": "seed {}", "eval_dtype": "precision {}"}


def series_label(setting: dict, varying: set[str]) -> str:
    """A short name of an evaluation series (`setting`: EVAL_SETTING_KEYS -> value): sampler, steps, guidance,
    samples, the guidance interval when it is not [0, 1], and each other setting in `varying` ("unknown":
    not recorded, a record of an older version)."""
    parts = [form.format(setting[k]) for k, form in LABEL_ALWAYS.items() if setting.get(k) is not None]
    interval = (setting.get("eval_guidance_low"), setting.get("eval_guidance_high"))
    if interval != (0.0, 1.0) and (interval[1] is not None or "eval_guidance_high" in varying):
        parts.append("guidance in [{}, {}]".format(*(v if v is not None else "unknown" for v in interval)))
    for k, form in LABEL_WHEN_VARYING.items():
        if k in varying:
            parts.append(form.format(setting[k]) if setting.get(k) is not None else f"{form.split()[0]} unknown")
    return ", ".join(parts)


def best_fid_step(records: list[dict]) -> int | None:
    """The step of the lowest FID among metrics.jsonl's evaluation records (None: no finite one yet)."""
    scored = [r for r in records if isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"])]
    return int(min(scored, key=lambda r: r["fid"])["step"]) if scored else None
