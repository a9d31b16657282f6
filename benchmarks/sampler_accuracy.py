"""Error of the ODE samplers against the exact probability-flow map of a Gaussian target, per number of
network evaluations (NFE): the tables and the figure of docs/sampling.md.

    python benchmarks/sampler_accuracy.py                    # prints the tables, writes docs/sampler_accuracy.png
    python benchmarks/sampler_accuracy.py --out /tmp/a.png   # the figure elsewhere

The target: one Gaussian per class for the latents (std 0.5) and for the class token (std 1.5); the "model" is
its exact velocity (GaussianVelocity), the error the max |x - reference| over 64 samples, latents and class
token together. Two guidance settings:
  none   no guidance: the reference is the exact flow map, eps at t = 1 -> mu + s eps at t = 0;
  paper  the paper's: 2.3 on the latents and the class token while t <= 0.85. The flow has no closed form
         there: the reference is classical RK4 on each side of the switch (stepping onto t = 0.85), each side
         with its own field, 400 steps per unit time (its own error is about 1e-10 here).
CPU, about 20 s. tests/test_samplers.py uses the same target and references.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from reg.interpolant import interpolant  # noqa: E402
from reg.utils import ArgumentParser, atomic_write  # noqa: E402
from samplers import euler_sampler, multistep_sampler  # noqa: E402

X_SHAPE = (2, 2, 2)  # (C, H, W) latents
CLS_DIM = 3
NFES = (4, 6, 8, 10, 14, 20, 28, 40, 56, 80)
TABLE_NFES = (10, 20, 40)
LABELS = {"euler": "Euler", "heun": "Heun", "dpm2m": "DPM-Solver++(2M) (--mode dpm2m)",
          "unipc": "UniPC: 2M + corrector (--mode unipc)"}
# The sampler keywords of each guidance setting; "paper" is the paper's guidance (docs/design.md#sampling).
GUIDANCE = {"none": {}, "paper": dict(cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85)}


class GaussianVelocity:
    """Exact velocity of a per-class Gaussian (x0, c0), independent given the class.

    For x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps, E[v | x_t] = alpha' E[x0 | x_t] + sigma' E[eps | x_t]
    with E[x0 | x_t] = mu + alpha s^2 / V (x_t - alpha mu), E[eps | x_t] = sigma / V (x_t - alpha mu) and
    V = alpha^2 s^2 + sigma^2. Labels 0..K-1 are the classes; label K (= num_classes) is the null label,
    whose exact velocity is that of the equal-weight mixture (class posterior from x and c jointly).
    Returns (v, zs, v_cls) like SiT; v_cls is None when called with cls_token=None. Records the batch
    size and labels of every call.
    """

    def __init__(self, mu_x: torch.Tensor, s_x: float, mu_c: torch.Tensor, s_c: float, path_type: str = "linear"):
        self.mu_x, self.s_x = mu_x.double(), s_x  # (K, C, H, W)
        self.mu_c, self.s_c = mu_c.double(), s_c  # (K, CLS_DIM)
        self.num_classes = mu_x.shape[0]
        self.path_type = path_type
        self.batch_sizes: list[int] = []
        self.labels: list[torch.Tensor] = []

    @staticmethod
    def _per_class(x, t, mu, s, path_type):
        """Velocity and log-likelihood of x under each class: (N, K, ...) and (N, K)."""
        a, sig, da, dsig = (q.reshape(-1, 1, *[1] * (x.dim() - 1)) for q in interpolant(t, path_type))
        var = a**2 * s**2 + sig**2
        r = x[:, None] - a * mu[None]
        v = da * (mu[None] + a * s**2 / var * r) + dsig * sig / var * r
        dims = tuple(range(2, r.dim()))
        loglik = (-0.5 * r**2 / var - 0.5 * torch.log(var)).sum(dims)
        return v, loglik

    def __call__(self, x, t, y, cls_token=None):
        self.batch_sizes.append(x.shape[0])
        self.labels.append(y.clone())
        t = t.double()
        vx, lx = self._per_class(x.double(), t, self.mu_x, self.s_x, self.path_type)
        w = torch.softmax(lx, dim=1)
        vc = lc = None
        if cls_token is not None:
            vc, lc = self._per_class(cls_token.double(), t, self.mu_c, self.s_c, self.path_type)
            w = torch.softmax(lx + lc, dim=1)
        null = y == self.num_classes
        onehot = torch.nn.functional.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).double()
        weights = torch.where(null[:, None], w, onehot)  # (N, K)

        def mix(v):
            return (weights.reshape(*weights.shape, *[1] * (v.dim() - 2)) * v).sum(1)

        return mix(vx).to(x.dtype), [], None if vc is None else mix(vc).to(x.dtype)


def two_class_model(path_type: str = "linear") -> GaussianVelocity:
    mu_x = torch.stack([torch.linspace(-1.0, 0.5, 8).reshape(X_SHAPE),
                        torch.linspace(1.5, 0.0, 8).reshape(X_SHAPE)])
    mu_c = torch.tensor([[-2.0, 0.5, 1.0], [2.0, -0.5, 3.0]])
    return GaussianVelocity(mu_x, 0.5, mu_c, 1.5, path_type)


def initial_noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (n, *X_SHAPE), class tokens (n, CLS_DIM)) float64 standard normal noise."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *X_SHAPE, generator=g, dtype=torch.float64),
            torch.randn(n, CLS_DIM, generator=g, dtype=torch.float64))


def rk4_reference(model: GaussianVelocity, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, *,
                  cfg_scale: float = 1.0, cls_cfg_scale: float = 0.0, guidance_low: float = 0.0,
                  guidance_high: float = 1.0, steps_per_unit: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability-flow ODE from t = 1 to 0 by classical RK4, written from the definitions and not
    with samplers.py: the field is guided (v_u + scale (v - v_u), the class token with cls_cfg_scale if
    > 0) where guidance_low <= t <= guidance_high and cfg_scale > 1, conditional elsewhere. The steps
    land on the switch times, and every stage of a step uses the field of that step's side."""
    cuts = sorted({1.0, 0.0, *(t for t in (guidance_high, guidance_low) if 0 < t < 1)}, reverse=True)
    null = torch.full_like(y, model.num_classes)

    def velocity(x, c, t: float, guided: bool):
        if not guided:
            v, _, vc = model(x, torch.full((len(y),), t, dtype=torch.float64), y, cls_token=c)
            return v, vc
        v, _, vc = model(torch.cat([x, x]), torch.full((2 * len(y),), t, dtype=torch.float64),
                         torch.cat([y, null]), cls_token=torch.cat([c, c]))
        (v, v_u), (vc, vc_u) = v.chunk(2), vc.chunk(2)
        return v_u + cfg_scale * (v - v_u), vc_u + cls_cfg_scale * (vc - vc_u) if cls_cfg_scale > 0 else vc

    for t_hi, t_lo in zip(cuts[:-1], cuts[1:]):
        guided = cfg_scale > 1 and guidance_low <= 0.5 * (t_hi + t_lo) <= guidance_high
        n = math.ceil((t_hi - t_lo) * steps_per_unit)
        ts = torch.linspace(t_hi, t_lo, n + 1, dtype=torch.float64).tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            h, tm = t1 - t0, 0.5 * (t0 + t1)
            k1 = velocity(x, c, t0, guided)
            k2 = velocity(x + 0.5 * h * k1[0], c + 0.5 * h * k1[1], tm, guided)
            k3 = velocity(x + 0.5 * h * k2[0], c + 0.5 * h * k2[1], tm, guided)
            k4 = velocity(x + h * k3[0], c + h * k3[1], t1, guided)
            x = x + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            c = c + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return x, c


