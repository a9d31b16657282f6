"""Compare training runs: one table and one figure from the runs' own files.

    python -m evaluations.compare exps/RUN_A exps/RUN_B [...] [--out DIR]

Each RUN_DIR is a train.py output folder: `args.json` (the flags), `config.json` (the model config)
and `metrics.jsonl` (one JSON object per line: training lines carry `loss`, `loss_denoise`,
`loss_proj`, `loss_cls`, `grad_norm`, ...; evaluation lines carry `fid`, `sfid`, `inception_score`,
`precision`, `recall`, `eval_samples`, `eval_mode`, `eval_cfg`, ...). A folder of the authors' REG
train.py (args.json only) is accepted too. Prints a markdown table (run, method, model, encoder,
encoder depth, cls weight, steps, latest FID, best FID and its step) and writes DIR/comparison.md,
DIR/comparison.json and DIR/comparison.png (FID against step on top, below the loss terms each run
trains with: a plain SiT's loss_proj and loss_cls, logged as 0, are left out, as is REPA's loss_cls).

FIDs measured with different settings (reference, sampler, steps, guidance, VAE, number of samples,
Inception weights, seed, precision: reg.run_log.EVAL_SETTING_KEYS) are never merged: a run evaluated in two
ways (or resumed under new evaluation settings) gets one row and one curve per setting, named in the `eval`
column; records written before a setting was recorded form a series of their own. See
docs/design.md#evaluation for what the numbers are. `paper_reference(model)` returns the paper's
published numbers for a model size (evaluations/paper_results.json).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`python evaluations/compare.py`): hand over to the module form, as
    # preprocessing/dataset_tools.py does (which says why)
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-m", "evaluations.compare", *sys.argv[1:]], _env)

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from reg import run_log
from reg.utils import ArgumentParser, UserError, atomic_json_dump, atomic_write, atomic_write_bytes, run_main

PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.json")
LOSS_TERMS = ("loss_denoise", "loss_proj", "loss_cls")
DASH = "–"  # shown for a value a run does not have


class RunError(UserError):
    """A run folder that cannot be read as one: the message names the folder or file."""


# ----------------------------------------------------------------------------------------------
# Paper numbers
# ----------------------------------------------------------------------------------------------

def _model_key(model: str) -> str:
    """"SiT-XL/2", "SiT-XL-2" and "sit-xl/2" name the same model."""
    return model.strip().upper().replace("-", "/").replace("SIT/", "SIT-")


def paper_reference(model: str, path: str = PAPER_RESULTS) -> list[dict]:
    """The published results for one model size (e.g. "SiT-XL/2"), in file order: each a dict with
    method, model, iterations, guidance (bool), cfg (its scale; 1.0 without), fid, sfid, inception_score,
    precision, recall (None where the paper gives none) and source. Empty list for a size the
    paper does not report."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read the paper's results {path} ({type(e).__name__}: {e})") from e
    want = _model_key(model)
    return [dict(r, source=data["sources"][r["source"]]) for r in data["results"] if _model_key(r["model"]) == want]


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    path: str
    name: str
    args: dict
    config: dict
    train: list[dict] = field(default_factory=list)   # training lines, step order
    evals: list[dict] = field(default_factory=list)   # evaluation lines, step order
    notes: list[str] = field(default_factory=list)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_metrics(path: str) -> tuple[list[dict], list[dict], list[str]]:
    """(training lines, evaluation lines, notes) of a metrics.jsonl, read by reg.run_log (the one reader).
    A line with `fid` is an evaluation, one with `loss` a training line. A torn last line (a run killed
    mid-write) is skipped with a note; a broken line anywhere else is an error."""
    notes: list[str] = []
    if not os.path.isfile(path):
        return [], [], [f"no {os.path.basename(path)}"]
    try:
        records = run_log.read_metrics(path, warn=notes.append)
    except UserError as e:
        raise RunError(str(e)) from e
    train = [r for r in records if "fid" not in r and "loss" in r]
    # A resumed run may repeat steps: keep the last record of each (step, kind, eval setting).
    evals = [r for series in run_log.eval_series(records).values() for r in series]
    return run_log.latest_per_step(train), evals, notes


