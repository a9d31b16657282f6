"""Analytic checks of the samplers against a closed-form velocity field.

For x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps, (x0, eps, x_t) are jointly Gaussian and
    E[v | x_t] = d_alpha E[x0 | x_t] + d_sigma E[eps | x_t],
    E[x0 | x_t] = mu + alpha s^2 / V (x_t - alpha mu),  E[eps | x_t] = sigma / V (x_t - alpha mu),
with V = alpha^2 s^2 + sigma^2 (benchmarks/sampler_accuracy.py's GaussianVelocity, shared with the accuracy
benchmark). That is the exact "model" a perfect network would learn, so
the samplers must reproduce N(mu, s^2) up to discretisation and sampling error. With one
Gaussian per class (a mixture for the null label) it also tests classifier-free guidance.

At the end: the time grids, the same as the authors' samplers (a model that records the times it is asked at).
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.sampler_accuracy import CLS_DIM, X_SHAPE, flow_map_errors, initial_noise, two_class_model
from reg.interpolant import interpolant
from samplers import (T_LAST, data_from_velocity, euler_maruyama_sampler, euler_sampler, multistep_sampler,
                      multistep_time_grid, per_sample_randn_like, score_from_velocity)


def standardized(samples, mu, s):
    """Pool (sample - mu) / s over samples and dimensions: should be N(0, 1)."""
    return ((samples - mu) / s).flatten()


def assert_gaussian(z, mean_tol, std_tol, what):
    assert abs(z.mean().item()) < mean_tol, f"{what}: standardized mean {z.mean().item():.4f}"
    assert abs(z.std().item() - 1) < std_tol, f"{what}: standardized std {z.std().item():.4f}"


# ----------------------------------------------------------------------------------------------
# Analytic check: both samplers reach the target distribution (cfg 1 = each class's own target)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["sde", "ode_heun"])
def test_reaches_each_class_target(sampler, path_type):
    model = two_class_model(path_type)
    n = 3000
    x1, c1 = initial_noise(2 * n, seed=1)
    y = torch.arange(2).repeat_interleave(n)
    torch.manual_seed(0)
    if sampler == "sde":
        x0, c0 = euler_maruyama_sampler(model, x1, y, cls_latents=c1, num_steps=250, cfg_scale=1.0,
                                        path_type=path_type)
    else:
        x0, c0 = euler_sampler(model, x1, y, cls_latents=c1, num_steps=50, heun=True,
                               cfg_scale=1.0, path_type=path_type)
    assert x0.dtype == torch.float64 and x0.shape == x1.shape and c0.shape == c1.shape
    # Pooled over 2 * 3000 samples x 8 (resp. 3) dims: the std error of the mean is ~0.005
    # (~0.008 for the class token); allow 4 of them plus a little discretisation bias.
    for k in range(2):
        sel = y == k
        assert_gaussian(standardized(x0[sel], model.mu_x[k], model.s_x), 0.03, 0.03, f"latents class {k}")
        assert_gaussian(standardized(c0[sel], model.mu_c[k], model.s_c), 0.05, 0.04, f"cls class {k}")
        # Per-dimension means too (catches a shift in one dimension hidden by pooling).
        se = 5 * model.s_x / math.sqrt(n)
        assert torch.allclose(x0[sel].mean(0), model.mu_x[k], atol=se + 0.01)
        assert torch.allclose(c0[sel].mean(0), model.mu_c[k], atol=5 * model.s_c / math.sqrt(n) + 0.01)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_is_the_exact_gaussian_flow(path_type):
    """The exact flow maps eps at t=1 to mu + s eps at t=0; Heun is 2nd order, Euler 1st."""
    model = two_class_model(path_type)
    x1, c1 = initial_noise(64, seed=2)
    y = torch.arange(2).repeat(32)
    target_x = model.mu_x[y] + model.s_x * x1
    target_c = model.mu_c[y] + model.s_c * c1
    errors = {}
    for heun, steps in [(False, 50), (True, 50), (False, 100)]:
        x0, c0 = euler_sampler(model, x1, y, cls_latents=c1, num_steps=steps, heun=heun, path_type=path_type)
        errors[heun, steps] = max((x0 - target_x).abs().max().item(), (c0 - target_c).abs().max().item())
    assert errors[True, 50] < 2e-3
    assert errors[True, 50] < errors[False, 50] / 5
    # Euler's global error halves with twice the steps (first order).
    assert 0.35 < errors[False, 100] / errors[False, 50] < 0.65


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_multistep_beats_heun_at_equal_evaluations(path_type):
    """UniPC below Heun (and Euler) at 10, 20 and 40 evaluations; DPM-Solver++(2M) below Euler and
    second order (docs/sampling.md has the table and the figure)."""
    nfes = (10, 20, 40, 80)
    e = flow_map_errors(path_type, nfes)
    for k, nfe in enumerate(nfes[:3]):
        assert e["unipc"][k] < e["heun"][k] < e["euler"][k], (nfe, e)
        assert e["dpm2m"][k] < e["euler"][k], (nfe, e)
    # Second order: 40 -> 80 evaluations divides the error by ~4 (Euler by 2).
    for name in ("dpm2m", "unipc"):
        assert e[name][3] / e[name][2] < 0.4, (name, e[name])


def test_dpm2m_alone_is_above_euler_at_4_and_6_evaluations_on_the_cosine_path():
    """What docs/sampling.md says of DPM-Solver++(2M) without the corrector: below Euler from 8 evaluations on,
    but above it at 4 and 6 on the cosine path."""
    e = flow_map_errors("cosine", (4, 6, 8, 10), solvers=("euler", "dpm2m"))
    assert e["dpm2m"][0] > e["euler"][0] and e["dpm2m"][1] > e["euler"][1], e
    assert e["dpm2m"][2] < e["euler"][2] and e["dpm2m"][3] < e["euler"][3], e
    linear = flow_map_errors("linear", (4, 6), solvers=("euler", "dpm2m"))
    assert all(d < u for d, u in zip(linear["dpm2m"], linear["euler"])), linear


def test_accuracy_benchmark_answers_help_and_writes_where_told(tmp_path, capsys, monkeypatch):
    """--help prints the usage and runs nothing; --out puts the figure there (docs/ untouched)."""
    from benchmarks import sampler_accuracy as bench
    figure = bench.ROOT / "docs" / "sampler_accuracy.png"
    before = figure.stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out
    fake = {name: [10.0 ** -k for k in range(len(bench.NFES))] for name in bench.LABELS}  # the plumbing only
    monkeypatch.setattr(bench, "flow_map_errors", lambda path, nfes, guidance: fake)
    bench.main(["--out", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_mtime_ns == before
    table = capsys.readouterr().out
    assert "| paper | cosine | 40 |" in table and "| none | linear | 10 |" in table


def test_data_from_velocity_is_exact():
    """D = E[x0 | x_t] of the Gaussian from its exact velocity, for both paths and at t = 1."""
    model = two_class_model("cosine")
    x, c = initial_noise(8, seed=13)
    y = torch.zeros(8, dtype=torch.long)
    for path_type in ("linear", "cosine"):
        model.path_type = path_type
        for tv in [1.0, 0.5, 0.1]:
            v, _, _ = model(x, torch.full((8,), tv, dtype=torch.float64), y)
            a, sig, _, _ = (float(q) for q in interpolant(torch.tensor(tv, dtype=torch.float64), path_type))
            var = a**2 * model.s_x**2 + sig**2
            exact = model.mu_x[0] + a * model.s_x**2 / var * (x - a * model.mu_x[0])
            torch.testing.assert_close(data_from_velocity(v, x, tv, path_type), exact)


@pytest.mark.parametrize("corrector", [False, True])
def test_multistep_guidance_interval_and_one_evaluation_per_step(corrector):
    """Evaluation k is at grid time t_k (k < num_steps); a guided one is one batched forward of 2N, null
    label second. Steps inside [guidance_low, guidance_high] follow the guided field; the evaluation at a
    switch is guided when a step next to it is (for dpm2m only the step after it: without the corrector
    the step before needs no evaluation there). cls_cfg_scale acts on the class token only."""
    model = two_class_model()
    x1, c1 = initial_noise(6, seed=6)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    steps = 10
    multistep_sampler(model, x1, y, cls_latents=c1, num_steps=steps, cfg_scale=2.0, guidance_low=0.3,
                      guidance_high=0.7, corrector=corrector)
    t_grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]  # 0.3 and 0.7 are on it
    low_edge = 0.3 - 1e-9 if corrector else 0.3 + 1e-9
    assert model.batch_sizes == [12 if low_edge <= t <= 0.7 else 6 for t in t_grid.tolist()]
    for labels, size in zip(model.labels, model.batch_sizes):
        assert labels[:6].tolist() == y.tolist()
        assert size == 6 or (labels[6:] == model.num_classes).all()

    # An interval narrower than a step is still followed: the grid steps onto both ends (one step inside).
    kw = dict(cls_latents=c1, num_steps=steps, corrector=corrector)
    model.batch_sizes.clear()
    narrow = multistep_sampler(model, x1, y, cfg_scale=4.0, cls_cfg_scale=4.0, guidance_low=0.55,
                               guidance_high=0.58, **kw)
    assert len(model.batch_sizes) == steps and 12 in model.batch_sizes
    plain = multistep_sampler(model, x1, y, **kw)
    assert not torch.allclose(narrow[0], plain[0]) and not torch.allclose(narrow[1], plain[1])
    # cfg_scale <= 1 turns guidance off, whatever cls_cfg_scale (as REG); cls_cfg_scale 0 leaves the
    # class token on its conditional prediction while the latents are guided.
    cls_only = multistep_sampler(model, x1, y, cfg_scale=1.0, cls_cfg_scale=4.0, guidance_low=0.3, **kw)
    assert torch.equal(cls_only[0], plain[0]) and torch.equal(cls_only[1], plain[1])
    guided = multistep_sampler(model, x1, y, cfg_scale=3.0, cls_cfg_scale=3.0, **kw)
    lat_only = multistep_sampler(model, x1, y, cfg_scale=3.0, cls_cfg_scale=0.0, **kw)
    assert not torch.allclose(guided[0], plain[0]) and not torch.allclose(guided[1], lat_only[1])


def test_multistep_time_grid_steps_onto_the_guidance_switches():
    """No interval inside (0, 1): euler_sampler's grid exactly. Otherwise each switch time is a grid point,
    the pieces between them uniform, num_steps + 1 points from 1 to 0."""
    uniform = torch.linspace(1.0, 0.0, 41, dtype=torch.float64)
    for kw in [{}, dict(cfg_scale=2.3), dict(cfg_scale=2.3, guidance_low=0.0, guidance_high=1.0),
               dict(cfg_scale=1.0, guidance_high=0.85)]:  # cfg 1: no guidance, no switch
        assert torch.equal(multistep_time_grid(40, **kw), uniform), kw
    on_grid = multistep_time_grid(40, cfg_scale=2.3, guidance_high=0.85)  # 0.85 = 1 - 6/40
    assert 0.85 in on_grid.tolist() and torch.allclose(on_grid, uniform, rtol=0, atol=1e-15)
    for steps, low, high in [(7, 0.0, 0.85), (10, 0.2, 0.66), (3, 0.5, 0.51), (25, 0.1, 0.99)]:
        grid = multistep_time_grid(steps, cfg_scale=2.0, guidance_low=low, guidance_high=high)
        points = grid.tolist()
        assert len(points) == steps + 1 and points[0] == 1.0 and points[-1] == 0.0
        assert all(a > b for a, b in zip(points, points[1:]))
        cuts = [1.0] + [s for s in (high, low) if 0 < s < 1] + [0.0]
        idx = [points.index(cut) for cut in cuts]  # every switch is on the grid
        for i, j in zip(idx, idx[1:]):  # uniform between switches
            gaps = grid[i:j + 1].diff()
            assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-9, atol=0), (steps, low, high)
    from reg.utils import UserError  # one line from the entry points, naming the flag
    with pytest.raises(UserError, match=r"num_steps \(--num-steps\) must be >= 3, got 2"):
        multistep_time_grid(2, cfg_scale=2.0, guidance_low=0.2, guidance_high=0.85)


@pytest.mark.parametrize("guidance", ["paper", dict(cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.3,
                                                     guidance_high=0.85)], ids=["paper", "two-switches"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_multistep_is_second_order_under_the_papers_guidance(path_type, guidance):
    """The paper's guidance (2.3 on latents and class token while t <= 0.85): the field jumps at 0.85 (and at
    0.3 too in the second case). Against RK4 on each side of the switch: DPM-Solver++(2M) and UniPC keep their
    order (40 -> 80 -> 160 evaluations divide the error by ~4; a history carried across the switch made it ~2,
    first order) and UniPC stays below Heun at equal evaluations (docs/sampling.md has the table)."""
    nfes = (40, 80, 160)
    e = flow_map_errors(path_type, nfes, guidance=guidance, reference_steps=50, solvers=("heun", "dpm2m", "unipc"))
    for name in ("dpm2m", "unipc"):
        order = math.log2(e[name][1] / e[name][2])  # measured: 1.8 (2M), 1.8-2.1 (UniPC)
        assert 1.6 < order < 2.5, (name, order, e[name])
        assert 1.3 < math.log2(e[name][0] / e[name][1]) < 2.5, (name, e[name])
    for k, nfe in enumerate(nfes):
        assert e["unipc"][k] < e["heun"][k], (nfe, e)


def test_score_from_velocity_is_exact():
    """s = -E[eps | x] / sigma for the linear path: check the formula on a Gaussian."""
    model = two_class_model("linear")
    x, c = initial_noise(16, seed=3)
    y = torch.zeros(16, dtype=torch.long)
    for tv in [0.04, 0.3, 0.9, 1.0]:
        t = torch.full((16,), tv, dtype=torch.float64)
        v, _, _ = model(x, t, y, cls_token=c)
        a, sig = 1 - tv, tv
        var = a**2 * model.s_x**2 + sig**2
        exact = -(x - a * model.mu_x[0]) / var  # score of N(a mu, var)
        torch.testing.assert_close(score_from_velocity(v, x, t.reshape(-1, 1, 1, 1)), exact)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance


def class_means(samples, y):
    return torch.stack([samples[y == k].mean(0) for k in range(2)])


@pytest.mark.parametrize("sampler", ["sde", "ode", "unipc"])
def test_cfg_pushes_class_means_away_from_unconditional_mean(sampler):
    model = two_class_model()
    n = 1500
    x1, c1 = initial_noise(2 * n, seed=4)
    y = torch.arange(2).repeat_interleave(n)

    def run(cfg, cls_cfg):
        torch.manual_seed(5)
        kw = dict(cls_latents=c1, cfg_scale=cfg, cls_cfg_scale=cls_cfg)
        if sampler == "sde":
            return euler_maruyama_sampler(model, x1, y, num_steps=100, **kw)
        if sampler == "unipc":
            return multistep_sampler(model, x1, y, num_steps=30, **kw)
        return euler_sampler(model, x1, y, num_steps=30, heun=True, **kw)

    x_1, c_1 = run(1.0, 1.0)
    x_g, c_g = run(3.0, 3.0)
    x_c, c_c = run(3.0, 0.0)  # latents guided, class token conditional only
    uncond_x, uncond_c = model.mu_x.mean(0), model.mu_c.mean(0)  # mean of the 50/50 mixture

    def push(samples, k, target, uncond):
        """Class-k mean projected on (class mean - unconditional mean): 1 = on target."""
        direction = target - uncond
        return (((class_means(samples, y)[k] - uncond) * direction).sum() / (direction**2).sum()).item()

    for k in range(2):
        for name, guided, plain, target, uncond in [("latents", x_g, x_1, model.mu_x[k], uncond_x),
                                                   ("cls", c_g, c_1, model.mu_c[k], uncond_c)]:
            p_1, p_g = push(plain, k, target, uncond), push(guided, k, target, uncond)
            # cfg 1 lands on the class mean (sampling error ~0.01-0.02 here) ...
            assert abs(p_1 - 1) < 0.04, f"{name} class {k}: cfg 1 mean at {p_1:.3f}"
            # ... and cfg 3 overshoots it, away from the unconditional mean (~1.07-1.5 here;
            # same noise in both runs, so the difference is nearly free of sampling error).
            assert p_g > 1.04 and p_g > p_1 + 0.04, f"{name} class {k}: cfg 3 mean at {p_g:.3f}"
        # cls_cfg_scale = 0: the class token follows its conditional drift, so it still reaches
        # its own target even though the latents are guided.
        assert abs(push(c_c, k, model.mu_c[k], uncond_c) - 1) < 0.04
        assert push(x_c, k, model.mu_x[k], uncond_x) > 1.04


def test_cfg_is_one_batched_forward_inside_the_interval_only():
    model = two_class_model()
    x1, c1 = initial_noise(6, seed=6)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    steps = 20
    torch.manual_seed(0)
    euler_maruyama_sampler(model, x1, y, cls_latents=c1, num_steps=steps, cfg_scale=2.0,
                           guidance_low=0.3, guidance_high=0.7)
    t_grid = torch.linspace(1, T_LAST, steps, dtype=torch.float64)
    expect = [12 if 0.3 <= t <= 0.7 else 6 for t in t_grid.tolist()]
    assert model.batch_sizes == expect
    for labels, size in zip(model.labels, model.batch_sizes):
        assert labels[:6].tolist() == y.tolist()
        if size == 12:  # second half is the null label
            assert (labels[6:] == model.num_classes).all()

    # An interval between two grid times is exactly unguided sampling with the same noise.
    out = []
    for cfg, low, high in [(4.0, 0.5, 0.51), (1.0, 0.0, 1.0)]:
        torch.manual_seed(7)
        out.append(euler_maruyama_sampler(model, x1, y, cls_latents=c1, num_steps=steps,
                                          cfg_scale=cfg, cls_cfg_scale=4.0, guidance_low=low, guidance_high=high))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])

    # Settings that cannot be meant are refused by both samplers.
    for sampler in (euler_maruyama_sampler, euler_sampler, multistep_sampler):
        with pytest.raises(ValueError, match="guidance_low 0.8 > guidance_high 0.2"):
            sampler(model, x1, y, cls_latents=c1, num_steps=2, cfg_scale=2.0, guidance_low=0.8, guidance_high=0.2)
        with pytest.raises(ValueError, match="must be >= 0"):
            sampler(model, x1, y, cls_latents=c1, num_steps=2, cfg_scale=2.0, cls_cfg_scale=-1.0)


# ----------------------------------------------------------------------------------------------
# Randomness, dtypes, models without the class token


def test_per_sample_generators_make_samples_batch_independent():
    model = two_class_model()
    x1, c1 = initial_noise(4, seed=8)
    y = torch.tensor([0, 1, 1, 0])

    def gens(idx):
        return per_sample_randn_like([torch.Generator().manual_seed(100 + i) for i in idx])

    kw = dict(num_steps=15, cfg_scale=2.0, cls_cfg_scale=2.0, guidance_high=0.8)
    full = euler_maruyama_sampler(model, x1, y, cls_latents=c1, randn_like=gens(range(4)), **kw)
    # Same images in two batches of 2, in another order, with the global RNG disturbed.
    torch.manual_seed(123)
    a = euler_maruyama_sampler(model, x1[[2, 0]], y[[2, 0]], cls_latents=c1[[2, 0]], randn_like=gens([2, 0]), **kw)
    b = euler_maruyama_sampler(model, x1[[3, 1]], y[[3, 1]], cls_latents=c1[[3, 1]], randn_like=gens([3, 1]), **kw)
    torch.testing.assert_close(full[0][[2, 0, 3, 1]], torch.cat([a[0], b[0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(full[1][[2, 0, 3, 1]], torch.cat([a[1], b[1]]), rtol=0, atol=1e-12)
    # A different generator gives a different sample.
    other = euler_maruyama_sampler(model, x1, y, cls_latents=c1, randn_like=gens(range(10, 14)), **kw)
    assert not torch.allclose(other[0], full[0])

    with pytest.raises(ValueError, match="per-sample generators"):
        euler_maruyama_sampler(model, x1, y, cls_latents=c1, randn_like=gens(range(3)), **kw)


def test_per_sample_randn_like_rows_come_from_their_own_generator():
    g = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = per_sample_randn_like(g)(torch.empty(3, 2, 5, dtype=torch.float64))
    assert noise.dtype == torch.float64
    for i, s in enumerate((1, 2, 3)):
        expected = torch.randn(2, 5, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        assert torch.equal(noise[i], expected)


def test_default_rng_single_generator_and_randn_like():
    model = two_class_model()
    x1, c1 = initial_noise(4, seed=9)
    y = torch.tensor([0, 1, 0, 1])
    kw = dict(cls_latents=c1, num_steps=10)
    torch.manual_seed(11)
    a = euler_maruyama_sampler(model, x1, y, **kw)
    torch.manual_seed(11)
    b = euler_maruyama_sampler(model, x1, y, **kw)
    g = torch.Generator().manual_seed(11)
    c = euler_maruyama_sampler(model, x1, y, randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype),
                               **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(c[0], a[0])  # CPU default RNG == seeded generator

    # randn_like replaces the RNG: zero noise makes the SDE deterministic, and it sees both states.
    shapes = []

    def zero_noise(x):
        shapes.append(tuple(x.shape))
        return torch.zeros_like(x)

    d = euler_maruyama_sampler(model, x1, y, randn_like=zero_noise, **kw)
    e = euler_maruyama_sampler(model, x1, y, randn_like=zero_noise, **kw)
    assert torch.equal(d[0], e[0]) and not torch.equal(d[0], a[0])
    assert shapes[:2] == [(4, *X_SHAPE), (4, CLS_DIM)] and len(shapes) == 2 * 2 * (10 - 1)


def test_without_class_token_and_float32_io():
    model = two_class_model()
    x1, _ = initial_noise(8, seed=10)
    x1 = x1.float()
    y = torch.arange(2).repeat(4)
    for out in [euler_maruyama_sampler(model, x1, y, num_steps=8, cfg_scale=2.0),
                euler_sampler(model, x1, y, num_steps=8, heun=True, cfg_scale=2.0),
                multistep_sampler(model, x1, y, num_steps=8, cfg_scale=2.0)]:
        latents, cls = out
        assert cls is None and latents.dtype == torch.float32 and latents.shape == x1.shape
        assert torch.isfinite(latents).all()


class TinyModule(torch.nn.Module):
    """A parameterised stand-in for SiT that records the dtypes it is called with."""

    def __init__(self, dtype):
        super().__init__()
        self.num_classes = 3
        self.scale = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.seen = []

    def forward(self, x, t, y, cls_token=None):
        self.seen.append((x.dtype, t.dtype, None if cls_token is None else cls_token.dtype))
        return -x * self.scale, [], None if cls_token is None else -cls_token * self.scale


def test_model_runs_in_its_own_dtype_and_must_be_in_eval_mode():
    model = TinyModule(torch.bfloat16).eval()
    x1, c1 = initial_noise(2, seed=11)
    y = torch.tensor([0, 2])
    x0, c0 = euler_maruyama_sampler(model, x1.float(), y, cls_latents=c1.float(), num_steps=5, cfg_scale=1.5)
    assert set(model.seen) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16)}
    assert x0.dtype == torch.float32 and c0.dtype == torch.float32  # state stays high precision
    model.train()
    with pytest.raises(ValueError, match="train mode"):
        euler_sampler(model, x1, y, num_steps=2)


def test_mismatched_class_token_is_an_error():
    model = two_class_model()
    x1, c1 = initial_noise(2, seed=12)
    y = torch.tensor([0, 1])
    no_cls = TinyModule(torch.float64).eval()
    no_cls.forward = lambda x, t, y, cls_token=None: (-x, [], None)
    with pytest.raises(ValueError, match="use_cls_token=False"):
        euler_sampler(no_cls, x1, y, cls_latents=c1, num_steps=2)

    def needs_cls(x, t, y, cls_token=None):
        return -x, [], torch.zeros(x.shape[0], CLS_DIM, dtype=x.dtype)

    with pytest.raises(ValueError, match="cls_latents is None"):
        euler_maruyama_sampler(needs_cls, x1, y, num_steps=2)
    with pytest.raises(ValueError, match="unknown path type"):
        euler_sampler(model, x1, y, num_steps=2, path_type="vp")


def test_multistep_modes_are_selectable_everywhere():
    """--mode dpm2m/unipc in generate.py and sweep.py, --eval-mode in train.py, and generation's dispatch."""
    import generate
    import sweep
    import train
    from samplers import SAMPLER_MODES

    assert SAMPLER_MODES == ("sde", "ode", "dpm2m", "unipc")
    assert generate.parse_args(["--mode", "unipc"]).mode == "unipc"
    assert sweep.parse_args(["--ref-batch", "r.npz", "--out", "o", "--mode", "sde,dpm2m,unipc"]).mode == \
        ["sde", "dpm2m", "unipc"]
    assert train.parse_args(["--eval-mode", "dpm2m"]).eval_mode == "dpm2m"
    with pytest.raises(SystemExit):
        sweep.parse_args(["--ref-batch", "r.npz", "--out", "o", "--mode", "sde,dpm3"])