def flow_map_errors(path_type: str, nfes=(10, 20, 40), n: int = 64, guidance: str | dict = "none",
                    reference_steps: int = 400, solvers=tuple(LABELS)) -> dict[str, list[float]]:
    """Max |error| (latents and class token) against the reference, per solver (keys of LABELS), at equal
    evaluations: Euler nfe steps, Heun (nfe + 1) // 2 steps (2 steps - 1 evaluations), the multistep
    solvers nfe steps. `guidance`: a key of GUIDANCE or its own sampler keywords (cfg_scale, ...);
    `reference_steps`: RK4 steps per unit time where there is guidance."""
    model = two_class_model(path_type)
    x1, c1 = initial_noise(n, seed=2)
    y = torch.arange(2).repeat(n // 2)
    settings = GUIDANCE[guidance] if isinstance(guidance, str) else guidance
    kw = dict(cls_latents=c1, path_type=path_type, **settings)
    if settings.get("cfg_scale", 1.0) <= 1.0:  # the exact flow map
        target = (model.mu_x[y] + model.s_x * x1, model.mu_c[y] + model.s_c * c1)
    else:
        target = rk4_reference(model, x1, c1, y, steps_per_unit=reference_steps, **settings)
    runs = {
        "euler": lambda k: (k, lambda: euler_sampler(model, x1, y, num_steps=k, **kw)),
        "heun": lambda k: (2 * ((k + 1) // 2) - 1, lambda: euler_sampler(model, x1, y, num_steps=(k + 1) // 2,
                                                                         heun=True, **kw)),
        "dpm2m": lambda k: (k, lambda: multistep_sampler(model, x1, y, num_steps=k, corrector=False, **kw)),
        "unipc": lambda k: (k, lambda: multistep_sampler(model, x1, y, num_steps=k, **kw)),
    }
    errors: dict[str, list[float]] = {name: [] for name in solvers}
    for name in solvers:
        for nfe in nfes:
            expected_calls, run = runs[name](nfe)
            model.batch_sizes.clear()
            out = run()
            if not len(model.batch_sizes) == expected_calls <= nfe:
                raise AssertionError(f"{name} at {nfe} evaluations made {len(model.batch_sizes)} model calls")
            errors[name].append(max((o - t).abs().max().item() for o, t in zip(out, target)))
    return errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python benchmarks/sampler_accuracy.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "sampler_accuracy.png",
                   help="where to write the figure (PNG)")
    return p.parse_args(argv)


