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
