"""benchmarks/run.py (issue 8): the optimised training step computes what the plain one does, the
foreach EMA equals the per-name loop, the FLOP count has the scale SPEC §6 gives, the ADM-style
precision/recall baseline agrees with the evaluator, and the whole script runs and prints every figure.

CPU only, tiny sizes. Timings are never asserted.
"""
from __future__ import annotations

import json
import math
import runpy
import sys
import warnings

import numpy as np
import pytest
import torch

from benchmarks import run as bench
from evaluations.evaluator import precision_recall
from models.sit import build_model
from train import ema_update

RES = 32  # 4x4 latents, 2x2 encoder patches: 1 + 4 tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as the benchmark uses on CPU: on a busy shared machine two OpenMP threads
    on two cores wait at barriers and run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoders():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bench.load_encoders("dinov2-vit-s", weights="random", resolution=RES, device="cpu")


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (adaLN-Zero starts with zero outputs, which would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def pinned_for(batch: bench.Batch, z_dim: int) -> bench.Pinned:
    g = torch.Generator().manual_seed(123)
    n, lat = batch.images.shape[0], RES // 8
    return bench.Pinned(t=torch.rand(n, generator=g), noise=torch.randn(n, 4, lat, lat, generator=g),
                        cls_noise=torch.randn(n, z_dim, generator=g), latent_seed=7)


def test_optimised_step_matches_the_plain_step(encoders):
    # everything the optimised path changes that runs on a CPU, in fp32: fused AdamW (torch has a CPU
    # kernel), foreach EMA, no per-step logging sync; bf16 and compile are GPU settings
    path = bench.TrainPath("optimised", precision="fp32", compile=False, fused_adamw=True, foreach_ema=True,
                           log_every_step=False)
    z_dim = encoders[0].embed_dim
    kwargs = bench.sit_kwargs("SiT-T/2", RES, z_dim)
    batch = bench.make_batch(4, RES, torch.device("cpu"), seed=3)
    pinned = pinned_for(batch, z_dim)
    states, outs = [], []
    for p in (bench.BASELINE, path):
        state = bench.build_train_state(p, "SiT-T/2", kwargs, encoders, torch.device("cpu"), seed=0)
        randomise_(state.model, seed=1)
        state.ema.load_state_dict(state.model.state_dict())
        torch.manual_seed(5)  # the label dropout inside the model draws the same numbers on both paths
        outs.append(bench.train_step(state, batch, pinned))
        states.append(state)
    (base_out, base_logs), (opt_out, opt_logs) = outs

    # same loss, term by term, to 1e-5 in fp32
    assert torch.isfinite(base_out.loss) and base_out.loss.item() > 0
    for name in ("loss", "denoise", "proj", "cls"):
        torch.testing.assert_close(getattr(opt_out, name), getattr(base_out, name), rtol=0, atol=1e-5)
    assert torch.equal(opt_out.t, pinned.t)
    # the baseline synchronised on every term, the optimised path only accumulated on the device
    assert set(base_logs) == {"loss", "denoise", "proj", "cls", "grad_norm"} and opt_logs == {}
    assert base_logs["loss"] == pytest.approx(base_out.loss.item())
    torch.testing.assert_close(states[1].sums[0], base_out.loss.detach(), rtol=0, atol=1e-5)
    # after AdamW (plain vs fused) and the EMA (loop vs foreach) the weights still agree
    moved = False
    for (name, p0), p1 in zip(states[0].model.named_parameters(), states[1].model.parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")
    for (name, e0), e1, p in zip(states[0].ema.named_parameters(), states[1].ema.parameters(),
                                 states[0].model.parameters()):
        torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-7, msg=f"EMA {name}")
        moved |= not torch.equal(e0, p)
    assert moved, "the EMA should lag the updated weights"


def test_foreach_ema_equals_the_per_name_loop():
    torch.manual_seed(0)
    kwargs = bench.sit_kwargs("SiT-T/2", RES, 32, projector_dim=64)
    model = build_model("SiT-T/2", **kwargs)
    randomise_(model, seed=2)
    ema_loop = build_model("SiT-T/2", **kwargs).requires_grad_(False)
    ema_loop.load_state_dict(model.state_dict())
    ema_foreach = build_model("SiT-T/2", **kwargs).requires_grad_(False)
    ema_foreach.load_state_dict(model.state_dict())
    start = {k: v.clone() for k, v in ema_loop.state_dict().items()}
    params, foreach_params = list(model.parameters()), list(ema_foreach.parameters())
    for step in range(3):
        with torch.no_grad():
            for p in params:
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        decay = 0.9 if step < 2 else 0.9999  # a fast decay moves the EMA visibly; then the paper's
        bench.ema_update_per_name(ema_loop, model, decay)
        ema_update(foreach_params, params, decay)
    changed = 0
    for name, want in ema_loop.state_dict().items():
        got = ema_foreach.state_dict()[name]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"EMA weight {name}")
        changed += not torch.equal(want, start[name])
    assert changed > 10, "the updates should have moved the EMA weights"


