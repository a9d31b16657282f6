"""train_loop.py's parts on their own: the FLOP count behind MFU, the EMA update, the step-indexed sampler
(exact resume) and --legacy label dropping. train.py end to end is in test_train.py."""
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
