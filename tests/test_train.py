"""train.py on CPU with tiny settings: learning, exact resume (also under gradient accumulation, and from
two processes to two or one), SIGKILL survival, the two-process launch and its speed variants, ablation
modes, NaN handling, flag validation, the authors' runs and scripts, FID during training."""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from helpers import tiny_argv

ROOT = Path(__file__).resolve().parents[1]


# conftest.py: a fresh accelerate state per test (train.main runs in process), the FLOP count kept per architecture
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state", "flops_counted_once_per_architecture")


def test_loss_falls(data_dir, tmp_path):
    args = train.parse_args(tiny_argv(data_dir, tmp_path, "learn", "--max-train-steps", "20",
                                      "--learning-rate", "1e-3", "--checkpointing-steps", "100"))
    result = train.main(args)
    hist = result["history"]
    assert result["steps"] == 20 and len(hist) == 10
    first, last = hist[0], hist[-1]
    assert last["loss"] < first["loss"] and last["loss_denoise"] < first["loss_denoise"]
    for key in ("loss_proj", "loss_cls", "grad_norm", "img_per_s", "step_time_s", "lr"):
        assert np.isfinite(last[key])
    run = tmp_path / "learn"
    assert json.loads((run / "args.json").read_text())["model"] == "SiT-T/2"
    config = json.loads((run / "config.json").read_text())
    assert config["use_cls_token"] and config["z_dims"] == [384] and config["in_channels"] == 192
    log = (run / "log.txt").read_text()
    assert "step 0000020 loss=" in log and "loss_cls=" in log and "RANDOM" in log
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(2, 21, 2)) and lines[-1]["loss"] == last["loss"]
    # the last step always writes a checkpoint, loadable without unpickling anything
    ckpt = torch.load(run / "checkpoints" / "0000020.pt", weights_only=True)
    assert ckpt["steps"] == 20 and set(ckpt) >= {"model", "ema", "config", "args"}
    opt = torch.load(run / "checkpoints" / "0000020.opt.pt", weights_only=True)["opt"]
    assert len(opt["param_groups"][0]["params"]) == len(ckpt["model"])  # every parameter, as the original
    # the original's metric keys, with its meaning (weighted terms), beside ours; FLOP throughput in every line
    assert last["loss_final"] == last["loss"] and last["loss_mean"] == last["loss_denoise"]
    assert abs(last["proj_loss"] - 0.5 * last["loss_proj"]) < 1e-9 and abs(last["loss_mean_cls"] - 0.03 * last["loss_cls"]) < 1e-9
    assert all(l["tflops"] > 0 and "mfu" not in l for l in lines)  # no MFU on CPU without --peak-tflops
    from safetensors.torch import load_file
    ema = load_file(str(run / "checkpoints" / "ema_0000020.safetensors"))
    assert all(torch.equal(ema[k], v) for k, v in ckpt["ema"].items())
    assert json.loads((run / "checkpoints" / "ema_0000020.json").read_text()) == ckpt["config"]


def test_progress_bar_shows_the_last_interval_loss(data_dir, tmp_path, capsys, monkeypatch):
    """The bar's postfix is the loss of the last log line (Meter's average, no sync of its own)."""
    from reg.throughput import Meter
    flushes = []
    real_flush = Meter.flush
    monkeypatch.setattr(Meter, "flush", lambda self, *a: flushes.append(a) or real_flush(self, *a))
    result = train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "bar", "--max-train-steps", "5",
                                                   "--checkpointing-steps", "100")))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("train: 100%")][-1]
    assert final.endswith(f"loss={result['history'][-1]['loss']:.4f}]"), final
    assert result["history"][-1]["step"] == 5 and len(flushes) == 3  # steps 2, 4 and the last: one per log line
    assert train.progress_text({"step": 2, "lr": 1e-4}) == "loss=n/a (every step skipped)"