def test_flop_count_has_the_scale_of_spec():
    """SPEC §6: SiT-XL/2 forward ~ 118.6 G multiply-adds per 256px image (DiT's 'GFLOPs'); REG adds one
    token and the projector. FlopCounterMode counts 2 FLOPs per multiply-add."""
    kwargs = bench.sit_kwargs("SiT-XL/2", 256, 768)
    fwd = bench.sit_flops_per_image("SiT-XL/2", kwargs, 2, backward=False)
    assert 2 * 118.6e9 < fwd < 2 * 124e9
    tiny = bench.sit_kwargs("SiT-T/2", RES, 64, projector_dim=64)
    fwd_t = bench.sit_flops_per_image("SiT-T/2", tiny, 2, backward=False)
    train_t = bench.sit_flops_per_image("SiT-T/2", tiny, 2, backward=True)
    assert 2.5 * fwd_t < train_t < 3.1 * fwd_t  # backward ~ 2x forward (no input gradient for the patch conv)


def test_gpu_peak_lookup():
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops_for("NVIDIA L40S") == 362.0
    assert bench.peak_tflops_for("Some Future GPU") is None
    assert bench.lookup_peak_tflops(torch.device("cpu"), None) is None
    assert bench.lookup_peak_tflops(torch.device("cpu"), 12.5) == 12.5


def test_adm_style_precision_recall_agrees_with_the_evaluator():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((70, 16)).astype(np.float32)
    sam = (rng.standard_normal((90, 16)) + 0.5).astype(np.float32)  # overlapping, not identical
    want = precision_recall(ref, sam, k=3, block_size=32, device="cpu")
    got = bench.adm_style_precision_recall(ref, sam, k=3, block=32, device="cpu")
    assert got == want
    assert 0 < want[0] < 1 and 0 < want[1] < 1


TINY_ARGS = ["--device", "cpu", "--models", "SiT-T/2", "--batch-size", "2", "--resolution", str(RES),
             "--enc-type", "dinov2-vit-s", "--warmup", "1", "--steps", "1", "--repeats", "1",
             "--sample-batch", "2", "--sample-steps", "2", "--eval-images", "2", "--eval-batch", "1",
             "--eval-resolution", "32", "--pr-samples", "40", "--pr-refs", "30", "--pr-block", "16",
             "--peak-tflops", "1.0"]


def test_benchmark_prints_every_figure(tmp_path, capsys):
    """The whole script at tiny sizes, in two runs to keep it quick: training (eager, as train.py runs on a
    CPU) and the evaluator; then the sampler with the compiled model (torch.compile's graph capture with
    the 'eager' backend: inductor's code generation would take minutes on a small CPU)."""
    out = tmp_path / "bench.json"
    results = bench.main(bench.parse_args([*TINY_ARGS, "--sections", "train,eval", "--no-compile", "--out", str(out)]))
    text = capsys.readouterr().out
    sampled = bench.main(bench.parse_args([*TINY_ARGS, "--sections", "sample", "--compile",
                                           "--compile-backend", "eager"]))
    sample_text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["rows"] and saved["table"] == results["table"] and saved["device"] == "cpu"
    text += sample_text
    for header in ("Training step", "Sampling", "Evaluator", "speed-up", "MFU", "peak GiB", "GFLOP/img"):
        assert header in text
    rows = results["rows"] + sampled["rows"]
    by = {(r["section"], r.get("model") or r["task"], r["path"]) for r in rows}
    assert by == {("train", "SiT-T/2", "baseline"), ("train", "SiT-T/2", "optimised"),
                  ("sample", "SiT-T/2", "baseline"), ("sample", "SiT-T/2", "optimised"),
                  ("eval", "Inception features", "baseline"), ("eval", "Inception features", "optimised"),
                  ("eval", "precision/recall", "baseline"), ("eval", "precision/recall", "optimised")}
    for r in rows:
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert f"{r['speedup']:.2f}x" in text  # every ratio is printed
        for key in ("img_per_s", "step_ms", "run_s", "seconds", "gflop_per_img", "tflop_per_s", "mfu"):
            if key in r:
                assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (r["section"], key)
        if r["section"] == "train":
            assert r["peak_mem_gib"] is not None and r["peak_mem_gib"] > 0  # Linux peak RSS on CPU
            assert f"{r['img_per_s']:.1f}" in text and f"{100 * r['mfu']:.1f}%" in text
    train = [r for r in rows if r["section"] == "train"]
    assert "no log sync" in train[1]["config"] and "foreach EMA" in train[1]["config"]
    assert [r["config"] for r in sampled["rows"]] == ["eager fp32", "compiled (eager) fp32"]
    assert "same P/R" in text and "max |diff| 0.0e+00" in text  # the baselines compute the same thing


def test_module_entry_point_and_flag_errors(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks.run", "--help"])
    monkeypatch.delitem(sys.modules, "benchmarks.run")  # run_module executes a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("benchmarks.run", run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--quick" in help_text and "--peak-tflops" in help_text
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--models", "SiT-Q/2"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--sections", "train,bogus"])
    args = bench.parse_args(["--device", "cpu"])
    assert args.quick and args.precision == "fp32" and not args.compile_train and not args.compile_sample
    assert bench.parse_args(["--device", "cpu", "--compile"]).compile_sample
