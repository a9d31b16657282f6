"""Plot the loss terms of a training run from its metrics.jsonl (written by train.py).

    python -m evaluations.plot_losses exps/NAME      # the run folder: its metrics.jsonl -> exps/NAME/losses.png
    python -m evaluations.plot_losses exps/NAME/metrics.jsonl --out exps/NAME/losses.png

metrics.jsonl holds one JSON object per log interval: step, loss, loss_denoise, loss_proj,
loss_cls, grad_norm, lr, ... (each loss is the mean over that interval). Each term gets its own
panel, because their scales differ: loss_proj is a negative cosine similarity (-1 is perfect
alignment) while the others are mean squared errors. Evaluation metrics (--keys fid,sfid,...) are drawn
one line per evaluation setting (reg.run_log.EVAL_SETTING_KEYS): FIDs measured differently never share a line.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`python evaluations/plot_losses.py`): hand over to the module form, as
    # preprocessing/dataset_tools.py does (which says why)
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-m", "evaluations.plot_losses", *sys.argv[1:]], _env)

import argparse
import math

from reg import run_log
from reg.utils import ArgumentParser, HelpFormatter, UserError, atomic_write, run_main

DEFAULT_KEYS = ("loss", "loss_denoise", "loss_proj", "loss_cls")
TITLES = {
    "loss": "total loss",
    "loss_denoise": "denoising (velocity MSE)",
    "loss_proj": "alignment (-cos to encoder features)",
    "loss_cls": "class-token velocity MSE",
    "fid": "FID (one line per evaluation setting)",
}


def read_metrics(path: str) -> list[dict]:
    """The training records of a metrics.jsonl file, in step order, read by reg.run_log (the one reader:
    a torn last line is skipped with a warning on stderr). Evaluation records (those with a `fid`,
    written by --eval-every at the same steps) are left out."""
    warn = lambda msg: print(f"plot_losses: warning: {msg}", file=sys.stderr)  # noqa: E731
    records = [r for r in run_log.read_metrics(path, warn=warn, missing_ok=False) if "fid" not in r]
    if not records:
        raise UserError(f"{path} holds no records: has the run logged anything yet?")
    # A resumed run appends; keep the last record of each step so a replayed interval is drawn once.
    return run_log.latest_per_step(records)


def read_eval_series(path: str) -> dict[tuple, list[dict]]:
    """The evaluation records of a metrics.jsonl by series (reg.run_log.eval_series)."""
    return run_log.eval_series(run_log.read_metrics(path, missing_ok=False))


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def plot_losses(records: list[dict], out: str, keys: tuple[str, ...] = DEFAULT_KEYS, title: str | None = None,
                series: dict[tuple, list[dict]] | None = None) -> list[str]:
    """Draw one panel per key present in the records into the PNG `out`; return the keys drawn. Evaluation
    metrics (run_log.EVAL_METRICS) come from `series` (read_eval_series), one line per evaluation setting."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed (CI, ssh, laptops without a GUI backend)
    import matplotlib.pyplot as plt

    varying = run_log.varying_settings(set(series or {}))
    # each key's lines: (label or None, points); a key is drawn if some line has a finite value for it
    # (e.g. loss_cls is 0 for --method repa but present)
    lines = {k: [(run_log.series_label(dict(zip(run_log.EVAL_SETTING_KEYS, s)), varying), _points(rs, k))
                 for s, rs in (series or {}).items()] if k in run_log.EVAL_METRICS else [(None, _points(records, k))]
             for k in keys}
    drawn = [k for k in keys if any(pts for _, pts in lines[k])]
    if not drawn:
        raise UserError(f"none of the keys {list(keys)} are in the metrics (found {sorted(records[0])})")
    cols = min(len(drawn), 2)
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False, sharex=True)
    for ax, key in zip(axes.flat, drawn):
        for label, pts in lines[key]:
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
        if len(lines[key]) > 1:
            ax.legend(fontsize=6)
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return drawn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("metrics", help="a run folder, or its metrics.jsonl")
    p.add_argument("--out", default=None, help="output PNG (None: losses.png beside the metrics file)")
    p.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated metrics to draw, one panel each")
    p.add_argument("--title", default=None, help="figure title (None: the run folder's name)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    if os.path.isdir(args.metrics):  # a run folder: train.py writes metrics.jsonl at its top
        args.metrics = os.path.join(args.metrics, "metrics.jsonl")
    records = read_metrics(args.metrics)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "losses.png")
    title = args.title or os.path.basename(os.path.dirname(os.path.abspath(args.metrics)))
    keys = tuple(k.strip() for k in args.keys.split(",") if k.strip())
    drawn = plot_losses(records, out, keys, title=title, series=read_eval_series(args.metrics))
    first, last = records[0], records[-1]
    print(f"plot_losses: {', '.join(drawn)} over steps {first['step']}..{last['step']} "
          f"({len(records)} points) -> {out}")
    return out


if __name__ == "__main__":
    run_main(main, parse_args)