def test_resume_is_exact(data_dir, tmp_path):
    common = ["--checkpointing-steps", "3", "--learning-rate", "1e-3", "--keep-last", "10"]
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "straight", "--max-train-steps", "6", *common)))
    # half, then the same command with the full step count resumes from step 3
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "split", "--max-train-steps", "3", *common)))
    result = train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "split", "--max-train-steps", "6", *common)))
    assert result["steps"] == 6
    a = torch.load(tmp_path / "straight/checkpoints/0000006.pt", weights_only=True)
    b = torch.load(tmp_path / "split/checkpoints/0000006.pt", weights_only=True)
    for key in ("ema", "model"):
        diffs = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not diffs, f"{key} differs after resume: {diffs[:5]}"
    assert "resumed from" in (tmp_path / "split/log.txt").read_text()
    # --resume-step N restarts from that exact checkpoint
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "split", "--max-train-steps", "6",
                                          "--resume-step", "3", *common)))
    c = torch.load(tmp_path / "split/checkpoints/0000006.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])
    aside = list((tmp_path / "split/checkpoints").glob("abandoned-*/0000006.pt"))
    assert len(aside) == 1 and "later checkpoints moved to" in (tmp_path / "split/log.txt").read_text()
    with pytest.raises(FileNotFoundError, match="--resume-step 5"):
        train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "split", "--max-train-steps", "6",
                                              "--resume-step", "5", *common)))


def test_sigkill_then_rerun_finishes_with_intact_checkpoints(data_dir, tmp_path):
    argv = tiny_argv(data_dir, tmp_path, "killed", "--max-train-steps", "12", "--checkpointing-steps", "2",
                     "--keep-last", "3")
    cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    ckpts = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(ckpts.glob("0000004.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next steps or a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert train.main(train.parse_args(argv))["steps"] == 12  # the rerun: in this process, to save a start-up
    assert "resumed from" in (tmp_path / "killed" / "log.txt").read_text()
    pts = sorted(ckpts.glob("*.pt"))
    assert (ckpts / "0000012.pt").is_file() and not list(ckpts.glob(".*.tmp"))
    for f in pts:
        torch.load(f, weights_only=True)  # every file left is complete
    # model + EMA kept at every checkpoint (the original's eval.sh samples from them); optimizer states: keep-last
    assert [f.name for f in pts if f.name[0].isdigit() and ".opt" not in f.name] == [f"{s:07d}.pt" for s in range(2, 13, 2)]
    assert [f.name for f in pts if ".opt" in f.name] == ["0000008.opt.pt", "0000010.opt.pt", "0000012.opt.pt"]


@pytest.mark.slow
def test_two_process_cpu_launch_and_ddp_speed_variants(data_dir, tmp_path):
    """Real 2-process DDP over gloo (accelerate's --cpu flag alone starts one process; its torchrun launcher
    with train.py's cpu fallback does it), one launch for every set of speed flags, 3 steps each; image 0
    is NaN and read by rank 1 only, at step 2 (seed 4). Today's step skips it on both ranks (the clipped
    grad norm is all-reduced); so must --device-skip, bitwise. The DDP options change nothing (with 2 ranks
    an all-reduce is one addition, in any bucketing); the bf16 all-reduce rounds the averaged gradient."""
    import socket
    bad = _nan_copy(data_dir, tmp_path / "data", "one")
    with socket.socket() as s:  # a free port: other tests may run in parallel (pytest -n 2)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    variants = {"today": "", "device-skip": "--device-skip",
                "ddp": "--ddp-bucket-view --ddp-static-graph --ddp-bucket-mb 0.05",
                "bf16-allreduce": "--ddp-bf16-allreduce --device-skip"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", port, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "ddp_variants.py"), str(tmp_path), *(f"{k}={v}" for k, v in variants.items()), "--",
           *tiny_argv(bad, tmp_path, "x", "--max-train-steps", "3", "--checkpointing-steps", "100", "--seed", "4",
                      "--log-every", "3")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in (tmp_path / "today" / "log.txt").read_text()
    assert "step 2: non-finite loss" in (tmp_path / "today" / "log.txt").read_text()
    assert "updates skipped" in (tmp_path / "device-skip" / "log.txt").read_text()  # logged at the interval
    ckpt = {}
    for name in variants:
        run = tmp_path / name
        assert sorted(f.name for f in (run / "checkpoints").glob("[0-9]*.pt")) == ["0000003.opt.pt", "0000003.pt"]
        # rank 0 never read the NaN image, yet skipped: the decision is global
        assert json.loads((run / "result.json").read_text()) == {"skipped": 1, "steps": 3}
        d0, d1 = (json.loads((run / f"digest-rank{r}.json").read_text()) for r in (0, 1))
        assert d0 == d1  # both ranks hold the same weights and EMA after the skip
        ckpt[name] = torch.load(run / "checkpoints" / "0000003.pt", weights_only=True)
        ckpt[name]["opt"] = torch.load(run / "checkpoints" / "0000003.opt.pt", weights_only=True)["opt"]
    ref = ckpt["today"]
    for name in ("device-skip", "ddp"):
        for part in ("model", "ema"):
            assert all(torch.equal(ref[part][k], ckpt[name][part][k]) for k in ref[part]), (name, part)
        state, ref_state = ckpt[name]["opt"]["state"], ref["opt"]["state"]
        assert all(torch.equal(ref_state[i][k], state[i][k]) for i in ref_state for k in ref_state[i]), name
    # bf16 all-reduce: the averaged gradient rounded to bf16 (8 bits of mantissa), 2 updates of Adam at lr 1e-4.
    # Adam moves a weight by about lr per step whatever the gradient's size, so a weight whose tiny gradient
    # changed sign moves up to 2 lr the other way per step: the bound is 4 lr; on average far less.
    diff = torch.cat([(ckpt["bf16-allreduce"]["model"][k] - ref["model"][k]).abs().flatten() for k in ref["model"]])
    assert 0 < diff.max() <= 4e-4 + 1e-7 and diff.mean() < 1e-5, (diff.max(), diff.mean())


@pytest.mark.parametrize("method", ["repa", "sit"])
def test_ablation_modes(data_dir, tmp_path, method):
    extra = ["--max-train-steps", "2", "--method", method]
    if method == "sit":  # the encoder is not even loaded: a bogus weights path is never touched
        extra += ["--enc-weights", str(tmp_path / "does-not-exist.pth")]
    argv = tiny_argv(data_dir, tmp_path, method, *extra)
    result = train.main(train.parse_args(argv))
    config = json.loads((tmp_path / method / "config.json").read_text())
    assert result["steps"] == 2 and not config["use_cls_token"]
    assert config["z_dims"] == ([384] if method == "repa" else [])
    last = result["history"][-1]
    assert last["loss_cls"] == 0 and (last["loss_proj"] == 0) == (method == "sit")


def test_bf16_autocast_training_step(data_dir, tmp_path):
    result = train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "bf16", "--max-train-steps", "2",
                                                   "--mixed-precision", "bf16")))
    assert result["steps"] == 2 and np.isfinite(result["history"][-1]["loss"])


