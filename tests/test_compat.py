"""Compatibility (docs/compat.md): the torch-version shims, the requirement files, and accelerate's and the
trackers' conventions (--report-to, wandb ids, mixed precision from the launcher), progress bars, plot_losses.

Part of the core set that .ci/old_torch.sh runs on Python 3.10 + torch 2.4: nothing here assumes the
newest versions.
"""
from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from evaluations import plot_losses
from helpers import run_sweep, tiny_argv
from reg import trackers
from reg.mixed_precision import resolve_mixed_precision
from reg.trackers import parse_report_to, wandb_run
from reg.utils import UserError, fp32_precision, get_fp32_precision

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- torch shims


def _tf32_flags() -> tuple[bool, bool]:
    """What torch itself says, through whichever API this torch has."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return (torch.backends.cuda.matmul.fp32_precision == "tf32", torch.backends.cudnn.conv.fp32_precision == "tf32")
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _raw() -> tuple:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_fp32_precision_shim_sets_and_restores_on_this_torch():
    before, raw = get_fp32_precision(), _raw()  # torch >= 2.9 starts at ("none", "tf32"): restored as such
    with fp32_precision("tf32"):
        assert _tf32_flags() == (True, True) and get_fp32_precision() == ("tf32", "tf32")
        with fp32_precision("ieee"):
            assert _tf32_flags() == (False, False)
        assert _tf32_flags() == (True, True)
    assert get_fp32_precision() == before and _raw() == raw
    with pytest.raises(ValueError, match="tf32"):
        with fp32_precision("highest"):
            pass


# ----------------------------------------------------------------------------- requirement files


def _requirements(name: str, op: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        m = re.match(rf"^([A-Za-z0-9_.-]+){re.escape(op)}([^,;\s]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def test_lock_and_ranges_name_the_same_packages_and_installed_versions_are_in_range():
    lower, pins = _requirements("requirements.txt", ">="), _requirements("requirements-lock.txt", "==")
    assert lower and set(lower) == set(pins)
    assert lower["torch"] == "2.4.0" and all(_version(pins[k]) >= _version(v) for k, v in lower.items())
    for name, low in lower.items():  # this environment, today's or the oldest one, is inside the ranges
        assert _version(metadata.version(name)) >= _version(low), name
    assert sys.version_info >= (3, 10)


# ----------------------------------------------------------------------------- trackers


def test_report_to_takes_every_accelerate_tracker_and_names_a_missing_package(monkeypatch):
    from accelerate.utils import LoggerType
    assert {t.value for t in LoggerType} - {"all"} <= set(trackers.TRACKERS)  # a new accelerate tracker shows here
    assert parse_report_to("none") == [] and parse_report_to("tensorboard") == ["tensorboard"]
    assert "tensorboard" in parse_report_to("all")
    missing = [n for n, (mods, _) in trackers.TRACKERS.items() if not trackers._installed(mods)]
    monkeypatch.setattr(trackers, "_installed", lambda mods: mods[0] != "mlflow")
    with pytest.raises(UserError, match=r"--report-to mlflow needs the mlflow package \(pip install mlflow\)"):
        parse_report_to("tensorboard,mlflow")
    assert "mlflow" not in parse_report_to("all")
    with pytest.raises(UserError, match="unknown tracker neptune"):
        parse_report_to("neptune")
    with pytest.raises(UserError, match="stand alone"):
        parse_report_to("all,wandb")
    import train
    monkeypatch.undo()
    if missing:  # the real check, through train.py's flag
        with pytest.raises(SystemExit):
            train.parse_args(["--report-to", missing[0]])


def test_wandb_id_precedence_flag_env_file(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    run_id, resume, source = wandb_run(tmp_path, None, write=True)  # a new run: its id is kept
    assert source == "new" and resume == "allow" and (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id
    assert wandb_run(tmp_path, None, write=True)[0] == run_id  # auto-resume continues it
    monkeypatch.setenv("WANDB_RUN_ID", "fromenv")
    monkeypatch.setenv("WANDB_RESUME", "must")
    assert wandb_run(tmp_path, None, write=False) == ("fromenv", "must", "WANDB_RUN_ID")
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id  # a non-main process writes nothing
    assert wandb_run(tmp_path, "authors1", write=True)[::2] == ("authors1", "--wandb-id")
    monkeypatch.delenv("WANDB_RUN_ID")
    assert wandb_run(tmp_path, None, write=True)[0] == "authors1"  # kept: the next plain re-run continues it


# ----------------------------------------------------------------------------- mixed precision


def test_mixed_precision_flag_then_launcher_then_config_file_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_mixed_precision(None, cuda=False) == ("no", "default (bf16 on GPU, no on CPU)")
    assert resolve_mixed_precision(None, cuda=True)[0] == "bf16"
    # a bare `accelerate launch` sets "no" by itself: not a choice, so bf16 stays on a GPU
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_mixed_precision(None, cuda=True)[0] == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    config = tmp_path / "accelerate" / "default_config.yaml"
    config.parent.mkdir()
    config.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: fp16\nnum_processes: 1\n")
    assert resolve_mixed_precision(None, cuda=True) == ("fp16", f"accelerate config {config}")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's flag against the config: the flag wins
    assert resolve_mixed_precision(None, cuda=True) == ("no", "ACCELERATE_MIXED_PRECISION (accelerate launch)")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    assert resolve_mixed_precision(None, cuda=True) == ("bf16", "ACCELERATE_MIXED_PRECISION (accelerate launch)")
    assert resolve_mixed_precision("no", cuda=True) == ("no", "--mixed-precision")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UserError, match="'fp8' from ACCELERATE_MIXED_PRECISION"):
        resolve_mixed_precision(None, cuda=True)


# ----------------------------------------------------------------------------- training: wandb, per-step logs, precision


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_continues_a_given_wandb_run_logs_every_step_and_takes_the_launcher_precision(tmp_path, monkeypatch):
    """Two steps in-process: the launcher's precision (env) is used and logged with its source, wandb
    (offline) continues the run named by --wandb-id, and --log-every 1 writes one record per step."""
    pytest.importorskip("wandb")
    import train
    from preprocessing import dataset_tools
    from preprocessing.synthetic import write_dataset
    data = tmp_path / "data"
    write_dataset(str(data / "imagenet_32_vae"), num_images=16, resolution=32, num_classes=4, seed=0)
    dataset_tools.main(dataset_tools.parse_args(["encode", "--source", str(data / "imagenet_32_vae"), "--dest",
                                                 str(data / "vae-sd"), "--model-url", "pixel-unshuffle", "--num-workers", "0"]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    argv = tiny_argv(data, tmp_path, "run", "--max-train-steps", "2", "--checkpointing-steps", "100")
    argv = [a for a in argv if a != "none"]
    argv[argv.index("--report-to") + 1:argv.index("--report-to") + 1] = ["wandb"]
    argv[argv.index("--log-every") + 1] = "1"
    train.main(train.parse_args(argv + ["--wandb-id", "authors7"]))
    run = tmp_path / "run"
    log = (run / "log.txt").read_text()
    assert "precision bf16 (from ACCELERATE_MIXED_PRECISION (accelerate launch))" in log
    assert "wandb run authors7 (--wandb-id)" in log
    assert (run / "wandb_run_id.txt").read_text().strip() == "authors7"
    assert list((run / "wandb").glob("offline-run-*-authors7"))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------- progress and plots


def test_plot_losses_takes_the_run_folder(tmp_path, capsys):
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "loss_denoise": 0.5 / s}) + "\n"
                                               for s in (1, 2, 3)))
    out = plot_losses.main(plot_losses.parse_args([str(run)]))
    assert out == os.path.join(str(run), "losses.png") and os.path.getsize(out) > 0
    assert "over steps 1..3 (3 points)" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_losses.main(plot_losses.parse_args([str(tmp_path)]))


class _Bars:
    """Stands in for tqdm: records each bar's settings and how far it went."""

    def __init__(self):
        self.bars = []

    def __call__(self, **kwargs):
        bars = self

        class Bar:
            def __init__(self):
                self.kwargs, self.n, self.closed = kwargs, 0, False
                bars.bars.append(self)

            def update(self, n):
                self.n += n

            def close(self):
                self.closed = True
        return Bar()


