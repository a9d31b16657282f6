"""cluster.py: one writer per folder (train, encode, generate), SLURM launch checks, stop signals, the sbatch
script. The end-to-end cases run the real entry points on CPU with tiny settings."""
import json
import multiprocessing
import os
import signal
import socket
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
from reg import folder_lock, slurm, stop_signals

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from reg import folder_lock; folder_lock.hold_folder(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def start_holder(folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a running train/encode would), until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def fabricate_lock(folder, *, host="node-other", age_s=0.0, pid=12345, token="t0"):
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    info = {"host": host, "pid": pid, "started": now - age_s - 60, "heartbeat": now - age_s,
            "command": "python train.py --exp-name x", "token": token}
    (folder / folder_lock.LOCK_NAME).write_text(json.dumps(info))
    os.utime(folder / folder_lock.LOCK_NAME, (now - age_s, now - age_s))


# ----------------------------------------------------------------------------- the lock itself

def test_lock_excludes_names_the_holder_and_releases_only_its_own(tmp_path):
    with folder_lock.FolderLock(tmp_path / "f") as first:
        with pytest.raises(folder_lock.FolderBusy) as e:
            folder_lock.FolderLock(tmp_path / "f").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        assert "started 20" in msg and "command: " in msg and isinstance(e.value, ValueError)  # a UserError
        assert first.still_mine()
    assert not (tmp_path / "f" / folder_lock.LOCK_NAME).exists()
    # a lock that was taken over by another process is never removed by the one that lost it
    lost = folder_lock.FolderLock(tmp_path / "g")
    lost.acquire()
    fabricate_lock(tmp_path / "g", token="someone-else")
    lost.release()
    assert json.loads((tmp_path / "g" / folder_lock.LOCK_NAME).read_text())["token"] == "someone-else"


def test_stale_locks_other_host_by_heartbeat_same_host_by_pid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REG_LOCK_TIMEOUT", "100")
    fabricate_lock(tmp_path / "fresh", age_s=30)
    with pytest.raises(folder_lock.FolderBusy, match="host node-other, pid 12345.*heartbeat 30 s ago"):
        folder_lock.FolderLock(tmp_path / "fresh").acquire()
    fabricate_lock(tmp_path / "old", age_s=150)
    with folder_lock.FolderLock(tmp_path / "old") as lock:
        assert lock.still_mine()
    assert "heartbeat is 150 s old (REG_LOCK_TIMEOUT 100 s)" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fabricate_lock(tmp_path / "dead", host=socket.gethostname(), pid=int(done.stdout))  # fresh heartbeat, no process
    with folder_lock.FolderLock(tmp_path / "dead"):
        pass
    assert f"process {int(done.stdout)} no longer exists on this host" in capsys.readouterr().err
    # a requeued SLURM job replaces its own earlier run's lock at once
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    info = {"host": "node-other", "pid": 1, "heartbeat": time.time(), "token": "x", "slurm_job": "77", "slurm_restart": 0}
    assert "earlier run of this requeued SLURM job" in folder_lock.stale_reason(info)


def _race(folder, barrier, results):
    barrier.wait()
    try:
        lock = folder_lock.FolderLock(folder)
        lock.acquire()
        results.put("won")
        time.sleep(1.0)  # hold it while the others decide
        lock.release()
    except folder_lock.FolderBusy:
        results.put("busy")


def test_processes_racing_to_replace_one_stale_lock_one_wins(tmp_path):
    fabricate_lock(tmp_path / "f", age_s=10_000)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "f", barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["busy"] * 5 + ["won"]
    assert not list((tmp_path / "f").iterdir())  # no lock and no set-aside leftovers
    # the slow loser's case, made deterministic: it judged the stale lock "t0" but finds a fresh one in its place
    fabricate_lock(tmp_path / "g", host=socket.gethostname(), pid=os.getpid(), token="fresh")
    assert folder_lock.FolderLock(tmp_path / "g")._displace("t0") is None
    assert [p.name for p in (tmp_path / "g").iterdir()] == [folder_lock.LOCK_NAME]
    assert json.loads((tmp_path / "g" / folder_lock.LOCK_NAME).read_text())["token"] == "fresh"  # put back untouched


# ----------------------------------------------------------------------------- encode: the FileNotFoundError race

def test_second_encode_into_a_held_dest_fails_and_touches_nothing(data_dir, tmp_path, capsys):
    dest = tmp_path / "vae-sd"
    argv = ["encode", "--source", str(data_dir / "imagenet_32_vae"), "--dest", str(dest), "--model-url",
            "pixel-unshuffle", "--batch-size", "32", "--num-workers", "0"]
    holder = start_holder(dest)
    try:
        inflight = dest / "00000" / ".img-mean-std-00000003.npy.abc123.tmp"  # the holder's write in progress
        inflight.parent.mkdir(parents=True)
        inflight.write_bytes(b"half")
        before = sorted(p.name for p in dest.rglob("*"))
        start = time.time()
        with pytest.raises(folder_lock.FolderBusy, match=f"pid {holder.pid}.*choose another --dest"):
            dataset_tools.main(dataset_tools.parse_args(argv))
        assert time.time() - start < 20 and inflight.exists() and sorted(p.name for p in dest.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder was SIGKILLed: the rerun takes over with a warning, and only now its temporary is removed
    dataset_tools.main(dataset_tools.parse_args(argv))
    assert f"process {holder.pid} no longer exists" in capsys.readouterr().err
    assert not inflight.exists() and len(list(dest.rglob("*.npy"))) == 64
    assert not (dest / folder_lock.LOCK_NAME).exists()


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


# ----------------------------------------------------------------------------- SLURM

@pytest.mark.parametrize("module,argv,launcher", [
    (train, ["--output-dir", "OUT"], "accelerate launch --multi_gpu --num_machines 1 --num_processes 2"),
    (generate, ["--ckpt", "x.pt"], "torchrun --nnodes 1 --nproc-per-node 2"),
])
def test_srun_with_several_tasks_and_no_launcher_is_refused(monkeypatch, tmp_path, module, argv, launcher):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(slurm.SlurmLaunchError) as e:
        module.main(module.parse_args(argv))
    msg = str(e.value)
    assert "2 separate tasks" in msg and "srun --ntasks-per-node=1 bash -c '" in msg and launcher in msg
    assert msg.endswith(f"bash {' '.join(argv)}") or "sbatch slurm/train.sbatch" in msg
    assert not list(tmp_path.iterdir())  # refused before anything is written
    monkeypatch.setenv("WORLD_SIZE", "2")  # under a launcher: fine
    assert slurm.slurm_launch_problem(module.__name__) is None


def test_sbatch_script_launches_once_per_node_and_requeues_on_stop(tmp_path):
    script = ROOT / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # fake srun: runs the per-node command once per node, as SLURM would (SLURM_NODEID set per task)
    (bin_dir / "srun").write_text(f"""#!/bin/bash
echo "srun $*" >> {log}
while [[ "$1" == --* ]]; do shift; done
status=0
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || status=$?; done
exit $status
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "scontrol $*" >> {log}
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a\\ngpu-b\\ngpu-c\\n'; fi
""")
    # fake accelerate: records its command line; "stops" like train.py on a signal when asked to
    (bin_dir / "accelerate").write_text(f"""#!/bin/bash
echo "accelerate $* USR1=$(trap -p USR1)" >> {log}
if [ -n "$FAKE_STOP" ]; then echo 75 > "$REG_STOP_FILE"; exit 1; fi
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-c]", "GPUS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(tmp_path), "REG_ROOT": str(ROOT)}
    done = subprocess.run(["bash", str(script), "--model", "SiT-XL/2", "--exp-name", "a b"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text()
    assert done.returncode == 0, done.stderr + calls
    launches = [line for line in calls.splitlines() if line.startswith("accelerate launch")]
    assert "srun --ntasks-per-node=1" in calls and len(launches) == 2
    for node in (0, 1):
        assert (f"--multi_gpu --num_machines 2 --num_processes 8 --machine_rank {node} --main_process_ip gpu-a "
                f"--main_process_port 20042 {ROOT}/train.py --model SiT-XL/2 --exp-name a b") in launches[node]
        assert launches[node].endswith("USR1=trap -- '' SIGUSR1")  # the launcher ignores it; train.py handles it
    assert "requeue" not in calls
    log.unlink()
    done = subprocess.run(["bash", str(script), "--exp-name", "x"], env={**env, "FAKE_STOP": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert "scontrol requeue 42" in log.read_text() and done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".reg-stop-*"))
    one = subprocess.run(["bash", str(script)], env={**env, "SLURM_NNODES": "1", "GPUS_PER_NODE": "1"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert one.returncode == 0 and "--multi_gpu" not in log.read_text().splitlines()[-1]


# ----------------------------------------------------------------------------- stop signals, end to end

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
    assert sorted(run_two_processes(_step_loop)) == [(0, 9), (1, 9)]  # flag at 6, agreed at 8, read at 9  # flag at 6, agreed at 8, read at 9



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