def load_run(path: str) -> Run:
    if not os.path.isdir(path):
        raise RunError(f"{path}: not a folder (give train.py's run folder, OUTPUT_DIR/EXP_NAME)")
    files = [f for f in ("args.json", "config.json", "metrics.jsonl") if os.path.isfile(os.path.join(path, f))]
    if not files:
        raise RunError(f"{path}: holds none of args.json, config.json, metrics.jsonl; not a training run folder")
    args = _read_json(os.path.join(path, "args.json"))
    config = _read_json(os.path.join(path, "config.json"))
    train, evals, notes = read_metrics(os.path.join(path, "metrics.jsonl"))
    name = os.path.basename(os.path.normpath(path))
    return Run(os.path.abspath(path), name, args, config, train, evals, notes)


def method_of(run: Run) -> str:
    """train.py records --method; the authors' args.json does not: REG has a class-token weight
    `cls` and projector dims, REPA runs have `proj_coeff` without `cls`, SiT neither."""
    if run.args.get("method"):
        return str(run.args["method"])
    if "use_cls_token" in run.config:
        return "reg" if run.config["use_cls_token"] else ("repa" if run.config.get("z_dims") else "sit")
    if run.args.get("cls") is not None and float(run.args.get("cls", 0)) > 0:
        return "reg"
    if float(run.args.get("proj_coeff", 0) or 0) > 0:
        return "repa"
    return DASH


def loss_terms(run: Run) -> tuple[str, ...]:
    """The loss terms the run trains with. train.py logs 0 for a term its method lacks (a plain SiT has
    neither the alignment nor the class-token term, REPA no class-token term), which is no curve to draw;
    a term a record does not hold at all is skipped point by point."""
    method = method_of(run)
    proj_coeff = run.args.get("proj_coeff")
    absent = set()
    if method == "sit" or run.config.get("z_dims") == [] or (_finite(proj_coeff) and proj_coeff == 0):
        absent.add("loss_proj")
    if method in ("sit", "repa") or run.config.get("use_cls_token") is False:
        absent.add("loss_cls")
    return tuple(t for t in LOSS_TERMS if t not in absent)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def summarise(runs: Sequence[Run]) -> list[dict]:
    """One row per run and evaluation setting (a run without evaluations: one row, FID None)."""
    varying = run_log.varying_settings({run_log.eval_setting(r) for run in runs for r in run.evals})
    rows = []
    for run in runs:
        method = method_of(run)
        uses_encoder = method != "sit"
        steps = max([r["step"] for r in run.train] + [r["step"] for r in run.evals], default=None)
        base = {
            "run": run.name, "path": run.path, "method": method,
            "model": run.args.get("model", DASH),
            "encoder": run.args.get("enc_type", DASH) if uses_encoder else DASH,
            "encoder_depth": run.args.get("encoder_depth", DASH) if uses_encoder else DASH,
            "cls_weight": run.args.get("cls", DASH) if method in ("reg", DASH) else DASH,
            "steps": steps,
        }
        groups: dict[tuple, list[dict]] = {}
        for r in run.evals:
            if _finite(r.get("fid")):
                groups.setdefault(run_log.eval_setting(r), []).append(r)
        if not groups:
            rows.append(dict(base, eval=DASH, latest_fid=None, latest_step=None, best_fid=None, best_step=None,
                             fid_curve=[], notes=run.notes))
            continue
        for key, recs in groups.items():
            latest = recs[-1]
            best = min(recs, key=lambda r: (r["fid"], r["step"]))
            setting = dict(zip(run_log.EVAL_SETTING_KEYS, key))
            rows.append(dict(base, eval=run_log.series_label(setting, varying) or DASH, eval_setting=setting,
                             latest_fid=latest["fid"], latest_step=latest["step"],
                             best_fid=best["fid"], best_step=best["step"],
                             fid_curve=[[r["step"], r["fid"]] for r in recs], notes=run.notes))
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return DASH
    if isinstance(x, float):
        return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"
    return str(x)


