"""reg/stop_signals.py: SIGUSR1 / SIGTERM stop train.py (a checkpoint, exit 75, a bit-identical resume),
encode and generate.py after a batch, and sweep.py after discarding the setting in progress; the ranks of a
process group agree on the stop step. The end-to-end cases run the real entry points on CPU with tiny settings."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import generate
import train
from helpers import run_sweep, run_two_processes, save_tiny_reg_checkpoint, tiny_argv
from preprocessing import dataset_tools
from reg import folder_lock, stop_signals

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- encode

def test_encode_stops_after_a_batch_on_sigusr1_and_the_rerun_completes(data_dir, tmp_path, monkeypatch):
    dest = tmp_path / "vae-sd"
    argv = ["encode", "--source", str(data_dir / "imagenet_32_vae"), "--dest", str(dest), "--model-url",
            "pixel-unshuffle", "--batch-size", "8", "--num-workers", "0", "--shard-size", "16"]
    real, calls = dataset_tools.npy_bytes, []

    def signal_once(array):
        calls.append(1)
        if len(calls) == 17:  # the first latent of the third batch
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(array)

    monkeypatch.setattr(dataset_tools, "npy_bytes", signal_once)
    with pytest.raises(SystemExit) as e:
        dataset_tools.main(dataset_tools.parse_args(argv))
    assert e.value.code == stop_signals.EXIT_STOPPED
    assert len(list(dest.rglob("*.npy"))) == 24 and not (dest / "dataset.json").exists()  # that batch, finished
    assert dataset_tools.main(dataset_tools.parse_args(argv))["written"] == 64 - 16  # the complete shard is kept


# ----------------------------------------------------------------------------- train, generate, sweep

@pytest.mark.usefixtures("flops_counted_once_per_architecture")  # conftest.py: three train.main runs in process
def test_sigusr1_checkpoints_exits_75_resumes_bit_identical_and_a_second_run_is_refused(data_dir, tmp_path):
    common = ("--learning-rate", "1e-3", "--checkpointing-steps", "100", "--keep-last", "10")
    argv = tiny_argv(data_dir, tmp_path, "sig", "--max-train-steps", "1000", *common)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "sig"
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        # a second run into the same folder (another seed), while the first trains: refused, naming it
        start = time.time()
        with pytest.raises(folder_lock.FolderBusy, match=f"pid {proc.pid}, started .*command: .*train.py"):
            train.main(train.parse_args(argv + ["--seed", "2", "--max-train-steps", "4"]))
        assert time.time() - start < 30
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == stop_signals.EXIT_STOPPED, err[-2000:]
    stopped = [int(p.name[:7]) for p in (run / "checkpoints").glob("[0-9]*[0-9].pt")]
    assert len(stopped) == 1 and 2 <= stopped[0] < 100, stopped  # a full checkpoint at the step it stopped at
    step = stopped[0]
    assert (run / "checkpoints" / f"{step:07d}.opt.pt").is_file() and not (run / folder_lock.LOCK_NAME).exists()
    log = (run / "log.txt").read_text()
    assert log.count("parameters,") == 1 and f"stopped by SIGUSR1 at step {step}" in log  # the second wrote nothing
    assert json.loads((run / "args.json").read_text())["seed"] == 0
    # resume to step + 2, against an uninterrupted run of step + 2
    end = str(step + 2)
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "sig", "--max-train-steps", end, *common)))
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "straight", "--max-train-steps", end, *common)))
    a = torch.load(tmp_path / f"sig/checkpoints/{step + 2:07d}.pt", weights_only=True)
    b = torch.load(tmp_path / f"straight/checkpoints/{step + 2:07d}.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    lines = lambda r: {m["step"]: m for m in map(json.loads, (tmp_path / r / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    la, lb = lines("sig"), lines("straight")
    same = [s for s in lb if s <= step - step % 2 or s > step + step % 2]  # log intervals that did not hold the stop
    assert same and all(la[s]["loss"] == lb[s]["loss"] and la[s]["grad_norm"] == lb[s]["grad_norm"] for s in same)


def test_generate_stops_after_a_batch_on_sigterm_and_resumes(tmp_path, monkeypatch):
    ckpt = save_tiny_reg_checkpoint(tmp_path / "ema.safetensors", perturb=0.05)
    argv = ["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "s"), "--run-name", "r", "--num-fid-samples", "8",
            "--per-proc-batch-size", "2", "--num-steps", "2", "--device", "cpu"]
    real_save, saved = generate.save_png, []

    def save_then_signal(image, path):
        real_save(image, path)
        saved.append(path)
        if len(saved) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # mid-batch: the batch is finished, then the run stops

    monkeypatch.setattr(generate, "save_png", save_then_signal)
    monkeypatch.setenv("REG_STOP_FILE", str(tmp_path / "stop"))  # read by slurm/train.sbatch behind a launcher
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        generate.main(generate.parse_args(argv))
    assert e.value.code == stop_signals.EXIT_STOPPED and "SIGTERM" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "s" / "r").glob("*.png")) == ["000000.png", "000001.png"]
    assert not (tmp_path / "s" / "r.npz").exists() and not (tmp_path / "s" / "r" / folder_lock.LOCK_NAME).exists()
    assert (tmp_path / "stop").read_text() == "75\n"
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored after the command
    summary = generate.main(generate.parse_args(argv))
    assert summary["generated"] == 6 and (tmp_path / "s" / "r.npz").is_file()


def _step_loop(rank, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    stop = stop_signals.StepStop(2, every=4)
    for step in range(1, 40):
        if rank == 1 and step == 6:
            stop_signals.request_stop("SIGUSR1")  # only one rank is signalled, at a step of its own
        if stop.due(step):
            break
    stop.close()
    out.put((rank, step))
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_step_when_one_rank_is_signalled():
    assert sorted(run_two_processes(_step_loop)) == [(0, 9), (1, 9)]  # flag at 6, agreed at 8, read at 9


def test_sweep_discards_the_setting_in_progress_on_a_signal_and_resumes(sweep_setup, monkeypatch):
    from evaluations import evaluator
    real, calls = evaluator.FeatureAccumulator.add, []

    def add_then_signal(self, images):
        calls.append(1)
        if len(calls) == 5:  # the first batch of the second setting (2 batches of reference images come first)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, images)

    monkeypatch.setattr(evaluator.FeatureAccumulator, "add", add_then_signal)
    small = ("--cfg-scale", "1,3", "--guidance-high", "1.0")  # two settings
    with pytest.raises(SystemExit) as e:
        run_sweep(sweep_setup, *small)
    assert e.value.code == stop_signals.EXIT_STOPPED and "discarded" in str(e.value)
    out = sweep_setup / "out"
    assert len(list((out / "settings").glob("*.json"))) == 1 and not (out / "results.json").exists()
    monkeypatch.setattr(evaluator.FeatureAccumulator, "add", real)
    run_sweep(sweep_setup, *small)
    assert len(list((out / "settings").glob("*.json"))) == 2 and (out / "results.json").is_file()


# ----------------------------------------------------------------------------- evaluations and grids during training

@pytest.mark.usefixtures("fresh_accelerate_state", "flops_counted_once_per_architecture")
def test_a_signal_during_an_evaluation_ends_it_after_the_batch_and_checkpoints_the_step(data_dir, tmp_path, eval_ref,
                                                                                         monkeypatch):
    from evaluations import evaluator
    real_add, adds = evaluator.FeatureAccumulator.add, []

    def add(self, images):
        adds.append(len(images))
        if len(adds) == signal_at_batch[0]:
            os.kill(os.getpid(), signal.SIGUSR1)  # mid-evaluation
        return real_add(self, images)

    monkeypatch.setattr(evaluator.FeatureAccumulator, "add", add)
    # 6 images in batches of 2 at steps 4 and 6; checkpoints only at the last step (100 is never reached)
    argv = tiny_argv(data_dir, tmp_path, "ev", "--max-train-steps", "6", "--checkpointing-steps", "100",
                     "--eval-every", "4", "--eval-ref", str(eval_ref), "--eval-samples", "6", "--eval-steps", "2",
                     "--eval-batch-size", "2", "--inception-weights", "random", "--sample-every", "4")
    run = tmp_path / "ev"

    def fids():
        return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "fid" in r]

    signal_at_batch = [1 + 2]  # the reference is read in 1 batch (8 images); then step 4's 2nd batch
    with pytest.raises(SystemExit) as e:
        train.main(train.parse_args(argv))
    assert e.value.code == stop_signals.EXIT_STOPPED
    assert adds == [8, 2, 2]  # step 4's evaluation ended after the batch the signal came in, not after all 3
    assert (run / "checkpoints/0000004.pt").is_file() and fids() == []  # its step's checkpoint; no FID of step 4
    assert not (run / "samples/0000004.png").exists()  # the grid of step 4 waits: the checkpoint goes first
    # the resumed run evaluates step 4 first; a signal there ends it too, with nothing more to save
    adds.clear()
    signal_at_batch[0] = 1
    with pytest.raises(SystemExit) as e:
        train.main(train.parse_args(argv))
    assert e.value.code == stop_signals.EXIT_STOPPED and adds == [2] and fids() == []
    assert sorted(p.name for p in (run / "checkpoints").glob("[0-9]*.pt")) == ["0000004.opt.pt", "0000004.pt"]
    signal_at_batch[0] = 0
    train.main(train.parse_args(argv))
    assert fids() == [4, 6] and (run / "samples/0000004.png").is_file()  # the missed grid is made on resume


def _uneven_shares(rank, port, out):
    """Two ranks evaluate 5 images in batches of 2 (shares of 3 and 2: 2 and 1 batches); rank 1 is signalled
    during its only batch, after which it has nothing left to sample: both still stop at the same round."""
    import argparse as ap

    import torch.distributed as dist

    from evaluations import during_training, evaluator
    from reg import seeded_images
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")

    def fake_generate(model, vae, indices, *, batch_size, **kwargs):
        indices = list(indices)
        for b in range(0, len(indices), batch_size):
            if rank == 1:
                stop_signals.request_stop("SIGTERM")
            yield indices[b:b + batch_size], torch.zeros(len(indices[b:b + batch_size]), 8, 8, 3), None

    seeded_images.generate_images = fake_generate
    evaluator.FeatureAccumulator = lambda model: type("F", (), {"add": lambda s, x: None, "features": lambda s: {}})()
    ev = object.__new__(during_training.InTrainingEval)
    ev.args = ap.Namespace(eval_samples=5, seed=0, eval_mode="ode", eval_steps=2, eval_cfg=1.0, eval_cls_cfg=0.0,
                           eval_guidance_high=1.0, eval_batch_size=2)
    ev.accelerator = ap.Namespace(process_index=rank, num_processes=2, is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    ev.config = {"num_classes": 4, "path_type": "linear", "latents_scale": 1.0}
    ev.vae, ev.inception, ev.dtype = None, None, None
    try:
        ev.sample_features(None, 10)
        outcome = "finished"
    except during_training.EvalStopped:
        outcome = "stopped"
    out.put((rank, outcome))
    dist.destroy_process_group()


def test_every_rank_ends_an_evaluation_at_the_same_batch():
    assert sorted(run_two_processes(_uneven_shares)) == [(0, "stopped"), (1, "stopped")]


@pytest.mark.usefixtures("fresh_accelerate_state", "flops_counted_once_per_architecture")
def test_a_failing_lock_heartbeat_stops_training_with_a_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("REG_LOCK_HEARTBEAT", "0.1")
    monkeypatch.setenv("REG_LOCK_TIMEOUT", "0.3")
    real = folder_lock.FolderLock._content

    def failing_once_held(self):
        if self.held:
            raise OSError(122, "Disk quota exceeded")
        return real(self)

    monkeypatch.setattr(folder_lock.FolderLock, "_content", failing_once_held)
    with pytest.raises(SystemExit) as e:
        train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "hb", "--max-train-steps", "300",
                                              "--checkpointing-steps", "1000")))
    assert e.value.code == stop_signals.EXIT_STOPPED and "a failing lock heartbeat" in str(e.value)
    (stopped,) = [int(p.name[:7]) for p in (tmp_path / "hb/checkpoints").glob("[0-9]*[0-9].pt")]
    log = (tmp_path / "hb/log.txt").read_text()
    assert 0 < stopped < 300 and f"stopped by a failing lock heartbeat at step {stopped}" in log