def _nan_copy(data_dir, dest, which):
    shutil.copytree(data_dir, dest)
    files = sorted((dest / "vae-sd").rglob("*.npy"))
    for f in (files if which == "all" else files[:1]):
        a = np.load(f)
        a[:] = np.nan
        np.save(f, a)
    shutil.rmtree(dest / "vae-sd" / "image-hashes")  # not what encode wrote any more: data without its record
    return dest


def test_nan_steps_are_skipped_and_counted(data_dir, tmp_path):
    bad = _nan_copy(data_dir, tmp_path / "data1", "one")
    result = train.main(train.parse_args(tiny_argv(bad, tmp_path, "nan1", "--max-train-steps", "8")))
    assert result["steps"] == 8 and result["skipped"] == 1  # the one poisoned image is met once in 8 x 8 samples
    ckpt = torch.load(tmp_path / "nan1/checkpoints/0000008.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    assert "non-finite loss" in (tmp_path / "nan1/log.txt").read_text()


@pytest.mark.parametrize("extra,stop", [([], 3), (["--device-skip", "--log-every", "4"], 4)])
def test_consecutive_nan_steps_stop_the_run(data_dir, tmp_path, extra, stop):
    """--device-skip knows the skips at the log interval only: the run stops at the first log step after the
    limit (step 4 with --log-every 4), reporting the longest run of skips in that interval."""
    bad = _nan_copy(data_dir, tmp_path / "data2", "all")
    with pytest.raises(RuntimeError, match=f"{stop} consecutive non-finite losses at step {stop}.*--max-bad-steps"):
        train.main(train.parse_args(tiny_argv(bad, tmp_path, "nan2", "--max-train-steps", "8", "--max-bad-steps", "3",
                                              *extra)))


@pytest.mark.parametrize("flags,message", [
    (["--resolution", "30"], "multiple of 16"),
    (["--model", "SiT-Q/2"], "unknown --model"),
    (["--encoder-depth", "7"], r"--encoder-depth must be in \[1, 6\]"),
    (["--method", "sit", "--proj-coeff", "0.5"], "no alignment loss"),
    (["--enc-type", "dinov4-vit-b"], "unknown encoder"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--cfg-prob", "1.5"], "--cfg-prob"),
    (["--prediction", "noise"], "invalid choice"),
])
def test_bad_flags(tmp_path, capsys, flags, message):
    argv = tiny_argv(tmp_path, tmp_path) + flags
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert __import__("re").search(message, capsys.readouterr().err)


def test_missing_data_is_named(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="vae-sd"):
        train.main(train.parse_args(tiny_argv(tmp_path / "nowhere", tmp_path, "x", "--max-train-steps", "1")))


def test_train_sh_passes_every_flag_and_extra_arguments():
    env = {**os.environ, "DRY_RUN": "1", "PRESET": "B", "NUM_GPUS": "4", "NUM_NODES": "2", "NODE_RANK": "1",
           "MAIN_ADDR": "10.0.0.1", "REG_ENC_WEIGHTS": "/w/dinov2_vitb14_pretrain.pth"}
    out = subprocess.run(["bash", str(ROOT / "train.sh"), "--max-train-steps", "5"], env=env,
                         capture_output=True, text=True, check=True).stdout
    for piece in ("--num_processes 8", "--num_machines 2", "--machine_rank 1", "--main_process_ip 10.0.0.1",
                  "--multi_gpu", "--model SiT-B/2", "--proj-coeff 0.5", "--cls 0.03",
                  "--batch-size 256", "--enc-weights /w/dinov2_vitb14_pretrain.pth", "--max-train-steps 5"):
        assert piece in out, piece
    assert out.index("--cls 0.03") < out.index("--max-train-steps 5")  # extra flags come last and win
    # the alignment depth follows the model (the paper's 4 for B, 8 for L/XL) unless given
    assert "--encoder-depth" not in out
    assert [train.parse_args(["--model", m]).encoder_depth for m in ("SiT-B/2", "SiT-L/2", "SiT-XL/2")] == [4, 8, 8]
    assert train.parse_args(["--model", "SiT-B/2", "--encoder-depth", "8"]).encoder_depth == 8
    bad = subprocess.run(["bash", str(ROOT / "train.sh")], env={**env, "PRESET": "Q"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown PRESET" in bad.stderr


def test_sample_grids_and_tensorboard(data_dir, tmp_path):
    argv = tiny_argv(data_dir, tmp_path, "grid", "--max-train-steps", "2", "--sample-every", "2")
    argv[argv.index("--report-to") + 1] = "tensorboard"
    train.main(train.parse_args(argv))
    from PIL import Image
    grid = Image.open(tmp_path / "grid" / "samples" / "0000002.png")
    assert grid.size == (4 * 32, 4 * 32)  # 16 EMA samples decoded by the dataset's (pixel-unshuffle) codec
    assert list((tmp_path / "grid" / "logs").rglob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- integrity

def test_all_skipped_run_logs_no_loss_and_fails(data_dir, tmp_path):
    bad = _nan_copy(data_dir, tmp_path / "data3", "all")
    with pytest.raises(RuntimeError, match="no update was made"):
        train.main(train.parse_args(tiny_argv(bad, tmp_path, "nan3", "--max-train-steps", "4", "--max-bad-steps", "99")))
    lines = [json.loads(l) for l in (tmp_path / "nan3/metrics.jsonl").read_text().splitlines()]
    assert [l["skipped_steps"] for l in lines] == [2, 4]
    assert not any("loss" in l or "grad_norm" in l for l in lines)  # no made-up 0.0
    assert not list((tmp_path / "nan3/checkpoints").glob("*.pt"))


def test_resume_refuses_non_finite_checkpoint(data_dir, tmp_path):
    argv = tiny_argv(data_dir, tmp_path, "poison", "--max-train-steps", "2")
    train.main(train.parse_args(argv))
    path = tmp_path / "poison/checkpoints/0000002.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"]["final_layer.linear.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="0000002.pt.*not finite"):
        train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "poison", "--max-train-steps", "4")))


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path):
    common = ("--checkpointing-steps", "2", "--learning-rate", "1e-3")
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "ref", "--max-train-steps", "6", *common)))
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "cut", "--max-train-steps", "4", *common)))
    newest = tmp_path / "cut/checkpoints/0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    result = train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "cut", "--max-train-steps", "6", *common)))
    log = (tmp_path / "cut/log.txt").read_text()
    assert result["steps"] == 6 and "0000004.pt is unreadable" in log
    assert "newest intact checkpoint" in log and "0000002.pt instead of" in log
    a = torch.load(tmp_path / "ref/checkpoints/0000006.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "cut/checkpoints/0000006.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2, exactly


def test_keep_last_never_prunes_the_new_lineage(data_dir, tmp_path):
    """Over 2/4/6, --resume-step 2 --keep-last 1 --max-train-steps 4 must keep 4, set 6 aside, and a plain
    rerun must then resume from 4."""
    common = ("--checkpointing-steps", "2")
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "lin", "--max-train-steps", "6", *common)))
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "lin", "--max-train-steps", "4", "--resume-step", "2",
                                          "--keep-last", "1", *common)))
    ckpts = tmp_path / "lin/checkpoints"
    assert sorted(f.name for f in ckpts.glob("0*.pt")) == ["0000002.pt", "0000004.opt.pt", "0000004.pt"]
    assert [f.name for f in ckpts.glob("abandoned-*/0*.pt")] != [] and (ckpts / "ema_0000002.safetensors").is_file()
    steps = [json.loads(l)["step"] for l in (tmp_path / "lin/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 4  # the abandoned lineage's lines went aside too
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "lin", "--max-train-steps", "6", *common)))
    assert "resumed from" in (log := (tmp_path / "lin/log.txt").read_text()) and "0000004.pt at step 4" in log
    with pytest.raises(RuntimeError, match="optimizer state of step 2.*pruned.*--init-from"):
        train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "lin", "--max-train-steps", "6", "--resume-step", "2",
                                              *common)))