@pytest.mark.parametrize("mode, corrector", [("dpm2m", False), ("unipc", True)])
def test_generation_dispatches_the_multistep_modes(mode, corrector, monkeypatch):
    from models.sit import SiT_models
    from reg import seeded_images

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["corrector"])
        return multistep_sampler(*args, **kwargs)

    monkeypatch.setattr(seeded_images, "multistep_sampler", recording)
    model = SiT_models["SiT-T/2"](input_size=2, in_channels=3, num_classes=2, z_dims=[8], encoder_depth=1,
                                  projector_dim=8).eval()
    (_, images, _), = seeded_images.generate_images(
        model, lambda z: z.repeat_interleave(4, -1).repeat_interleave(4, -2).tanh(), [0, 1], global_seed=0,
        num_classes=2, mode=mode, num_steps=3, latents_scale=1.0, batch_size=2, device="cpu")
    assert seen == [corrector] and images.shape == (2, 8, 8, 3)


# ----------------------------------------------------------------------------- the time grids, as the authors' samplers

class TimeSpy:
    """A velocity field v(x, t) = v_const that records the times the sampler evaluates it at."""
    num_classes = 4

    def __init__(self, v_const: float):
        self.v_const, self.times = v_const, []

    def __call__(self, x, t, y, cls_token=None):
        self.times.append(float(t[0]))
        return torch.full_like(x, self.v_const), [], torch.full_like(cls_token, self.v_const)