def plot(results: dict[tuple[str, str], dict[str, list[float]]], out: Path) -> None:
    """One panel per (guidance, path): error against evaluations, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.6), sharey=True)
    for ax, ((guidance, path), errors) in zip(axes.flat, results.items()):
        for name, errs in errors.items():
            # Heun with k steps makes 2k - 1 evaluations: plot it at its true count.
            nfes = [2 * ((n + 1) // 2) - 1 for n in NFES] if name == "heun" else list(NFES)
            ax.loglog(nfes, errs, "o-", ms=3, label=LABELS[name])
        title = "no guidance" if guidance == "none" else "cfg 2.3 while t <= 0.85"
        ax.set_title(f"{path} path, {title}", fontsize=9)
        ax.set_xticks([4, 10, 20, 40, 80], ["4", "10", "20", "40", "80"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("network evaluations")
    for ax in axes[:, 0]:
        ax.set_ylabel("max |x - reference|")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {(g, path): flow_map_errors(path, NFES, guidance=g) for g in GUIDANCE for path in ("linear", "cosine")}
    plot(results, args.out)
    print(f"wrote {args.out}")
    print("| guidance | path | NFE | " + " | ".join(LABELS[n].split(" (")[0] for n in LABELS) + " |")
    print("|---|---|---|" + "---|" * len(LABELS))
    for (guidance, path), errors in results.items():
        for nfe in TABLE_NFES:
            k = NFES.index(nfe)
            print(f"| {guidance} | {path} | {nfe} | " + " | ".join(f"{errors[n][k]:.1e}" for n in LABELS) + " |")


if __name__ == "__main__":
    main()