# ----------------------------------------------------------------------------- resume under gradient accumulation and with
# another process count

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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- the authors' runs and scripts

def test_resume_a_run_of_the_original_code(data_dir, tmp_path):
    """A checkpoint as the authors' train.py writes it: model/ema/opt/steps plus a pickled Namespace, its AdamW
    over model.parameters() (frozen pos_embed included)."""
    import argparse
    args = train.parse_args(tiny_argv(data_dir, tmp_path, "orig", "--max-train-steps", "4"))
    first = train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "seed", "--max-train-steps", "2")))
    ours = torch.load(Path(first["run_dir"]) / "checkpoints/0000002.pt", weights_only=True)
    from reg.loading import build_model_from_config
    model = build_model_from_config(ours["config"])
    model.load_state_dict(ours["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the original: default AdamW, every parameter
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    official = {"model": model.state_dict(), "ema": ours["ema"], "opt": opt.state_dict(),
                "args": argparse.Namespace(model="SiT-T/2", encoder_depth=2), "steps": 2}
    (tmp_path / "orig/checkpoints").mkdir(parents=True)
    torch.save(official, tmp_path / "orig/checkpoints/0000002.pt")
    result = train.main(args)
    log = (tmp_path / "orig/log.txt").read_text()
    assert result["steps"] == 4 and "written by the original REG code" in log and log.count("original REG code") == 1
    resumed = torch.load(tmp_path / "orig/checkpoints/0000004.opt.pt", weights_only=True)["opt"]
    assert 0 not in resumed["state"] and resumed["state"][1]["step"] == 3  # pos_embed (index 0) has no state; the rest carried on


def test_init_from_weights_starts_at_step_zero(data_dir, tmp_path):
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "pre", "--max-train-steps", "2")))
    src = tmp_path / "pre/checkpoints/ema_0000002.safetensors"
    result = train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "ft", "--max-train-steps", "1",
                                                   "--init-from", str(src))))
    assert result["steps"] == 1 and f"initialised model and EMA from {src}" in (tmp_path / "ft/log.txt").read_text()
    from safetensors.torch import load_file
    before = load_file(str(src))
    after = torch.load(tmp_path / "ft/checkpoints/0000001.pt", weights_only=True)
    moved = [k for k in before if not torch.equal(before[k], after["model"][k])]
    assert moved and max((before[k] - after["model"][k]).abs().max().item() for k in before) < 1e-2  # one step away
    opt = torch.load(tmp_path / "ft/checkpoints/0000001.opt.pt", weights_only=True)["opt"]
    assert all(s["step"] == 1 for s in opt["state"].values())  # a fresh optimizer


