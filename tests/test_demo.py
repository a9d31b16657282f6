"""The offline quick start: demo.sh end to end in a reduced form, its failure handling, and evaluations/plot_losses.py.

The reduced demo runs every real entry point (synthetic data, encode, accelerate + train.py, generate.py,
the evaluator, evaluations/plot_losses.py) with a few training steps and the fewest images the metrics accept. Most of
its time is Python start-up (two training runs, the sampler, the evaluator) and Inception at 299 px.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluations import plot_losses

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo.sh"


def demo_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The caller's environment without any local weights, caches pointed into tmp_path, plus settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REG_ENC_WEIGHTS", "ENC_WEIGHTS", "REG_INCEPTION_WEIGHTS", "HF_HUB_CACHE",
                        "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME") and not k.startswith("DEMO_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHON=sys.executable)
    env.update(settings)
    return env


def run_demo(env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


DINOV2_S_REPO = "timm/vit_small_patch14_dinov2.lvd142m"


def fake_hf_cache_file(hf_home: Path, repo: str, filename: str) -> Path:
    """Where huggingface_hub's cache keeps `filename` of `repo` at revision main (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_random_dinov2_s(path: Path) -> Path:
    """A randomly initialised DINOv2-S in timm naming, with the hub file's 518 px position table: stands in
    for the pretrained file, so the demo's 'weights found locally' path runs without any download."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_reduced_demo_writes_every_output_and_the_loss_falls(tmp_path):
    out = tmp_path / "demo_out"
    # "Pretrained" DINOv2-S in the HF cache (random values): the demo must find it and train.py load it offline.
    save_random_dinov2_s(fake_hf_cache_file(tmp_path / "hf", DINOV2_S_REPO, "model.safetensors"))
    # The fewest images the metrics take (precision/recall: 4 per set) and a 3x3 grid of 3 classes.
    steps, samples, classes, refs = 8, 9, 3, 4
    env = demo_env(tmp_path, DEMO_OUT=str(out), DEMO_IMAGES="64", DEMO_CLASSES=str(classes),
                   DEMO_STEPS=str(steps), DEMO_BATCH="16", DEMO_LOG_EVERY="2", DEMO_SAMPLES=str(samples),
                   DEMO_SAMPLER_STEPS="8", DEMO_REF=str(refs), DEMO_EVAL_SAMPLES="4")
    proc = run_demo(env)
    assert proc.returncode == 0, explain(proc)

    # Every output the demo announces exists and has the expected content.
    ckpt = out / "exps" / "demo" / "checkpoints" / f"ema_{steps:07d}.safetensors"
    grid = out / "samples" / "demo-grid.png"
    losses_png = out / "losses.png"
    metrics_json = out / "metrics.json"
    for f in (ckpt, ckpt.with_suffix(".json"), grid, losses_png, metrics_json, out / "samples" / "demo.npz",
              out / "ref_batch.npz", out / "exps" / "demo" / "metrics.jsonl"):
        assert f.is_file() and f.stat().st_size > 0, f"missing output {f}\n{explain(proc)}"
        if f in (ckpt, grid, losses_png, metrics_json):
            assert str(f.relative_to(tmp_path)) in proc.stdout.replace(str(tmp_path) + "/", ""), f"{f} not announced"

    with np.load(out / "samples" / "demo.npz") as npz:
        assert npz["arr_0"].shape == (samples, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].tolist() == [i % classes for i in range(samples)]  # --balanced
    with np.load(out / "ref_batch.npz") as npz:
        assert npz["arr_0"].shape == (refs, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    side = math.ceil(math.sqrt(samples)) * 32
    with Image.open(grid) as im:
        assert im.size == (side, side)
    with Image.open(losses_png) as im:
        assert im.format == "PNG" and min(im.size) > 100

    metrics = json.loads(metrics_json.read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["sample_batch"]["num_images"] == samples and metrics["ref_batch"]["num_images"] == refs
    assert "warning" in metrics  # no Inception file under TORCH_HOME: random weights, and the JSON says so

    # The loss fell: first vs last logged interval.
    records = [json.loads(line) for line in (out / "exps" / "demo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fid" in r]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == list(range(2, steps + 1, 2))
    assert [r["step"] for r in evals] == [steps // 2, steps]  # FID during training, DEMO_STEPS/2 apart

    # The comparison of REG and the plain SiT baseline: a table holding both runs' FIDs, and the figure.
    table = json.loads((out / "compare" / "comparison.json").read_text())
    rows = {r["run"]: r for r in (table["rows"] if isinstance(table, dict) else table)}
    base = [json.loads(l) for l in (out / "exps" / "demo-sit" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows) == {"demo", "demo-sit"}
    assert rows["demo"]["method"] == "reg" and rows["demo-sit"]["method"] == "sit"
    assert math.isclose(rows["demo"]["latest_fid"], evals[-1]["fid"])
    assert math.isclose(rows["demo-sit"]["latest_fid"], [r for r in base if "fid" in r][-1]["fid"])
    assert "| demo-sit |" in proc.stdout and (out / "compare" / "comparison.png").stat().st_size > 0
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]

    # The output says which weights were used, and sums up.
    assert "pretrained weights found locally" in proc.stdout and "(encoder dinov2-vit-s: hub)" in proc.stdout
    assert "RANDOM weights" not in proc.stdout + proc.stderr  # neither the demo nor train.py fell back to random
    assert "RANDOM Inception weights" in proc.stdout
    assert "column k = class k" in proc.stdout
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 2 and "loss" in summary[0] and "FID" in summary[1] and "RANDOM" in summary[1]
    stages = ("data", "encode", "train", "baseline", "sample", "evaluate", "compare", "plot")
    for number, name in enumerate(stages, 1):
        assert f"==> [{number}/8] {name}:" in proc.stdout


def dry_run(tmp_path: Path, **settings: str) -> str:
    proc = run_demo(demo_env(tmp_path, DEMO_DRY_RUN="1", DEMO_OUT=str(tmp_path / "out"), **settings), timeout=60)
    assert proc.returncode == 0, explain(proc)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    return proc.stdout


def test_dry_run_says_which_weights_would_be_used(tmp_path):
    # Nothing local: random encoder and random Inception, both said out loud.
    text = dry_run(tmp_path)
    assert "encoder dinov2-vit-s: RANDOM weights" in text and "evaluator: RANDOM Inception weights" in text
    # The HF cache is found; the torch.hub cache wins over it; torch-fidelity's file under TORCH_HOME is found.
    cached = fake_hf_cache_file(tmp_path / "hf", DINOV2_S_REPO, "model.safetensors")
    cached.write_bytes(b"x")
    assert f"pretrained weights found locally ({cached})" in dry_run(tmp_path)
    hub = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    hub_file.write_bytes(b"x")
    text = dry_run(tmp_path)
    assert f"pretrained weights found locally ({hub})" in text
    assert f"evaluator: Inception weights from {hub_file}" in text
    # The environment variables win over every cache.
    text = dry_run(tmp_path, REG_ENC_WEIGHTS="/w/reg.pth", REG_INCEPTION_WEIGHTS="/w/inc.pth")
    assert "weights from /w/reg.pth" in text and "evaluator: Inception weights from /w/inc.pth" in text


def test_failing_stage_stops_the_demo_and_is_named(tmp_path):
    # 100 classes is more than the synthetic generator has (56): the first stage fails.
    # (REG_ENC_WEIGHTS=random here and below: no Python start-up to look for local weights)
    proc = run_demo(demo_env(tmp_path, DEMO_OUT=str(tmp_path / "out"), DEMO_CLASSES="100", REG_ENC_WEIGHTS="random"),
                    timeout=120)
    assert proc.returncode != 0
    assert "FAILED in stage 'data'" in proc.stderr, explain(proc)
    assert "==> [2/8]" not in proc.stdout  # nothing ran after the failing stage


def test_demo_refuses_to_wipe_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_demo(demo_env(tmp_path, DEMO_OUT=str(out), REG_ENC_WEIGHTS="random"), timeout=60)
    assert proc.returncode == 2, explain(proc)
    assert "not made by demo.sh" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------- evaluations/plot_losses.py

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_losses_draws_every_term(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "loss_denoise": 1.2 / s, "loss_proj": -s / 10, "loss_cls": 0.9 / s,
                "grad_norm": 0.1, "lr": 1e-3} for s in (10, 20, 30)]
    # A resumed run appends the interval it replays: the last record of a step wins.
    records.append({**records[-1], "loss": 0.01})
    metrics = write_jsonl(tmp_path / "metrics.jsonl", records)
    assert [r["step"] for r in plot_losses.read_metrics(str(metrics))] == [10, 20, 30]
    assert plot_losses.read_metrics(str(metrics))[-1]["loss"] == 0.01

    out = plot_losses.main(plot_losses.parse_args([str(metrics), "--out", str(tmp_path / "plots" / "l.png")]))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    # Default output: beside the metrics file. A subset of keys draws fewer panels.
    assert plot_losses.main(plot_losses.parse_args([str(metrics)])) == str(tmp_path / "losses.png")
    assert plot_losses.plot_losses(plot_losses.read_metrics(str(metrics)), str(tmp_path / "one.png"),
                                   keys=("loss", "no_such_key")) == ["loss"]


def test_plot_losses_rejects_bad_input_with_the_file_name(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        plot_losses.read_metrics(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):  # a broken line in the middle: not a kill
        plot_losses.read_metrics(str(broken))
    broken.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"')  # torn by a kill: skipped, said
    assert [r["step"] for r in plot_losses.read_metrics(str(broken))] == [1]
    assert "broken.jsonl:2: skipped an unfinished last line" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        plot_losses.read_metrics(str(tmp_path / "nope.jsonl"))
    no_terms = write_jsonl(tmp_path / "m.jsonl", [{"step": 1, "lr": 1e-3}])
    with pytest.raises(ValueError, match="none of the keys"):
        plot_losses.plot_losses(plot_losses.read_metrics(str(no_terms)), str(tmp_path / "x.png"))


def test_plot_losses_skips_evaluation_records(tmp_path):
    records = [{"step": 2, "loss": 1.0, "loss_denoise": 0.9}, {"step": 2, "fid": 50.0},
               {"step": 4, "loss": 0.5, "loss_denoise": 0.4}, {"step": 4, "fid": 40.0}]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", records)
    assert [r["loss"] for r in plot_losses.read_metrics(str(metrics))] == [1.0, 0.5]


def test_plot_losses_draws_one_fid_line_per_evaluation_setting(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = {"eval_ref_sha256": "a" * 64, "eval_mode": "ode", "eval_steps": 50, "eval_samples": 4}
    records = [{"step": 2, "loss": 1.0}, {"step": 2, "fid": 50.0, **settings}, {"step": 4, "loss": 0.5},
               {"step": 4, "fid": 40.0, **settings}, {"step": 4, "fid": 9.0, **settings, "eval_ref_sha256": "b" * 64},
               {"step": 6, "fid": 8.0, **settings, "eval_ref_sha256": "b" * 64}]
    metrics = write_jsonl(tmp_path / "metrics.jsonl", records)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_losses.main(plot_losses.parse_args([str(metrics), "--keys", "loss,fid"]))
    ax_loss, ax_fid = figures[0].axes[:2]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax_fid.get_lines()}
    assert lines == {"ode, 50 steps, 4 samples, reference aaaaaaaa": ([2, 4], [50.0, 40.0]),
                     "ode, 50 steps, 4 samples, reference bbbbbbbb": ([4, 6], [9.0, 8.0])}
    assert [list(line.get_ydata()) for line in ax_loss.get_lines()] == [[1.0, 0.5]]

