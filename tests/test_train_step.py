"""The training step's parts on their own (reg/train_step.py, reg/throughput.py): the FLOP count behind MFU,
the EMA update, the step-indexed sampler (exact resume), --legacy label dropping and the fp16 GradScaler
path of the step. train.py end to end is in test_train.py."""
import pytest
import torch

from reg import throughput, train_step


def test_flops_per_image_on_meta_equal_a_real_count():
    """The meta-device count (no memory, no time) equals FlopCounterMode on real tensors: the SiT forward and
    backward of one image plus the frozen encoder's forward. (On meta, attention runs as its matmuls; the
    real count does the same through the math backend, as CPU's fused kernel has no FLOP formula.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from models.encoders import load_encoders
    from models.sit import SiT_models

    with pytest.warns(UserWarning, match="RANDOM"):
        encoders = load_encoders("dinov2-vit-s", weights="random", resolution=32)
    model = SiT_models["SiT-T/2"](input_size=4, in_channels=8, num_classes=4, z_dims=[384], encoder_depth=2,
                                  projector_dim=64, cls_token_dim=384).train()
    got = throughput.training_flops_per_image(model, encoders, cls_dim=384, resolution=32)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        v, zs, v_cls = model(torch.randn(1, 8, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long),
                             cls_token=torch.randn(1, 384))
        (v.sum() + sum(z.sum() for z in zs) + v_cls.sum()).backward()
        encoders[0](torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert got == counter.get_total_flops() > 0


def test_ema_foreach_equals_plain_formula():
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7)]
    ema = [torch.randn(5, 3), torch.randn(7)]
    want = [e.clone() for e in ema]
    for e, p in zip(want, params):
        e.mul_(0.9999).add_(p, alpha=1 - 0.9999)  # the original's per-name loop
    train_step.ema_update(ema, params, 0.9999)
    assert all(torch.equal(a, b) for a, b in zip(ema, want))


def test_step_sampler_resumes_at_the_same_position():
    full = train_step.StepSampler(40, local_batch=4, rank=1, world=2, seed=3)
    it = iter(full)
    seq = [next(it) for _ in range(4 * 12)]  # 12 batches: crosses the 5-batch epoch boundary twice
    resumed = train_step.StepSampler(40, local_batch=4, rank=1, world=2, seed=3, start_batch=7)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(4 * 5)] == seq[4 * 7:]
    other = iter(train_step.StepSampler(40, local_batch=4, rank=0, world=2, seed=3))
    first_epoch = set(seq[:20]) | {next(other) for _ in range(20)}
    assert first_epoch == set(range(40))  # the two ranks split each epoch without overlap


def test_legacy_drops_labels_before_the_model(fresh_accelerate_state):
    """--legacy (REG train.py L279-284): labels are replaced by the null class with p = cfg_prob before the
    forward, on top of the model's own dropout."""
    from accelerate import Accelerator
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, y, cls_token=None):
            seen.append(y.clone())
            return x * self.w, [], None

    probe = Probe()
    params = list(probe.parameters())
    opt = train_step.make_optimizer(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0, eps=1e-8)
    batch = (torch.zeros(64, 3, 16, 16, dtype=torch.uint8), torch.zeros(64, 8, 2, 2), torch.zeros(64, dtype=torch.long))
    for p in (0.0, 1.0, 0.5):
        step_cfg = train_step.StepConfig(use_cls=False, use_proj=False, num_classes=7, legacy_drop_prob=p)
        torch.manual_seed(0)
        train_step.train_step([batch], model=probe, params=params, ema_params=[params[0].detach().clone()], opt=opt,
                            encoders=[], accelerator=Accelerator(cpu=True), step_cfg=step_cfg)
    none, all_, half = (s.eq(7).float().mean().item() for s in seen)
    assert none == 0 and all_ == 1 and 0.2 < half < 0.8


# ----------------------------------------------------------------------------- the fp16 GradScaler path

def _fp16_step(scaler, state: dict, seed: int = 0):
    """One reg.train_step.train_step of a tiny plain SiT under fp16 autocast with `scaler`. accelerate makes neither
    the autocast nor the GradScaler on a CPU (Accelerator(mixed_precision="fp16", cpu=True) has scaler None
    and native_amp False), so both are switched on by hand: the objects then take the path they take on a GPU
    (scaled backward, unscale before clipping, scaler.step and scaler.update through the prepared optimizer)."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from models.sit import SiT
    from reg.train_step import StepConfig, make_optimizer, train_step
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.native_amp, acc.scaler = True, scaler
    model = SiT(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=4, z_dims=[],
                encoder_depth=1, use_cls_token=False)
    model.load_state_dict(state)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    ddp_model, opt = acc.prepare(model, opt)
    grads = {}  # the gradients the optimizer applies (unscaled, clipped), read as its step starts
    opt.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    g = torch.Generator().manual_seed(seed)
    batch = (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.randn(4, 8, 8, 8, generator=g), torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(seed)
    result = train_step([batch], model=ddp_model, params=list(model.parameters()), ema_params=list(ema.parameters()),
                        opt=opt, encoders=[], accelerator=acc,
                        step_cfg=StepConfig(use_cls=False, use_proj=False, num_classes=4, latents_scale=1.0))
    return result, model.state_dict(), ema.state_dict(), grads


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fp16_grad_scaler_skips_overflowing_steps_and_otherwise_equals_the_unscaled_step():
    from models.sit import SiT
    torch.manual_seed(0)
    model = SiT(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=4, z_dims=[],
                encoder_depth=1, use_cls_token=False)
    for p in model.parameters():  # away from adaLN-Zero's zeros, so every parameter gets a gradient
        p.data.normal_(0, 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k for k, p in model.named_parameters() if p.requires_grad}

    # an overflowing step (a scale of 2^40 overflows fp16 gradients): skipped, EMA untouched, scale halved
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    result, after, ema, _ = _fp16_step(scaler, state)
    assert not result.finite and not torch.isfinite(result.terms[4])
    assert all(torch.equal(after[k], state[k]) and torch.equal(ema[k], state[k]) for k in state)
    assert scaler.get_scale() == 2.0 ** 39

    # a normal step: the scaled backward, unscaled before clipping, applies the gradients of no scaling at all
    # (up to fp16 underflow, which the scale exists to avoid) and updates every trained tensor and the EMA
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    result, after, ema, grads = _fp16_step(scaler, state)
    reference, _, _, ref_grads = _fp16_step(torch.amp.GradScaler("cpu", enabled=False), state)
    assert result.finite and reference.finite and scaler.get_scale() == 2.0 ** 8
    assert torch.allclose(result.terms, reference.terms, rtol=1e-4, atol=0)  # the losses and the grad norm
    assert set(grads) == set(ref_grads) == trained
    for k in trained:
        assert (grads[k] - ref_grads[k]).norm() < 1e-2 * ref_grads[k].norm(), k  # fp16 rounding: < 0.2%
        assert not torch.equal(after[k], state[k]) and not torch.equal(ema[k], state[k]), k