# The authors' train.sh flags, verbatim (their broken "\  #comment" continuation line removed; values tiny).
ORIGINAL_TRAIN_FLAGS = """--report-to="wandb" --allow-tf32 --mixed-precision="fp16" --seed=0 --path-type="linear"
    --prediction="v" --weighting="uniform" --model="SiT-T/2" --enc-type="dinov2-vit-s" --proj-coeff=0.5
    --encoder-depth=2 --output-dir="{out}" --exp-name="linear-dinov2-b-enc8" --batch-size=8
    --data-dir="{data}" --cls=0.03"""
# Every flag the authors' train.py parser defines, with a value.
ORIGINAL_PARSER_FLAGS = ["--output-dir", "o", "--exp-name", "e", "--logging-dir", "logs", "--report-to", "wandb",
                         "--sampling-steps", "10000", "--resume-step", "0", "--model", "SiT-XL/2", "--num-classes",
                         "1000", "--encoder-depth", "8", "--fused-attn", "--qk-norm", "--ops-head", "16", "--data-dir",
                         "d", "--resolution", "256", "--batch-size", "8", "--allow-tf32", "--mixed-precision", "fp16",
                         "--epochs", "1400", "--max-train-steps", "1000000", "--checkpointing-steps", "10000",
                         "--gradient-accumulation-steps", "1", "--learning-rate", "1e-4", "--adam-beta1", "0.9",
                         "--adam-beta2", "0.999", "--adam-weight-decay", "0.", "--adam-epsilon", "1e-08",
                         "--max-grad-norm", "1.0", "--seed", "0", "--num-workers", "4", "--path-type", "linear",
                         "--prediction", "v", "--cfg-prob", "0.1", "--enc-type", "dinov2-vit-b", "--proj-coeff", "0.5",
                         "--weighting", "uniform", "--legacy", "--cls", "0.03", "--no-fused-attn", "--no-qk-norm",
                         "--no-legacy"]


