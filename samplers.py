"""Samplers for REG: latents and the class token are generated jointly from pure noise
(docs/design.md#sampling; REG samplers.py).

Three samplers, all pure functions returning ``(latents, cls_token)``:

* ``euler_maruyama_sampler``: the reverse SDE used for every number in the REPA and REG papers.
* ``euler_sampler``: the probability-flow ODE, Euler or Heun.
* ``multistep_sampler``: the probability-flow ODE with DPM-Solver++(2M), a multistep second-order
  solver, and UniPC's corrector on top: one evaluation per step (docs/sampling.md).

``SAMPLER_MODES`` names them for the command lines (generate.py, sweep.py, train.py --eval-mode).

"The model" is any callable with the SiT forward signature
``model(x, t, y, cls_token=c) -> (velocity, zs, cls_velocity)``. ``cls_velocity`` is ``None``
for models without the class token (REPA/SiT checkpoints); then pass ``cls_latents=None`` and
``None`` comes back as the class token. A model whose forward takes ``return_projections``
(our SiT) is called with ``return_projections=False``: sampling never needs the REPA projections.

Conventions (shared with the loss through ``reg/interpolant.py``): t = 1 is noise, t = 0 is data,
x_t = alpha(t) x0 + sigma(t) eps. The sampler state is float64; the model runs in its own
dtype (the dtype of its parameters, or of ``latents`` for a parameter-free callable). The
label ``model.num_classes`` is the null label for classifier-free guidance (CFG). CFG runs the
conditional and unconditional halves in one batched forward, and only on steps whose current
time t satisfies ``guidance_low <= t <= guidance_high`` (and ``cfg_scale > 1``, as in REPA/REG); the
multistep solvers step onto the interval's ends instead (multistep_time_grid).

Randomness (SDE only) has one source: ``randn_like(x) -> eps``, a callable returning standard
normal noise shaped like ``x`` (EDM2's convention). The default is ``torch.randn_like`` (torch's
global generator). ``per_sample_randn_like(generators)`` builds one from N per-sample generators:
row i of every draw comes from ``generators[i]`` alone, so a sample's trajectory depends only
on its own generator and comes out the same whatever batch it is in. How generate.py, sweep.py and
train.py's FID seed those generators: docs/design.md#seeding.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from reg.interpolant import check_path_type, interpolant
from reg.utils import UserError

# SDE time grid: linspace(1, T_LAST, num_steps) followed by 0 (REG samplers.py, euler_maruyama_sampler).
T_LAST = 0.04
# --mode values: sde = euler_maruyama_sampler, ode = euler_sampler (Euler/Heun), and multistep_sampler:
# dpm2m = DPM-Solver++(2M), unipc = DPM-Solver++(2M) + UniPC's corrector (the better of the two).
SAMPLER_MODES = ("sde", "ode", "dpm2m", "unipc")

RandnLike = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Noise


def per_sample_randn_like(generators: Sequence[torch.Generator]) -> RandnLike:
    """A ``randn_like`` whose row i comes from ``generators[i]`` alone (drawn on that generator's
    device, then moved to x's): CPU generators thus give the same noise on any accelerator."""
    generators = list(generators)

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        if len(generators) != x.shape[0]:
            raise ValueError(f"got {len(generators)} per-sample generators for a batch of {x.shape[0]}")
        rows = [torch.randn(tuple(x.shape[1:]), generator=g, dtype=x.dtype, device=g.device) for g in generators]
        return torch.stack(rows).to(x.device)
    return randn_like


def _draw(randn_like: RandnLike, x: torch.Tensor) -> torch.Tensor:
    eps = randn_like(x)
    if eps.shape != x.shape:
        raise ValueError(f"randn_like returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    return eps.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# Model evaluation with batched classifier-free guidance


def model_dtype_of(model, default: torch.dtype) -> torch.dtype:
    """The dtype a model computes in: its first floating parameter's, else `default` (a parameter-free
    callable)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def _check_model(model, y: torch.Tensor, guided: bool) -> int | None:
    """Refuse a model in train mode (SiT drops labels at random there); return the null label."""
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError("the sampler got a model in train mode, where SiT drops labels at random; "
                         "call model.eval() first")
    if not guided:
        return None
    null_label = getattr(model, "num_classes", None)
    if null_label is None:
        raise ValueError("CFG needs the null label: the model must have a `num_classes` attribute")
    if bool((y == null_label).any()):
        raise ValueError(f"y contains the null label {null_label}; pass real class labels")
    return int(null_label)


def _accepts_return_projections(model) -> bool:
    """Whether model's forward takes return_projections (our SiT, also under torch.compile)."""
    forward = getattr(getattr(model, "_orig_mod", model), "forward", model)
    try:
        return "return_projections" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


Velocities = tuple  # (v, v_uncond, vc, vc_uncond) in float64; the uncond halves None when not guided
Forward = Callable[..., Velocities]


def _start(model, latents: torch.Tensor, y: torch.Tensor, cls_latents: torch.Tensor | None, *,
           num_steps: int, cfg_scale: float, cls_cfg_scale: float, guidance_low: float, guidance_high: float,
           path_type: str) -> tuple[Forward, torch.Tensor, torch.Tensor | None]:
    """The checks every sampler shares; returns the forward call and the float64 start state."""
    check_path_type(path_type)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if cfg_scale < 0 or cls_cfg_scale < 0:
        raise ValueError(f"guidance scales must be >= 0, got cfg_scale={cfg_scale}, cls_cfg_scale={cls_cfg_scale}")
    if guidance_low > guidance_high:
        raise ValueError(f"guidance_low {guidance_low} > guidance_high {guidance_high}: no step would be guided")
    null_label = _check_model(model, y, cfg_scale > 1.0)
    # Sampling never uses the REPA projections: skip them (about 1.7% of SiT-XL/2's FLOPs).
    extra = {"return_projections": False} if _accepts_return_projections(model) else {}
    dtype = model_dtype_of(model, latents.dtype)

    def forward(x: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor, t: float, *, guided: bool) -> Velocities:
        """One forward at time t; under CFG the cond and uncond halves share one batched call."""
        if guided:
            x_in = torch.cat([x, x])
            c_in = None if c is None else torch.cat([c, c])
            y_in = torch.cat([y, torch.full_like(y, null_label)])
        else:
            x_in, c_in, y_in = x, c, y
        t_in = torch.full((x_in.shape[0],), t, dtype=dtype, device=x.device)
        out = model(x_in.to(dtype), t_in, y_in, cls_token=None if c_in is None else c_in.to(dtype), **extra)
        v, vc = out[0].to(torch.float64), out[2]
        if c is None and vc is not None:
            raise ValueError("the model predicts a class token but cls_latents is None; "
                             "draw cls_latents ~ N(0, I) of shape (N, model.cls_dim)")
        if c is not None and vc is None:
            raise ValueError("cls_latents were given but the model returned no class-token velocity "
                             "(a model built with use_cls_token=False); pass cls_latents=None")
        vc = None if vc is None else vc.to(torch.float64)
        if not guided:
            return v, None, vc, None
        v, v_u = v.chunk(2)
        vc, vc_u = (None, None) if vc is None else vc.chunk(2)
        return v, v_u, vc, vc_u

    c = None if cls_latents is None else cls_latents.to(torch.float64)
    return forward, latents.to(torch.float64), c


def _cfg(cond: torch.Tensor | None, uncond: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """uncond + scale (cond - uncond), for the latents and the class token alike.

    The conditional term alone outside guided steps (uncond None) and for scale <= 0: REG guides
    the class token with cls_cfg_scale only if it is > 0 (REG samplers.py, euler_maruyama_sampler).
    """
    if cond is None or uncond is None or scale <= 0:
        return cond
    return uncond + scale * (cond - uncond)


def _guided_velocity(forward: Forward, y: torch.Tensor, cfg_scale: float, cls_cfg_scale: float):
    """The ODE samplers' velocity call: (x, c, t, guided) -> the guided (v, vc) (CFG on the velocity)."""

    def velocity(x: torch.Tensor, c: torch.Tensor | None, t: float, guided: bool):
        v, v_u, vc, vc_u = forward(x, c, y, t, guided=guided)
        return _cfg(v, v_u, cfg_scale), _cfg(vc, vc_u, cls_cfg_scale)
    return velocity


def _in_interval(t: float, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    return cfg_scale > 1.0 and guidance_low <= t <= guidance_high


# ----------------------------------------------------------------------------------------------
# SDE


def diffusion_coefficient(t: torch.Tensor | float):
    """g(t) = 2t (REPA/REG), the *variance* rate of the reverse SDE: noise is sqrt(g |dt|) eps."""
    return 2 * t


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        path_type: str = "linear") -> torch.Tensor:
    """Score of p_t from the velocity: s = (a/a' v - x) / (sigma^2 - a/a' sigma' sigma).

    Follows from v = a' E[x0|x] + sigma' E[eps|x] and x = a E[x0|x] + sigma E[eps|x] with
    s = -E[eps|x] / sigma. For the linear path: s = -((1-t) v + x) / t. Needs a' != 0, which
    holds on the SDE grid (t >= 0.04) for both paths.
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)


def _sde_drift(v: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor, path_type: str):
    """Reverse-SDE drift d = v - g/2 s, integrated with dt < 0 (docs/design.md#sampling)."""
    if v is None:
        return None
    return v - 0.5 * diffusion_coefficient(t) * score_from_velocity(v, x, t, path_type)


@torch.no_grad()
def euler_maruyama_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    *,
    cls_latents: torch.Tensor | None = None,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    cls_cfg_scale: float = 0.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    randn_like: RandnLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler-Maruyama on the reverse SDE, jointly for the latents and the class token.

    Time grid linspace(1, 0.04, num_steps) then 0: num_steps model evaluations (twice the batch
    on guided steps). Each of the first num_steps - 1 steps is
        x <- x + d dt + sqrt(g(t)) sqrt(|dt|) eps,   d = v - g/2 s,   g(t) = 2t,
    and the last one, 0.04 -> 0, is the deterministic mean step x <- x + d dt (as in REPA).
    CFG acts on the drift: d = d_u + cfg_scale (d_c - d_u); the class token uses cls_cfg_scale
    if > 0, else its conditional drift. The class token gets its own noise.

    latents: (N, C, H, W) initial noise; cls_latents: (N, z) initial noise or None; y: (N,)
    labels. Returns the final (latents, cls_token) in the dtypes of the inputs (cls_token None
    if cls_latents is None). ``randn_like`` is the noise source (see the module docstring).
    """
    randn_like = randn_like or torch.randn_like
    forward, x, c = _start(model, latents, y, cls_latents, num_steps=num_steps, cfg_scale=cfg_scale,
                           cls_cfg_scale=cls_cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
                           path_type=path_type)

    t_steps = torch.cat([torch.linspace(1.0, T_LAST, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        guided = _in_interval(float(t_cur), cfg_scale, guidance_low, guidance_high)
        v, v_u, vc, vc_u = forward(x, c, y, float(t_cur), guided=guided)
        # Drifts are affine in v with the same coefficients for both halves (same x and t),
        # so guiding the drift equals guiding the velocity; we guide the drift as REG does.
        d = _cfg(_sde_drift(v, x, t_cur, path_type), _sde_drift(v_u, x, t_cur, path_type), cfg_scale)
        dc = _cfg(_sde_drift(vc, c, t_cur, path_type), _sde_drift(vc_u, c, t_cur, path_type), cls_cfg_scale)
        last = i == num_steps - 1
        if last:  # deterministic mean step to t = 0
            x = x + d * dt
            c = None if c is None else c + dc * dt
            break
        # Draw latent noise before class-token noise: per-sample streams rely on this order.
        noise_scale = torch.sqrt(diffusion_coefficient(t_cur)) * torch.sqrt(dt.abs())
        eps = _draw(randn_like, x)
        eps_c = None if c is None else _draw(randn_like, c)
        x = x + d * dt + noise_scale * eps
        c = None if c is None else c + dc * dt + noise_scale * eps_c

    return x.to(latents.dtype), None if c is None else c.to(cls_latents.dtype)


# ----------------------------------------------------------------------------------------------
# ODE


@torch.no_grad()
def euler_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    *,
    cls_latents: torch.Tensor | None = None,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    cls_cfg_scale: float = 0.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    heun: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probability-flow ODE dx/dt = v, Euler or Heun, jointly for latents and class token.

    Time grid linspace(1, 0, num_steps + 1). Guidance acts on the velocity. Heun adds the
    trapezoidal corrector (evaluated at t_next) on every step except the last, which would need
    the model at t = 0; so Heun costs 2 num_steps - 1 evaluations. As in REPA, whether a step
    is guided is decided by its start time t_cur, for the predictor and corrector alike.
    The path only enters through the model: the ODE update itself is path-agnostic.
    Returns (latents, cls_token) as ``euler_maruyama_sampler`` does; it draws no randomness.
    """
    forward, x, c = _start(model, latents, y, cls_latents, num_steps=num_steps, cfg_scale=cfg_scale,
                           cls_cfg_scale=cls_cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
                           path_type=path_type)

    velocity = _guided_velocity(forward, y, cfg_scale, cls_cfg_scale)
    t_steps = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    for i in range(num_steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        dt = t_next - t_cur
        guided = _in_interval(t_cur, cfg_scale, guidance_low, guidance_high)
        v, vc = velocity(x, c, t_cur, guided)
        x_next = x + dt * v
        c_next = None if c is None else c + dt * vc
        if heun and i < num_steps - 1:
            v2, vc2 = velocity(x_next, c_next, t_next, guided)
            x_next = x + dt * 0.5 * (v + v2)
            c_next = None if c is None else c + dt * 0.5 * (vc + vc2)
        x, c = x_next, c_next

    return x.to(latents.dtype), None if c is None else c.to(cls_latents.dtype)


# ----------------------------------------------------------------------------------------------
# Multistep ODE solvers in the data prediction: DPM-Solver++(2M) and UniPC


def data_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str = "linear") -> torch.Tensor:
    """E[x0 | x_t] from the velocity: x0 = (sigma' x - sigma v) / (sigma' alpha - sigma alpha').

    Follows from x = alpha x0 + sigma eps and v = alpha' x0 + sigma' eps. The denominator is
    pi/2 for the cosine path and 1 for the linear one (x0 = x - t v), never 0.
    """
    alpha, sigma, d_alpha, d_sigma = (float(q) for q in interpolant(torch.tensor(t, dtype=torch.float64), path_type))
    return (d_sigma * x - sigma * v) / (d_sigma * alpha - sigma * d_alpha)


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma): -inf at t = 1 (alpha = 0), +inf at t = 0 (sigma = 0)."""
    if alpha <= 0:
        return -math.inf
    return math.inf if sigma <= 0 else math.log(alpha / sigma)


def _both(fn, *states):
    """fn applied to the latents of (latents, cls_token) pairs, then to the class tokens (None stays None)."""
    return fn(*(s[0] for s in states)), None if states[0][1] is None else fn(*(s[1] for s in states))


def _unic_weights(h: float, r: float | None) -> tuple[float, float]:
    """UniC's weights (B(h) = e^h - 1, "bh2") of D1 = (D_prev - D_s) / r and of D_t - D_s.

    r = (lambda_prev - lambda_s) / h < 0. Without a usable previous point (r None) the corrector
    is the trapezoid, weight 1/2 on D_t - D_s. Otherwise the weights solve UniPC's order
    conditions [[1, 1], [r, 1]] rho = b (Zhao et al. 2023, arXiv 2302.04867, Alg. 2 / diffusers).
    """
    if r is None:
        return 0.0, 0.5
    hh = -h
    b_h = math.expm1(hh)
    phi = b_h / hh - 1
    b1 = phi / b_h
    b2 = 2 * (phi / hh - 0.5) / b_h
    rho_prev = (b1 - b2) / (1 - r)
    return rho_prev, b1 - rho_prev


def multistep_time_grid(num_steps: int, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                        guidance_high: float = 1.0) -> torch.Tensor:
    """The multistep solvers' time grid, (num_steps + 1,) float64 from 1 to 0.

    Without a guidance interval inside (0, 1) (cfg_scale <= 1, or guidance_low <= 0 and guidance_high >= 1)
    it is euler_sampler's linspace(1, 0, num_steps + 1). Otherwise guidance switches on or off at
    guidance_high and guidance_low, and the field the ODE follows jumps there: the grid then steps onto
    each switch time, uniform on each piece between them, with the piece ending at switch s taking
    round(num_steps (1 - s)) steps in all (at least one per piece). When a switch time lies on the
    uniform grid (0.85 at a multiple of 20 steps), the grid is the uniform one up to rounding.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    switches = [] if cfg_scale <= 1.0 else sorted({t for t in (guidance_high, guidance_low) if 0.0 < t < 1.0},
                                                  reverse=True)
    if not switches:
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if num_steps < len(switches) + 1:  # a UserError: the entry points print it as one line
        raise UserError(f"the guidance interval [{guidance_low}, {guidance_high}] cuts (0, 1) into "
                        f"{len(switches) + 1} pieces and the multistep solvers step onto each switch: "
                        f"num_steps (--num-steps) must be >= {len(switches) + 1}, got {num_steps}")
    ends, pieces = [0], [1.0, *switches, 0.0]
    for j, s in enumerate(switches):  # steps from t = 1 to switch j, strictly increasing, leaving one per piece
        ends.append(min(max(round(num_steps * (1.0 - s)), ends[-1] + 1), num_steps - (len(switches) - j)))
    ends.append(num_steps)
    grid = [torch.linspace(pieces[j], pieces[j + 1], ends[j + 1] - ends[j] + 1, dtype=torch.float64)[:-1]
            for j in range(len(pieces) - 1)]
    return torch.cat([*grid, torch.zeros(1, dtype=torch.float64)])


def _guided_steps(t_steps: torch.Tensor, cfg_scale: float, guidance_low: float, guidance_high: float) -> list[bool]:
    """Whether each step of the grid follows the guided field: its midpoint decides, so that a step that
    ends (or starts) on a switch time is on its own side of it."""
    return [_in_interval(0.5 * (a + b), cfg_scale, guidance_low, guidance_high)
            for a, b in zip(t_steps[:-1].tolist(), t_steps[1:].tolist())]


@torch.no_grad()
def multistep_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    *,
    cls_latents: torch.Tensor | None = None,
    num_steps: int = 20,
    cfg_scale: float = 1.0,
    cls_cfg_scale: float = 0.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    corrector: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probability-flow ODE with DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), plus UniPC's
    corrector UniC when `corrector` (UniPC-2 with B(h) = e^h - 1), jointly for latents and class
    token: num_steps evaluations either way (twice the batch on guided ones); docs/sampling.md.

    The velocity (guided as in euler_sampler) gives the data prediction D = E[x0 | x_t]
    (data_from_velocity). With lambda = log(alpha / sigma), h = lambda_t - lambda_s, a step s -> t is
        x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) D',
        predictor D' = D_s + (D_s - D_prev) / (2 r'),   r' = (lambda_s - lambda_prev) / h,
    exact when D is linear in lambda; the coefficients stay finite at alpha_s = 0 (t = 1) and
    sigma_t = 0 (t = 0). The corrector recomputes x_t with D' = D_s + weights on (D_prev, D_t), D_t
    being the evaluation at the predicted x_t that the next step needs anyway (not redone at the
    corrected point). First order (DDIM) where the previous point is t = 1 (lambda = -inf) and on the
    last step to t = 0, which has no corrector (DPM-Solver++'s lower_order_final).

    Guidance: a step follows the guided field iff cfg_scale > 1 and guidance_low <= t <= guidance_high on
    it. The grid (multistep_time_grid) steps onto each switch time and the history restarts there, so the
    jump in the field costs no order; one guided forward at a switch gives both fields (its conditional
    half is the unguided one). Returns (latents, cls_token) as the other samplers; draws no randomness.
    """
    forward, x, c = _start(model, latents, y, cls_latents, num_steps=num_steps, cfg_scale=cfg_scale,
                           cls_cfg_scale=cls_cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
                           path_type=path_type)

    def data(state, t: float, fields: set[bool]) -> dict[bool, tuple]:
        """D under each field asked for (True: guided, False: conditional only), from one forward."""
        v, v_u, vc, vc_u = forward(state[0], state[1], y, t, guided=True in fields)
        out = {}
        for guided in fields:
            vel = (_cfg(v, v_u, cfg_scale), _cfg(vc, vc_u, cls_cfg_scale)) if guided else (v, vc)
            out[guided] = _both(lambda v_, x_: data_from_velocity(v_, x_, t, path_type), vel, state)
        return out

    t_steps = multistep_time_grid(num_steps, cfg_scale, guidance_low, guidance_high)
    guided = _guided_steps(t_steps, cfg_scale, guidance_low, guidance_high)
    alphas, sigmas, _, _ = interpolant(t_steps, path_type)
    alphas = torch.where(t_steps == 1.0, 0.0, alphas)  # the cosine path's cos(pi/2) is 6e-17, not 0
    lams = [_log_snr(a, s) for a, s in zip(alphas.tolist(), sigmas.tolist())]
    state = (x, c)
    d_cur, d_prev, lam_prev = data(state, 1.0, {guided[0]})[guided[0]], None, -math.inf
    for i in range(num_steps):
        a_s, s_s, a_t, s_t = (float(q) for q in (alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]))
        h = lams[i + 1] - lams[i]
        ratio, w = s_t / s_s, a_t - a_s * s_t / s_s  # w = alpha_t (1 - e^-h)
        r = (lam_prev - lams[i]) / h if math.isfinite(lam_prev) and math.isfinite(h) else None
        d1 = None if r is None else _both(lambda p, d: (p - d) / r, d_prev, d_cur)
        d_hat = d_cur if r is None else _both(lambda d, e: d + 0.5 * e, d_cur, d1)
        predicted = _both(lambda s_, d: ratio * s_ + w * d, state, d_hat)
        if i == num_steps - 1:  # the last step ends at t = 0: no evaluation there to correct with
            state = predicted
            break
        g, g_next = guided[i], guided[i + 1]
        d_at_next = data(predicted, float(t_steps[i + 1]), {g_next, g} if corrector else {g_next})
        if corrector:
            rho_prev, rho_next = _unic_weights(h, r)
            d_hat = _both(lambda d, n: d + rho_next * (n - d), d_cur, d_at_next[g])  # D_t of this step's field
            if r is not None:
                d_hat = _both(lambda d, e: d + rho_prev * e, d_hat, d1)
            predicted = _both(lambda s_, d: ratio * s_ + w * d, state, d_hat)
        # At a switch the next step's history would be in the other field: restart it (first order).
        d_prev, lam_prev = (None, -math.inf) if g_next != g else (d_cur, lams[i])
        state, d_cur = predicted, d_at_next[g_next]

    x, c = state
    return x.to(latents.dtype), None if c is None else c.to(cls_latents.dtype)
