"""Guards for regressions that pass unnoticed otherwise: resume under gradient accumulation and with another
process count, the samplers' time grids, the run-identity checks of generate.py and sweep.py, and the fp16
GradScaler path of the training step."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parents[1]


def sit_argv(data_dir, out, exp, *extra):
    """A plain SiT-T/2 (no encoder to run: the cheapest step), 2 micro-batches of 8 per step: 64 images are
    8 micro-batches, i.e. 4 steps, per epoch."""
    return ["--model", "SiT-T/2", "--method", "sit", "--data-dir", str(data_dir), "--resolution", "32",
            "--num-classes", "4", "--batch-size", "8", "--gradient-accumulation-steps", "2", "--output-dir", str(out),
            "--exp-name", exp, "--num-workers", "0", "--report-to", "none", "--log-every", "2",
            "--checkpointing-steps", "2", "--keep-last", "10", *extra]


def assert_same_weights(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    for key in ("model", "ema"):
        diffs = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not diffs, f"{key} differs: {diffs[:5]}"


class RecordingDataset(train.CustomDataset):
    """The training dataset, recording the indices read (in order) in the class attribute `reads`."""
    reads: list[int] = []

    def __getitem__(self, idx):
        RecordingDataset.reads.append(int(idx))
        return super().__getitem__(idx)


# ----------------------------------------------------------------------------- resume

@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_with_gradient_accumulation_is_exact(data_dir, tmp_path):
    """Interrupted at step 2 (micro-batch 4, mid-epoch) and resumed to step 5 (across the epoch end): the
    weights equal the uninterrupted run's, bit for bit. The data position on resume is micro-batch
    step * accumulation, not step."""
    from accelerate.state import AcceleratorState
    train.main(train.parse_args(sit_argv(data_dir, tmp_path, "straight", "--max-train-steps", "5")))
    for steps in ("2", "5"):
        AcceleratorState._reset_state(reset_partial_state=True)
        result = train.main(train.parse_args(sit_argv(data_dir, tmp_path, "split", "--max-train-steps", steps)))
    assert result["steps"] == 5 and "resumed from" in (tmp_path / "split/log.txt").read_text()
    assert_same_weights(tmp_path / "straight/checkpoints/0000005.pt", tmp_path / "split/checkpoints/0000005.pt")


def _launch_two_processes(runs: list[dict], tmp_path: Path) -> None:
    """tests/ddp_runs.py under accelerate's launcher (torchrun; train.py's CPU fallback gives DDP over gloo):
    several train.main runs in one launch, to pay the start-up of two processes once."""
    with socket.socket() as s:  # a free port: other tests may run in parallel (pytest -n 2)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", port, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "ddp_runs.py"), str(tmp_path / "runs.json")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_process_run_resumes_with_two_processes_and_with_one(data_dir, tmp_path, monkeypatch):
    """What the code guarantees across process counts: the data order is a function of (seed, micro-batch)
    alone (global batch j is the same 8 images for any number of processes, rank r taking its slice), so
    a resumed run reads exactly the images the uninterrupted run would have, with any process count.
    The random draws (time, noise, label dropout) are seeded per (rank, step), so only a resume with the
    same process count gives the same weights, bit for bit."""
    reads = lambda name, rank: json.loads((tmp_path / f"{name}.{rank}.json").read_text())  # noqa: E731
    _launch_two_processes([
        {"argv": sit_argv(data_dir, tmp_path, "straight", "--max-train-steps", "4"), "reads": f"{tmp_path}/straight.{{rank}}.json"},
        {"argv": sit_argv(data_dir, tmp_path, "split", "--max-train-steps", "2"), "reads": f"{tmp_path}/first.{{rank}}.json"},
        {"argv": sit_argv(data_dir, tmp_path, "split", "--max-train-steps", "4"), "reads": f"{tmp_path}/second.{{rank}}.json"},
    ], tmp_path)
    ckpts = tmp_path / "straight/checkpoints"
    assert sorted(f.name for f in ckpts.glob("0*.pt")) == ["0000002.opt.pt", "0000002.pt", "0000004.opt.pt", "0000004.pt"]
    assert "2 processes" in (tmp_path / "straight/log.txt").read_text()
    local = 4  # images per rank and micro-batch
    straight = [reads("straight", r) for r in (0, 1)]
    assert all(len(s) == 4 * 2 * local for s in straight) and len(set(straight[0] + straight[1])) == 64  # one epoch
    # 2 -> 2: each rank reads on from micro-batch 4, and the weights equal the uninterrupted run's
    for r in (0, 1):
        assert reads("first", r) == straight[r][:4 * local] and reads("second", r) == straight[r][4 * local:]
    assert "resumed from" in (tmp_path / "split/log.txt").read_text()
    assert_same_weights(ckpts / "0000004.pt", tmp_path / "split/checkpoints/0000004.pt")
    # 2 -> 1: one process reads, per micro-batch, rank 0's images then rank 1's
    shutil.copytree(tmp_path / "split", tmp_path / "one")
    monkeypatch.setattr(train, "CustomDataset", RecordingDataset)
    RecordingDataset.reads = []
    result = train.main(train.parse_args(sit_argv(data_dir, tmp_path, "one", "--max-train-steps", "4",
                                                  "--resume-step", "2")))
    assert result["steps"] == 4 and "resumed from" in (tmp_path / "one/log.txt").read_text()
    expect = [i for m in range(4, 8) for r in (0, 1) for i in straight[r][m * local:(m + 1) * local]]
    assert RecordingDataset.reads == expect


# ----------------------------------------------------------------------------- the samplers' time grids

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


# ----------------------------------------------------------------------------- run identity: generate.py, sweep.py

# Every setting that changes the pixels of image i, with another value and why it matters. Written out here
# (not read from generate.SAMPLING_KEYS) so that a key dropped from the check fails this test.
GENERATE_PIXEL_SETTINGS = {
    "checkpoint": ({"path": "/other.pt", "size": 1, "mtime_ns": 1, "sha256_first_mib": "0" * 64}, "the weights"),
    "model_config": ({"model": "SiT-T/2", "path_type": "linear", "fused_attn": False}, "the network and overrides"),
    "vae": ("mse", "the decoder"),
    "latents_scale": (1.0, "latents are divided by it before decoding"),
    "mode": ("ode", "another sampler"),
    "num_steps": (250, "another time grid"),
    "heun": (True, "the ODE corrector"),
    "cfg_scale": (4.0, "guidance"),
    "cls_cfg_scale": (4.0, "class-token guidance"),
    "guidance_low": (0.3, "the guidance interval"),
    "guidance_high": (0.7, "the guidance interval"),
    "path_type": ("cosine", "the score the SDE derives from the velocity"),
    "global_seed": (1, "image i's noise and class"),
    "balanced": (True, "image i's class"),
    "num_classes": (10, "image i's class and the null label"),
    "precision": ("fp64", "the sampler's dtype"),
    "ema": (False, "EMA or raw weights"),
    "tf32": (False, "matmul precision on GPU"),
    "class_labels": ([1, 207], "image i's class (--class-labels)"),
}


def _generate_settings():
    import generate
    args = generate.parse_args(["--ckpt", "exps/run/checkpoints/ema_0000010.safetensors"])
    args.label_list = None  # what generate.py makes of --class-labels (none given)
    model = type("Model", (), {"num_classes": 4})()
    config = {"model": "SiT-T/2", "path_type": "linear", "fused_attn": True}
    identity = {"path": "/exps/run/checkpoints/ema_0000010.safetensors", "size": 10, "mtime_ns": 5,
                "sha256_first_mib": "f" * 64}
    return generate.build_settings(args, config, model, "ema", 0.18215, 1, identity)


def _each_change_is_refused(check, base: dict, table: dict) -> None:
    """check(settings) must refuse a change of every key of `table`, one at a time, naming the key."""
    for key, (value, why) in table.items():
        assert key in base and base[key] != value, key
        with pytest.raises(ValueError, match=rf"[(;] ?{key}: "):
            check({**base, key: value})
            pytest.fail(f"a change of {key} ({why}) was accepted")


def test_generate_refuses_a_folder_sampled_with_any_other_pixel_setting(tmp_path):
    import generate
    base = _generate_settings()
    (tmp_path / "settings.json").write_text(json.dumps(base))
    generate.check_resumable(tmp_path, base)  # the same settings resume
    _each_change_is_refused(lambda settings: generate.check_resumable(tmp_path, settings), base,
                            GENERATE_PIXEL_SETTINGS)
    # image i does not depend on these: a rerun may change them
    for key, value in (("per_proc_batch_size", 7), ("world_size", 3), ("num_fid_samples", 100)):
        generate.check_resumable(tmp_path, {**base, key: value})


# What every stored metric of a sweep depends on besides its own sampler setting (the manifest's keys).
SWEEP_RESULT_SETTINGS = {
    "checkpoint": ({"path": "/other.pt", "size": 1, "mtime_ns": 1, "sha256_first_mib": "0" * 64}, "the weights"),
    "ema": (False, "EMA or raw weights"),
    "reference": ({"source": "/other.npz", "size": 1, "mtime_ns": 1}, "the FID reference batch"),
    "inception_weights_id": ("other", "the feature network"),
    "global_seed": (1, "the noise and classes of every image"),
    "num_samples": (5000, "FID is biased by the sample count"),
    "balanced": (True, "the classes"),
    "precision": ("fp64", "the sampler's dtype"),
    "tf32": (False, "matmul precision on GPU"),
    "vae": ("mse", "the decoder"),
    "latents_scale": (1.0, "latents are divided by it before decoding"),
    "path_type": ("cosine", "the score the SDE derives from the velocity"),
    "model": ("SiT-B/2", "the network"),
    "model_config": ({"model": "SiT-XL/2", "qk_norm": True}, "the network's other settings (qk-norm, fused attention)"),
}


def test_sweep_refuses_an_output_folder_made_with_any_other_setting(tmp_path):
    import sweep
    base = {"checkpoint": {"path": "/exps/ema.safetensors", "size": 10, "mtime_ns": 5, "sha256_first_mib": "f" * 64},
            "ema": True, "reference": {"source": "/ref.npz", "size": 3, "mtime_ns": 4}, "inception_weights_id": "pt",
            "global_seed": 0, "num_samples": 10_000, "balanced": False, "precision": "fp32", "tf32": True, "vae": "ema",
            "latents_scale": 0.18215, "path_type": "linear", "model": "SiT-XL/2", "model_config": {"model": "SiT-XL/2"}}
    sweep.check_manifest(tmp_path, base)  # writes sweep.json
    sweep.check_manifest(tmp_path, base)  # the same settings resume
    _each_change_is_refused(lambda settings: sweep.check_manifest(tmp_path, settings), base, SWEEP_RESULT_SETTINGS)


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