def test_every_original_flag_parses_with_its_meaning():
    args = train.parse_args(ORIGINAL_PARSER_FLAGS)
    assert (args.sample_every, args.logging_dir, args.checkpointing_steps, args.max_train_steps) == (10000, "logs", 10000, 1_000_000)
    assert (args.mixed_precision, args.report_to, args.legacy, args.fused_attn) == ("fp16", "wandb", False, False)
    defaults = train.parse_args([])
    assert (defaults.checkpointing_steps, defaults.max_train_steps, defaults.cfg_prob, defaults.cls) == (10000, 1_000_000, 0.1, 0.03)


@pytest.mark.slow
def test_original_train_sh_command_runs_and_train_sh_resumes_it(data_dir, tmp_path):
    """The original train.sh's command line runs unchanged; then our train.sh, given the same flags, resumes
    that run (its own flags come first, the user's after them win) and logs to the same wandb run."""
    import shlex
    flags = shlex.split(ORIGINAL_TRAIN_FLAGS.format(out=tmp_path, data=data_dir))
    extra = ["--resolution", "32", "--num-classes", "4", "--enc-weights", "random", "--projector-dim", "64",
             "--num-workers", "0", "--checkpointing-steps", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train.py"), *flags, *extra, "--max-train-steps", "2"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "linear-dinov2-b-enc8"
    ckpt = torch.load(run / "checkpoints/0000002.pt", weights_only=True)  # where the original eval.sh looks
    assert "ema" in ckpt and ckpt["args"]["mixed_precision"] == "fp16"
    # wandb: named after --exp-name, its files under the run folder, and the same run id on resume
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))

    sh_env = {**env, "NUM_GPUS": "1", "PRECISION": "no", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "train.sh"), *flags, *extra, "--max-train-steps", "3"], env=sh_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in (run / "log.txt").read_text()
    assert torch.load(run / "checkpoints/0000003.pt", weights_only=True)["steps"] == 3
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both sessions logged to one run id


