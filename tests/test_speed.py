"""The step speed-ups of docs/performance.md against today's step: the split attention (fp64, forward and
backward), the device-side skip of a non-finite step (bitwise), the masked and lerp EMA. The two-process
DDP variants are in test_train.py::test_two_process_cpu_launch_and_ddp_speed_variants."""
import pytest
import torch

from models.sit import SiT
from reg import throughput, train_step

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            num_classes=10, z_dims=[32], encoder_depth=1, projector_dim=48)


def _forward_backward(model, x, t, y, c):
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    v, zs, v_cls = model(x, t, y, cls_token=c)
    (v.square().sum() + zs[0].sin().sum() + v_cls.square().sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return (v, zs[0], v_cls), grads, (x.grad, c.grad)


def test_split_attention_equals_plain_in_fp64(monkeypatch):
    torch.manual_seed(0)
    model = SiT(**TINY).double().train()
    for p in model.parameters():  # away from the zero init, so every branch carries signal
        p.data.normal_(0, 0.2)
    model.y_embedder.dropout_prob = 0.0
    x, t, y, c = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64), \
        torch.tensor([1, 2, 3]), torch.randn(3, 32, dtype=torch.float64)
    keys = list(model.state_dict())
    ref_out, ref_grads, ref_in = _forward_backward(model, x, t, y, c)

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((q.shape[2], k.shape[2])) or sdpa(q, k, v, **kw))
    model.attn_split = True
    assert model.attn_split and list(model.state_dict()) == keys  # a runtime switch, no new key
    out, grads, inputs = _forward_backward(model, x, t, y, c)
    assert calls == [(1, 17), (16, 17)] * TINY["depth"]  # the class-token row alone, then the 16 patch rows
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert max(rel(a, b) for a, b in zip(out + inputs, ref_out + ref_in)) < 1e-12
    assert grads.keys() == ref_grads.keys() and any("attn.qkv.weight" in k for k in grads)
    assert max(rel(grads[k], ref_grads[k]) for k in grads) < 1e-12
    SiT(**TINY).load_state_dict(model.state_dict())  # strict load both ways
    model.load_state_dict(SiT(**TINY).double().state_dict())
    # without the class token the switch does nothing (no row to split off)
    repa = SiT(**{**TINY, "use_cls_token": False})
    repa.attn_split = True
    assert not repa.attn_split


@pytest.mark.parametrize("lerp", [False, True])
def test_masked_ema_is_the_ema_update_or_nothing(lerp):
    torch.manual_seed(0)
    params = [torch.randn(300, 7), torch.randn(11)]
    ema = [torch.randn(300, 7), torch.randn(11)]
    want = [e.clone() for e in ema]
    train_step.ema_update(want, params, 0.9999, lerp=lerp)
    got = [e.clone() for e in ema]
    train_step.ema_update_masked(got, params, 0.9999, torch.tensor(True), lerp=lerp)
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # bitwise on a finite step
    kept = [e.clone() for e in ema]
    train_step.ema_update_masked(kept, params, 0.9999, torch.tensor(False), lerp=lerp)
    assert all(torch.equal(a, b) for a, b in zip(kept, ema))  # a skipped step leaves the EMA alone


def test_ema_lerp_is_the_original_formula_up_to_rounding():
    torch.manual_seed(0)
    params, ema = [torch.randn(1000, 9)], [torch.randn(1000, 9)]
    a, b = [ema[0].clone()], [ema[0].clone()]
    for _ in range(50):
        train_step.ema_update(a, params, 0.9999)
        train_step.ema_update(b, params, 0.9999, lerp=True)
    # rounding only: about one float32 ulp (2.4e-7 at |ema| ~ 3) per step at most, against a change of the
    # EMA of 1e-4 |p - ema| per step
    assert (a[0] - b[0]).abs().max() < 50 * 2.4e-7
    assert not torch.equal(a[0], b[0])  # documented as not bitwise: if it becomes so, make it the default


def _tiny_run(device_skip: bool, ema_lerp: bool = False):
    """Four steps of train_step on a tiny SiT (no encoder), the third with a NaN latent batch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    model = SiT(**{**TINY, "z_dims": [], "use_cls_token": False}).train()
    ema = SiT(**{**TINY, "z_dims": [], "use_cls_token": False}).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    acc = Accelerator(cpu=True)
    opt = train_step.make_optimizer(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    ddp_model, opt = acc.prepare(model, opt)
    step_cfg = train_step.StepConfig(use_cls=False, use_proj=False, num_classes=10, device_skip=device_skip,
                                   ema_lerp=ema_lerp, ema_decay=0.9, max_grad_norm=0.5)
    meter = throughput.Meter(acc, images_per_step=4, flops_per_image=1.0, peak=None, proj_coeff=0, cls_coeff=0, step=0)
    finites = []
    for step in range(4):
        torch.manual_seed(100 + step)
        moments = torch.randn(4, 8, 8, 8)
        if step == 2:
            moments[1] = float("nan")
        batch = (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), moments, torch.randint(0, 10, (4,)))
        result = train_step.train_step([batch], model=ddp_model, params=list(model.parameters()),
                                     ema_params=list(ema.parameters()), opt=opt, encoders=[], accelerator=acc, step_cfg=step_cfg)
        meter.add(result.terms, result.finite)
        finites.append(result.finite)
    record = meter.flush(4, 1e-2)
    return model.state_dict(), ema.state_dict(), opt.state_dict(), record, meter, finites


def test_device_skip_equals_the_host_skip_bitwise(fresh_accelerate_state):
    m0, e0, o0, r0, meter0, f0 = _tiny_run(device_skip=False)
    m1, e1, o1, r1, meter1, f1 = _tiny_run(device_skip=True)
    assert f0 == [True, True, False, True]
    assert all(isinstance(f, torch.Tensor) for f in f1) and [bool(f) for f in f1] == f0  # decided on the device
    for a, b in ((m0, m1), (e0, e1)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    s0, s1 = o0["state"], o1["state"]
    assert s0.keys() == s1.keys() and all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i])
    assert {float(v["step"]) for v in s1.values()} == {3.0}  # the skipped step is not counted by AdamW either
    for meter in (meter0, meter1):
        assert (meter.skipped_total, meter.updates_total, meter.skipped_run) == (1, 3, 0)
    assert meter1.longest_run == 1
    assert r0 == pytest.approx({**r1, "img_per_s": r0["img_per_s"], "step_time_s": r0["step_time_s"],
                                "tflops": r0["tflops"]}, rel=0, abs=0)  # the same averages, no NaN in them


def test_device_skip_ema_lerp_runs_and_skips(fresh_accelerate_state):
    _, e0, _, _, _, _ = _tiny_run(device_skip=False, ema_lerp=True)
    _, e1, _, _, meter, _ = _tiny_run(device_skip=True, ema_lerp=True)
    assert all(torch.equal(e0[k], e1[k]) for k in e0) and meter.skipped_total == 1
