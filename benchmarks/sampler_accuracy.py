"""Error of the ODE samplers against the exact probability-flow map of a Gaussian target, per number of
network evaluations (NFE): the table and the figure of docs/sampling.md.

    python benchmarks/sampler_accuracy.py            # prints the markdown table, writes docs/sampler_accuracy.png

The target and the solvers' runs are those of tests/test_samplers.py (flow_map_errors): per-class Gaussians
for the latents (std 0.5) and the class token (std 1.5), the exact velocity as the "model", the error the
max |x - x_exact| over 64 samples, latents and class token together. CPU, a few seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_samplers import flow_map_errors  # noqa: E402

NFES = (4, 6, 8, 10, 14, 20, 28, 40, 56, 80)
TABLE_NFES = (10, 20, 40)
LABELS = {"euler": "Euler", "heun": "Heun", "dpm2m": "DPM-Solver++(2M) (--mode dpm2m)",
          "unipc": "UniPC: 2M + corrector (--mode unipc)"}


def main(out: Path = ROOT / "docs" / "sampler_accuracy.png") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = {path: flow_map_errors(path, NFES) for path in ("linear", "cosine")}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, (path, errors) in zip(axes, results.items()):
        for name, errs in errors.items():
            # Heun with k steps makes 2k - 1 evaluations: plot it at its true count.
            nfes = [2 * ((n + 1) // 2) - 1 for n in NFES] if name == "heun" else list(NFES)
            ax.loglog(nfes, errs, "o-", ms=3, label=LABELS[name])
        ax.set_title(f"{path} path")
        ax.set_xlabel("network evaluations")
        ax.set_xticks([4, 10, 20, 40, 80], ["4", "10", "20", "40", "80"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("max |x - exact flow map|")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")

    print("| path | NFE | " + " | ".join(LABELS[n].split(" (")[0] for n in LABELS) + " |")
    print("|---|---|" + "---|" * len(LABELS))
    for path, errors in results.items():
        for nfe in TABLE_NFES:
            k = NFES.index(nfe)
            print(f"| {path} | {nfe} | " + " | ".join(f"{errors[n][k]:.1e}" for n in LABELS) + " |")


if __name__ == "__main__":
    main()