@pytest.mark.parametrize("env,message", [({"NUM_GPUS": "0"}, "NUM_GPUS"), ({"NUM_GPUS": "two"}, "NUM_GPUS"),
                                         ({"NUM_NODES": "2", "MAIN_ADDR": ""}, "MAIN_ADDR")])
def test_train_sh_refuses_bad_launch_settings(env, message):
    base = {k: v for k, v in os.environ.items() if k not in ("MAIN_ADDR", "NUM_NODES", "NUM_GPUS")}
    done = subprocess.run(["bash", str(ROOT / "train.sh")], env={**base, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr


# ----------------------------------------------------------------------------- bad samples and FID during training

def test_bad_sample_stops_by_default_and_is_replaced_with_the_flag(data_dir, tmp_path):
    bad = tmp_path / "data4"
    shutil.copytree(data_dir, bad)
    victim = sorted((bad / "imagenet_32_vae").rglob("*.png"))[5]
    victim.write_bytes(b"not a png")
    with pytest.raises(Exception, match=victim.name):
        train.main(train.parse_args(tiny_argv(bad, tmp_path, "stop", "--max-train-steps", "8")))
    result = train.main(train.parse_args(tiny_argv(bad, tmp_path, "skip", "--max-train-steps", "8", "--skip-bad-samples")))
    lines = [json.loads(l) for l in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 8 and sum(l["bad_samples"] for l in lines) == 1  # met once in 8 x 8 of 64 images


def eval_argv(data_dir, out, exp, ref, *extra):
    return tiny_argv(data_dir, out, exp, "--eval-every", "2", "--eval-ref", str(ref), "--eval-samples", "4",
                     "--eval-steps", "2", "--eval-batch-size", "4", "--inception-weights", "random", *extra)


def test_fid_during_training_same_seeds_and_resume_during_an_evaluation(data_dir, tmp_path, eval_ref, monkeypatch):
    from evaluations import during_training
    real_run = during_training.InTrainingEval.run
    calls = []

    def killed_at_step_4(self, ema, step):
        calls.append(step)
        if step == 4 and len(calls) == 2:
            raise KeyboardInterrupt("killed during the evaluation")
        return real_run(self, ema, step)

    monkeypatch.setattr(during_training.InTrainingEval, "run", killed_at_step_4)
    argv = eval_argv(data_dir, tmp_path, "fid", eval_ref, "--max-train-steps", "4")
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args(argv))
    run = tmp_path / "fid"
    assert (run / "checkpoints/0000004.pt").is_file() and (run / "eval_reference.npz").is_file()
    train.main(train.parse_args(argv))  # resumes at 4 and evaluates step 4 before anything else
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and calls == [2, 4, 4]
    from reg.run_log import EVAL_SETTING_KEYS
    from reg.utils import file_sha256
    for r in evals:
        assert r["eval_samples"] == 4 and np.isfinite(r["fid"]) and r["eval_time_s"] > 0
        assert {"sfid", "inception_score", "precision", "recall"} <= set(r)
        # everything the value depends on, the reference by its content
        assert {k: r[k] for k in EVAL_SETTING_KEYS} == {
            "eval_ref_sha256": file_sha256(eval_ref), "eval_mode": "ode", "eval_steps": 2, "eval_cfg": 1.0,
            "eval_cls_cfg": 0.0, "eval_guidance_low": 0.0, "eval_guidance_high": 1.0, "eval_vae": "pixel-unshuffle",
            "eval_samples": 4, "eval_inception": "random", "eval_seed": 0, "eval_dtype": "fp32"}
    # the same per-image seeds at every evaluation: the same model scores the same at any step
    from accelerate import Accelerator

    from reg.loading import load_generator
    args = train.parse_args(argv)
    config = json.loads((run / "config.json").read_text())
    ev = during_training.InTrainingEval(args, config, Accelerator(cpu=True), train.Logger(Accelerator(cpu=True), run))
    ema, *_ = load_generator(str(run / "checkpoints/ema_0000004.safetensors"), decoder=False)
    (ia, fa), (ib, fb) = ev.sample_features(ema), ev.sample_features(ema)
    assert list(ia) == list(ib) == list(range(4)) and all(np.array_equal(fa[k], fb[k]) for k in fa)
    other = copy.deepcopy(ema)
    other.final_layer.linear.bias.data += 0.5  # another model, same seeds: other images
    assert not np.array_equal(ev.sample_features(other)[1]["pool"], fa["pool"])


def test_a_resumed_run_evaluated_under_new_settings_starts_a_new_series(data_dir, tmp_path, eval_ref):
    from evaluations import compare
    argv = eval_argv(data_dir, tmp_path, "series", eval_ref, "--max-train-steps", "4", "--checkpointing-steps", "2")
    train.main(train.parse_args(argv))
    train.main(train.parse_args(argv + ["--eval-steps", "3"]))  # step 4 was evaluated, but not with 3 steps
    evals = [r for r in map(json.loads, (tmp_path / "series/metrics.jsonl").read_text().splitlines()) if "fid" in r]
    assert [(r["step"], r["eval_steps"]) for r in evals] == [(2, 2), (4, 2), (4, 3)]
    rows = compare.compare([str(tmp_path / "series")], str(tmp_path / "cmp"))["rows"]
    assert [(r["eval"], r["fid_curve"]) for r in rows] == [
        ("ode, 2 steps, cfg 1.0, cls-cfg 0.0, 4 samples", [[2, evals[0]["fid"]], [4, evals[1]["fid"]]]),
        ("ode, 3 steps, cfg 1.0, cls-cfg 0.0, 4 samples", [[4, evals[2]["fid"]]])]


def test_a_dead_attempts_metrics_are_set_aside_never_inherited(data_dir, tmp_path, eval_ref):
    run = tmp_path / "dead"
    # an attempt killed before its first checkpoint: its lines (a FID at step 2 among them) but no checkpoint
    train.main(train.parse_args(eval_argv(data_dir, tmp_path, "dead", eval_ref, "--max-train-steps", "2")))
    shutil.rmtree(run / "checkpoints")
    dead = (run / "metrics.jsonl").read_text()
    # a fresh start in that folder, with another learning rate: evaluates step 2 itself and keeps none of those lines
    train.main(train.parse_args(eval_argv(data_dir, tmp_path, "dead", eval_ref, "--max-train-steps", "2",
                                          "--learning-rate", "3e-4")))
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [("fid" in r, r["step"]) for r in lines] == [(False, 2), (True, 2)]
    assert not set((run / "metrics.jsonl").read_text().splitlines()) & set(dead.splitlines())
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert (aside / "metrics.jsonl").read_text() == dead  # moved aside, never deleted


def test_lines_after_the_checkpoint_a_run_resumes_from_are_kept_aside(data_dir, tmp_path):
    argv = tiny_argv(data_dir, tmp_path, "kept", "--max-train-steps", "6", "--checkpointing-steps", "2")
    train.main(train.parse_args(argv))
    run = tmp_path / "kept"
    for f in (run / "checkpoints").glob("*000000[46]*"):  # as if killed before checkpoint 4 was written
        f.unlink()
    later = [l for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] > 2]
    assert [json.loads(l)["step"] for l in later] == [4, 6]
    train.main(train.parse_args(argv))
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert (aside / "metrics.jsonl").read_text().splitlines() == later  # the dead attempt's lines, kept
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6] and "moved to" in (run / "log.txt").read_text()

