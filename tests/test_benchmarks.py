"""The shipped training step (reg.train_step.train_step) under the settings the benchmarks compare: the same
per-step seed gives the same loss and the same weights whatever the AdamW kernel, compile or bf16 do;
and the GPU check script runs end to end in its tiny CPU mode. Timings are never asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks import run as bench
from reg.train_step import StepConfig

ROOT = Path(__file__).resolve().parents[1]
RES = 32  # 4x4 latents, DINOv2 patches of 14 on 32 px: 2x2 (4 tokens + class token)
STEP_CFG = StepConfig(ema_decay=0.9)  # a fast EMA, so its update is visible in one step


@pytest.fixture(scope="module")
def encoders():
    return bench.quiet_encoders("dinov2-vit-s", RES, torch.device("cpu"))


def arm(encoders, **setting) -> bench.TrainArm:
    """A SiT-T/2 + REG arm whose weights are all non-zero (adaLN-Zero would hide differences at init)."""
    z = encoders[0].embed_dim
    a = bench.TrainArm("SiT-T/2", bench.sit_kwargs("SiT-T/2", RES, z), encoders, torch.device("cpu"), **setting)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    a.ema.load_state_dict(a.model.state_dict())
    return a


def run_steps(a: bench.TrainArm, steps: int = 2) -> list[float]:
    batch = bench.make_batch(4, RES, torch.device("cpu"), seed=3)
    return [a.step(batch, k, STEP_CFG).terms[0].item() for k in range(steps)]


def assert_same_weights(a: bench.TrainArm, b: bench.TrainArm, rtol: float, atol: float) -> None:
    moved = False
    for (name, p), q, e, f in zip(a.model.named_parameters(), b.model.parameters(), a.ema.parameters(),
                                  b.ema.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=f"parameter {name}")
        torch.testing.assert_close(f, e, rtol=rtol, atol=atol, msg=f"EMA {name}")
        moved |= not torch.equal(e, p)
    assert moved, "the EMA should lag the updated weights"


def test_fused_adamw_step_equals_the_for_loop_step(encoders):
    plain = arm(encoders, mixed_precision="no", compile=False, adamw="for-loop")
    fused = arm(encoders, mixed_precision="no", compile=False, adamw="fused")
    start = [p.clone() for p in plain.model.parameters()]
    losses_plain, losses_fused = run_steps(plain), run_steps(fused)
    assert losses_fused[0] == losses_plain[0]  # step 0: the same computation up to the update
    assert losses_fused[1] == pytest.approx(losses_plain[1], rel=1e-6)  # step 1 sees the updated weights
    # atol: 1% of two updates of lr 1e-4. Adam divides by sqrt(v): where a gradient is only rounding noise
    # (the key bias, which softmax ignores) the two kernels' last-bit differences become ~2e-7 here
    assert_same_weights(plain, fused, rtol=1e-5, atol=2e-6)
    assert any(not torch.equal(p, s) for p, s in zip(plain.model.parameters(), start))


def test_bf16_autocast_step_matches_fp32_within_tolerance(encoders):
    fp32 = run_steps(arm(encoders, mixed_precision="no", compile=False, adamw="fused"))
    bf16 = run_steps(arm(encoders, mixed_precision="bf16", compile=False, adamw="fused"))
    for a, b in zip(fp32, bf16):
        assert abs(b - a) / abs(a) <= gpu_check.LOSS0_REL_TOL  # the tolerance the GPU check states
    assert bf16[0] != fp32[0], "bf16 autocast should change the low bits of the loss"


def test_compiled_step_matches_eager(encoders):
    # aot_eager traces forward and backward as inductor does, without its minutes of C++ compilation here
    eager = arm(encoders, mixed_precision="no", compile=False, adamw="fused")
    compiled = arm(encoders, mixed_precision="no", compile=True, adamw="fused", compile_kw={"backend": "aot_eager"})
    torch._dynamo.reset()
    try:
        losses_eager, losses_compiled = run_steps(eager), run_steps(compiled)
    finally:
        torch._dynamo.reset()
    assert losses_compiled == pytest.approx(losses_eager, rel=1e-6)
    assert_same_weights(eager, compiled, rtol=1e-5, atol=2e-6)


def test_read_run_takes_steady_medians_and_compile_time(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"model": "SiT-XL/2", "batch_size": 64, "log_every": 10}))
    rows = [{"step": 10, "loss": 2.0, "img_per_s": 50.0, "step_time_s": 1.3, "tflops": 1.0, "mfu": 0.01,
             "peak_mem_gb": 30.0}] + [{"step": 10 * k, "img_per_s": v, "step_time_s": 64 / v, "tflops": 3.0 * k,
                                       "mfu": 0.3 + k / 100, "peak_mem_gb": 30.0} for k, v in ((2, 400.0), (3, 640.0),
                                                                                               (4, 500.0))]
    rows.append({"step": 40, "eval_time_s": 20.0, "eval_samples": 500})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = gpu_check.read_run(tmp_path)
    assert got["img_per_s"] == 500.0 and got["step_time_s"] == pytest.approx(0.128) and got["mfu"] == pytest.approx(0.33)
    assert got["compile_s"] == pytest.approx((1.3 - 0.128) * 10) and got["steps"] == 40
    assert got["eval_10k_s"] == pytest.approx(400.0) and got["eval_10k_in_steps"] == pytest.approx(400 / 0.128)


def test_flag_errors():
    for argv in (["--models", "SiT-Q/2"], ["--sections", "train,bogus"], ["--warmup", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", *argv])
    args = bench.parse_args(["--device", "cpu"])
    assert args.quick and args.precision == "no" and not args.compile and args.threads == 1


@pytest.mark.slow
def test_gpu_check_quick_mode_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.sh in its CPU mode: a tiny train.py run and benchmarks/run.py, then RESULTS.md."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "QUICK": "1", "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_RESULTS": str(results),
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "FAIL" not in text
    # the tiny train.py run takes every speed flag (their defaults run in every other test)
    row = next(line for line in text.splitlines() if line.startswith("| SiT-T/2 | --attn-split --device-skip --ema-lerp | 4 | 2 |"))
    assert float(row.split("|")[5]) > 0  # img/s from train.py's metrics.jsonl
    for header in ("Training step (reg.train_step.train_step)", "Sampling (reg.seeded_images.generate_images)",
                   "Evaluator", "PASS: SiT-T/2: step-0 loss", "## The speed flags against today's step",
                   "## Per-phase profile", "## Attention microbenchmark", "## Data loader"):
        assert header in text
    speed = json.loads((tmp_path / "work" / "speed_all.json").read_text())
    assert [r["flag"] for r in speed["ab"]] == list(__import__("benchmarks.speed").speed.FLAGS)
    assert {r["case"] for r in speed["attn"]} == {"T=256", "T=257", "T=257 split 1+256"}
    assert all(r["ms"] for r in speed["attn"] if r["backend"] == "MATH")
    assert speed["profile"][0]["GEMM"] > 0 and speed["loader"][0]["png_kb"] > 0
    bench_rows = json.loads((tmp_path / "work" / "bench_1.json").read_text())["rows"]
    assert {(r["section"], r["path"]) for r in bench_rows} == {
        ("train", "baseline"), ("train", "optimised"), ("sample", "baseline"), ("sample", "optimised"),
        ("eval", "baseline"), ("eval", "optimised")}
