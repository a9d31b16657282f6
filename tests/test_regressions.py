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
from preprocessing import dataset_tools
from preprocessing.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """64 synthetic 32x32 images (4 classes) encoded with the weight-free pixel-unshuffle codec."""
    d = tmp_path_factory.mktemp("data")
    write_dataset(str(d / "imagenet_32_vae"), num_images=64, resolution=32, num_classes=4, seed=0)
    dataset_tools.main(dataset_tools.parse_args(
        ["encode", "--source", str(d / "imagenet_32_vae"), "--dest", str(d / "vae-sd"),
         "--model-url", "pixel-unshuffle", "--batch-size", "32"]))
    return d


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