def _fmt_steps(x: Optional[int]) -> str:
    if x is None:
        return DASH
    return f"{x // 1000}K" if x >= 10_000 and x % 1000 == 0 else str(x)


def markdown_table(rows: Sequence[dict]) -> str:
    head = ["run", "method", "model", "encoder", "encoder depth", "cls weight", "steps", "eval", "latest FID",
            "best FID (step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        latest = DASH if r["latest_fid"] is None else f"{_fmt(float(r['latest_fid']))} ({_fmt_steps(r['latest_step'])})"
        best = DASH if r["best_fid"] is None else f"{_fmt(float(r['best_fid']))} ({_fmt_steps(r['best_step'])})"
        cells = [r["run"], r["method"], r["model"], r["encoder"], r["encoder_depth"], r["cls_weight"],
                 _fmt_steps(r["steps"]), r["eval"], latest, best]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------

def plot(runs: Sequence[Run], rows: Sequence[dict], path: str) -> None:
    """FID against training step for every run (and evaluation setting) on top, the loss terms
    below, shared x axis. Written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_loss) = plt.subplots(2, 1, sharex=True, figsize=(9, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {run.name: colours[i % len(colours)] for i, run in enumerate(runs)}
    styles = dict(zip(LOSS_TERMS, ("-", "--", ":")))
    markers = "osd^v<>"
    drawn_fid = False
    for run in runs:
        settings = [r for r in rows if r["run"] == run.name and r["fid_curve"]]
        for j, r in enumerate(settings):
            steps, fids = zip(*r["fid_curve"])
            label = run.name if len(settings) == 1 else f"{run.name} ({r['eval']})"
            ax_fid.plot(steps, fids, marker=markers[j % len(markers)], color=colour[run.name], label=label)
            drawn_fid = True
        for term in loss_terms(run):
            pts = [(r["step"], r[term]) for r in run.train if _finite(r.get(term))]
            if pts:
                xs, ys = zip(*pts)
                ax_loss.plot(xs, ys, styles[term], color=colour[run.name], label=f"{run.name}: {term}", linewidth=1)
    ax_fid.set_ylabel("FID")
    ax_fid.set_title("FID during training" + ("" if drawn_fid else " (no evaluations in these runs)"))
    ax_loss.set_ylabel("loss (loss_proj is -cos similarity)")
    ax_loss.set_xlabel("training step")
    for ax in (ax_fid, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=120)
    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def compare(run_dirs: Sequence[str], out: str) -> dict:
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two folders with one name (exps_a/run, exps_b/run): prefix the parent folder
        if names.count(r.name) > 1:
            r.name = os.path.join(os.path.basename(os.path.dirname(r.path)), r.name)
    rows = summarise(runs)
    table = markdown_table(rows)
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(os.path.join(out, "comparison.md"), table.encode())
    atomic_json_dump({"rows": rows}, os.path.join(out, "comparison.json"), sort_keys=False, nan_as_null=True)
    plot(runs, rows, os.path.join(out, "comparison.png"))
    return {"rows": rows, "table": table, "notes": [n for r in runs for n in r.notes]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m evaluations.compare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py run folders (OUTPUT_DIR/EXP_NAME)")
    p.add_argument("--out", default="comparison",
                   help="folder for comparison.md, comparison.json and comparison.png")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RunError(f"--out: {args.out} exists and is not a folder")
    result = compare(args.runs, args.out)
    print(result["table"], end="")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {os.path.join(args.out, 'comparison.md')}, comparison.json, comparison.png", file=sys.stderr)
    return result


if __name__ == "__main__":
    run_main(main)
