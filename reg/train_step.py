"""One REG optimisation step and what makes it exactly resumable; train.py runs the loop around it.

- `StepSampler`: the data order as a function of (seed, step), so a resumed run reads the same batches;
- `step_seed`: the per-step reseeding (EDM2's way) that makes resume exact without saved RNG states;
- `make_optimizer`, `ema_update`, `train_step`: one optimisation step (loss, backward, clip, the finite
  check, AdamW, EMA), the function train.py runs and benchmarks/run.py times.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import Sampler

from loss import encoder_targets, reg_loss, sample_latents
from models.vae import SD_VAE_SCALING_FACTOR

# ----------------------------------------------------------------------------- data order and randomness


class StepSampler(Sampler):
    """Deterministic sharded order: epoch e is a permutation seeded by (seed, e); rank r takes its slice
    of every global batch. It starts at a given micro-batch, so the data position follows from the step
    alone and a resumed run reads exactly the batches the uninterrupted run would have."""

    def __init__(self, n: int, *, local_batch: int, rank: int, world: int, seed: int, start_batch: int = 0):
        self.n, self.local_batch, self.rank, self.world, self.seed = n, local_batch, rank, world, seed
        self.batches_per_epoch = n // (local_batch * world)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch ({local_batch * world})")
        self.start_batch = start_batch

    def __iter__(self):
        b = self.start_batch
        while True:
            epoch, offset = divmod(b, self.batches_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            step = self.local_batch * self.world
            for j in range(offset, self.batches_per_epoch):
                chunk = perm[j * step:(j + 1) * step][self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
                yield from chunk.tolist()
            b = (epoch + 1) * self.batches_per_epoch


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (seed, rank, step). Reseeding every step from it (as EDM2's training loop does)
    makes step k's draws (time, noise, posterior sample, label dropout) the same whether or not the run
    was interrupted before it, with nothing to save."""
    digest = hashlib.sha256(f"reg-train/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- optimiser and EMA

ADAMW_IMPLS = ("fused", "foreach", "for-loop")


def make_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
                   weight_decay: float, eps: float, impl: str = "fused") -> torch.optim.AdamW:
    """AdamW over every parameter, as the original does (frozen ones, such as pos_embed, get no gradient
    and are skipped by the update, but keep their slot, so the original's optimizer state loads as is).

    impl: "fused" (one kernel per step; fastest on GPU and on CPU: 0.05 s against 0.17 s foreach and
    0.21 s for-loop for SiT-B/2 on 2 cores), "foreach", or "for-loop" (the original's CPU default).
    """
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"AdamW implementation must be one of {ADAMW_IMPLS}, got {impl!r}")
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                             fused=impl == "fused", foreach=impl == "foreach")


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float,
               lerp: bool = False) -> None:
    """ema = decay * ema + (1 - decay) * p for every tensor, in two multi-tensor kernels; the same
    arithmetic as the original's per-name loop (REG train.py `update_ema`), so the result is identical.

    lerp=True (train.py --ema-lerp): ema += (1 - decay) (p - ema) in one kernel (one read of the EMA
    less). Not bitwise the original's: a rounding difference of about one ulp of the EMA per step."""
    if lerp:
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        return
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


@torch.no_grad()
def ema_update_masked(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float,
                      finite: torch.Tensor, lerp: bool = False) -> None:
    """ema_update that leaves the EMA as it is where `finite` (a 0-d bool on the device) is False, with no
    host sync (train.py --device-skip). On a finite step the result is bitwise ema_update's on CPU (pinned
    by tests/test_speed.py): the same float32 decay, and the increment (1 - decay) p as an addcmul with the
    factor broadcast from a 0-d tensor ((1 - decay) or 0)."""
    dtype = ema_params[0].dtype
    if lerp:
        weight = torch.where(finite, 1 - decay, 0.0).to(dtype)  # lerp by 0 leaves the EMA as it is
        torch._foreach_lerp_(ema_params, params, [weight.expand_as(p) for p in params])
        return
    keep = torch.where(finite, decay, 1.0).to(dtype)  # (,)
    step = torch.where(finite, 1 - decay, 0.0).to(dtype)  # (,)
    torch._foreach_mul_(ema_params, keep)
    torch._foreach_addcmul_(ema_params, params, [step.expand_as(p) for p in params])