@pytest.mark.parametrize("main_process", [True, False])
def test_in_training_fid_shows_a_progress_bar_on_the_main_process(monkeypatch, main_process):
    import argparse

    from evaluations import during_training, evaluator
    from reg import seeded_images

    bars = _Bars()
    monkeypatch.setattr(during_training, "tqdm", bars)

    def fake_generate(model, vae, indices, *, batch_size, **kw):  # batches of this process's indices
        indices = list(indices)
        for b in range(0, len(indices), batch_size):
            yield indices[b:b + batch_size], torch.zeros(len(indices[b:b + batch_size]), 8, 8, 3, dtype=torch.uint8), None

    class FakeFeatures:
        def __init__(self, model):
            pass

        def add(self, images):
            pass

        def features(self):
            return {}

    monkeypatch.setattr(seeded_images, "generate_images", fake_generate)
    monkeypatch.setattr(evaluator, "FeatureAccumulator", FakeFeatures)
    ev = object.__new__(during_training.InTrainingEval)
    ev.args = argparse.Namespace(eval_samples=11, seed=0, eval_mode="ode", eval_steps=2, eval_cfg=1.0, eval_cls_cfg=0.0,
                                 eval_guidance_high=1.0, eval_batch_size=2)
    ev.accelerator = argparse.Namespace(process_index=1, num_processes=2, is_main_process=main_process, device=torch.device("cpu"))
    ev.config, ev.vae, ev.inception, ev.dtype = {"num_classes": 4, "path_type": "linear", "latents_scale": 1.0}, None, None, None
    indices, _ = ev.sample_features(None, 300)
    assert list(indices) == [1, 3, 5, 7, 9]
    (bar,) = bars.bars
    assert bar.kwargs["total"] == 5 and bar.n == 5 and bar.closed and "step 300" in bar.kwargs["desc"]
    assert bar.kwargs["disable"] is (not main_process)


def test_each_sweep_setting_shows_a_progress_bar(sweep_setup, monkeypatch):
    """Reuses test_sweep's tiny checkpoint, stand-in Inception and grid (conftest.py's sweep_setup,
    helpers.run_sweep)."""
    import sweep

    bars = _Bars()
    monkeypatch.setattr(sweep, "tqdm", bars)
    root = sweep_setup
    run_sweep(root)
    settings = list((root / "out" / "settings").glob("*.json"))
    assert len(bars.bars) == len(settings) > 1
    assert all(b.kwargs["total"] == 6 and b.n == 6 and b.closed and not b.kwargs["disable"] for b in bars.bars)
    assert bars.bars[0].kwargs["desc"].startswith(f"setting 1/{len(settings)} ")