def test_sde_time_grid_is_the_authors():
    """REG samplers.py euler_maruyama_sampler: t_steps = linspace(1, 0.04, num_steps), then 0; the model
    is evaluated at the first num_steps times, and the last step, 0.04 -> 0, adds no noise."""
    from samplers import euler_maruyama_sampler
    x, c = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    spy = TimeSpy(0.0)
    zeros = lambda a: torch.zeros_like(a)  # noqa: E731  no noise: the update is deterministic
    out, out_c = euler_maruyama_sampler(spy, x, torch.tensor([0, 1]), cls_latents=c, num_steps=5, randn_like=zeros)
    assert spy.times == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04], abs=1e-15)
    # linear path, v = 0: the score is -x/t and the drift v - g/2 s = t * x/t = x, so each step multiplies x
    # by (1 + dt): dt = -0.24 four times, then -0.04 to t = 0
    factor = 0.76 ** 4 * 0.96
    assert torch.allclose(out, x * factor, rtol=1e-12, atol=0) and torch.allclose(out_c, c * factor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("heun", [False, True])
def test_ode_time_grid_is_the_authors(heun):
    """REPA samplers.py euler_sampler: t_steps = linspace(1, 0, num_steps + 1); Heun's corrector is evaluated
    at t_next on every step but the last (which would need the model at t = 0)."""
    from samplers import euler_sampler
    x, c = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    spy = TimeSpy(1.0)
    out, out_c = euler_sampler(spy, x, torch.tensor([0, 1]), cls_latents=c, num_steps=4, heun=heun)
    expect = [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25] if heun else [1.0, 0.75, 0.5, 0.25]
    assert spy.times == expect
    assert torch.allclose(out, x - 1, rtol=0, atol=1e-15) and torch.allclose(out_c, c - 1, rtol=0, atol=1e-15)  # t: 1 -> 0