# ----------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepConfig:
    """What the loss and the update need from the command line."""
    path_type: str = "linear"
    weighting: str = "uniform"
    prediction: str = "v"
    proj_coeff: float = 0.5
    cls_coeff: float = 0.03
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    latents_scale: float = SD_VAE_SCALING_FACTOR
    use_cls: bool = True        # REG's class token (False: REPA / SiT)
    use_proj: bool = True       # the alignment term (False: plain SiT)
    num_classes: int = 1000
    legacy_drop_prob: float = 0.0  # REPA's --legacy: labels dropped once more before the model's own dropout
    device_skip: bool = False   # decide the skip of a non-finite step on the device (no host sync; fused AdamW)
    ema_lerp: bool = False      # EMA as one lerp kernel (not bitwise the original's; see ema_update)


# The five numbers a step reports, in this order (summed on the device, read once per log interval).
STEP_TERMS = ("loss", "loss_denoise", "loss_proj", "loss_cls", "grad_norm")


def fused_step_unless(opt: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """opt.step() that changes nothing (parameters, moments, step count) where `finite` is False, decided
    on the device: fused AdamW's `found_inf` input (the one GradScaler uses), which the kernel reads
    itself. On a finite step the update is bitwise opt.step()'s."""
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not inner.defaults.get("fused"):
        raise ValueError("the device-side skip needs the fused AdamW (--adamw fused)")
    inner.found_inf = (~finite).to(torch.float32)  # (,): 1.0 = skip
    try:
        opt.step()
    finally:
        del inner.found_inf


@dataclass
class StepResult:
    terms: torch.Tensor  # (5,) float32 on the device: STEP_TERMS of the last micro-batch, grad norm
    finite: bool | torch.Tensor  # False: the update was skipped (non-finite loss or gradient on some rank);
                                 # a 0-d bool on the device with StepConfig.device_skip (read at the log interval)


def train_step(micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, model: Callable,
               params: list[torch.Tensor], ema_params: list[torch.Tensor], opt: torch.optim.Optimizer,
               encoders: Sequence[torch.nn.Module], accelerator, step_cfg: StepConfig) -> StepResult:
    """One optimisation step over `gradient_accumulation_steps` micro-batches (raw uint8 images, VAE
    moments, labels, already on the device).

    `model` is what runs the forward (DDP-wrapped and/or compiled), `params`/`ema_params` the plain
    module's parameters and the EMA's. One host sync: the finite check on the clipped gradient norm,
    which is all-reduced, so every rank skips a bad step alike. Under fp16 the GradScaler skips
    overflowing steps itself (and lowers its scale).
    """
    device = params[0].device
    zero = torch.zeros((), device=device)
    grad_norm, finite, out = zero, True, None
    for images, moments, labels in micro_batches:
        with accelerator.accumulate(model):
            x0 = sample_latents(moments, scale=step_cfg.latents_scale)  # (N, C, H, W)
            if step_cfg.legacy_drop_prob > 0:  # REG train.py L279-284
                drop = torch.rand(labels.shape[0], device=labels.device) < step_cfg.legacy_drop_prob
                labels = torch.where(drop, step_cfg.num_classes, labels)
            zs_target, cls_target = [], None
            if encoders:
                with accelerator.autocast():
                    zs_target, cls_target = encoder_targets(encoders, images)  # [(N, 1+T, z)], (N, Z)
                zs_target = [z.float() for z in zs_target] if step_cfg.use_proj else []
                cls_target = cls_target.float() if step_cfg.use_cls else None
            with accelerator.autocast():
                out = reg_loss(model, x0, labels, cls_target=cls_target, zs_target=zs_target,
                               path_type=step_cfg.path_type, weighting=step_cfg.weighting,
                               prediction=step_cfg.prediction, proj_coeff=step_cfg.proj_coeff,
                               cls_coeff=step_cfg.cls_coeff)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(params, step_cfg.max_grad_norm)
                if step_cfg.device_skip:
                    finite = torch.isfinite(grad_norm)  # (,) bool, the same on every rank: no host sync
                    fused_step_unless(opt, finite)
                else:
                    finite = bool(torch.isfinite(grad_norm))  # the step's one host sync
                    if finite or accelerator.scaler is not None:
                        opt.step()
            opt.zero_grad(set_to_none=True)
    if isinstance(finite, torch.Tensor):
        ema_update_masked(ema_params, params, step_cfg.ema_decay, finite, lerp=step_cfg.ema_lerp)
    elif finite:
        ema_update(ema_params, params, step_cfg.ema_decay, lerp=step_cfg.ema_lerp)
    terms = torch.stack([out.loss.detach().float(), out.denoise.detach().mean(),
                         out.proj.detach().mean() if out.proj is not None else zero,
                         out.cls.detach().mean() if out.cls is not None else zero,
                         torch.as_tensor(grad_norm, device=device).float()])
    return StepResult(terms=terms, finite=finite)
