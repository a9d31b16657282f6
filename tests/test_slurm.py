"""reg/slurm.py and the slurm/ recipes: srun with several tasks and no launcher is refused before anything is
written; train.sbatch and eval.sbatch launch once per node with the job's CPUs and requeue the job when the
command stops on a signal (fake srun/scontrol/launchers record what they receive)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import generate
import train
from reg import slurm

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def fake_slurm(tmp_path):
    """Fake srun / scontrol / accelerate / python that append their command lines to a log: srun runs the
    per-node command once per node (SLURM_NODEID set per task) as SLURM would; the launchers "stop" like a
    command on a signal when FAKE_STOP is set (status 75 into REG_STOP_FILE, status 1 through the launcher)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stop = 'if [ -n "$FAKE_STOP" ]; then echo 75 > "$REG_STOP_FILE"; exit 1; fi'
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
    (bin_dir / "accelerate").write_text(f"""#!/bin/bash
echo "accelerate $* USR1=$(trap -p USR1)" >> {log}
{stop}
""")
    # python: torchrun (-m torch.distributed.run) "writes" the npz and reports it, as generate.py does
    (bin_dir / "python").write_text(f"""#!/bin/bash
echo "python $* USR1=$(trap -p USR1)" >> {log}
if [ "$2" = torch.distributed.run ]; then
  {stop}
  while [ $# -gt 0 ]; do [ "$1" = --npz-path-file ] && echo "$SAMPLE_DIR/run.npz" > "$2"; shift; done
  touch "$SAMPLE_DIR/run.npz"
fi
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-c]", "GPUS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(tmp_path),
           "REG_ROOT": str(ROOT), "SLURM_CPUS_PER_TASK": "24"}

    def run(script: str, *args: str, **extra_env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        if log.exists():
            log.unlink()
        path = ROOT / "slurm" / script
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        done = subprocess.run(["bash", str(path), *args], env={**env, **extra_env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        assert not list(tmp_path.glob(".reg-stop-*")), "the stop file is removed"
        return done, calls
    return run


def test_sbatch_script_launches_once_per_node_and_requeues_on_stop(fake_slurm):
    done, calls = fake_slurm("train.sbatch", "--model", "SiT-XL/2", "--exp-name", "a b")
    assert done.returncode == 0, done.stderr + "\n".join(calls)
    launches = [line for line in calls if line.startswith("accelerate launch")]
    # one task per node, with the node's CPUs (srun no longer inherits sbatch's --cpus-per-task)
    srun = [c for c in calls if c.startswith("srun")]
    assert len(srun) == 1 and srun[0].startswith(
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=24 bash {ROOT}/slurm/task.sh bash -c ")
    assert len(launches) == 2
    for node in (0, 1):
        assert (f"--multi_gpu --num_machines 2 --num_processes 8 --machine_rank {node} --main_process_ip gpu-a "
                f"--main_process_port 20042 {ROOT}/train.py --model SiT-XL/2 --exp-name a b") in launches[node]
        assert launches[node].endswith("USR1=trap -- '' SIGUSR1")  # the launcher ignores it; train.py handles it
    assert not any("requeue" in c for c in calls)
    done, calls = fake_slurm("train.sbatch", "--exp-name", "x", FAKE_STOP="1")
    assert "scontrol requeue 42" in calls and done.returncode == 0, done.stderr
    done, calls = fake_slurm("train.sbatch", SLURM_NNODES="1", GPUS_PER_NODE="1", SLURM_CPUS_PER_TASK="")
    assert done.returncode == 0 and "--multi_gpu" not in calls[-1]
    assert "--cpus-per-task" not in next(c for c in calls if c.startswith("srun"))  # none asked: none passed on


def test_eval_sbatch_samples_on_every_node_then_scores_and_requeues_on_stop(fake_slurm, tmp_path):
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    ref.write_bytes(b"ref")
    samples = tmp_path / "samples"
    samples.mkdir()
    env = dict(CKPT="hf:Martinser/REG/ckpt.pt", REF_BATCH=str(ref), SAMPLE_DIR=str(samples))
    done, calls = fake_slurm("eval.sbatch", "--mode", "unipc", "--num-steps", "20", **env)
    assert done.returncode == 0, done.stderr + "\n".join(calls)
    srun = [c for c in calls if c.startswith("srun")]
    torchrun = [c for c in calls if c.startswith("python -m torch.distributed.run")]
    assert len(srun) == 1 and srun[0].startswith(
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=24 bash {ROOT}/slurm/task.sh python -m "
        "torch.distributed.run --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint gpu-a:20042 "
        f"--rdzv_id 42 {ROOT}/generate.py --ckpt hf:Martinser/REG/ckpt.pt --mode sde --num-steps 250 --cfg-scale 2.3 ")
    assert len(torchrun) == 2  # one launcher a node
    for line in torchrun:
        assert " --num-fid-samples 50000 " in line and " --mode unipc --num-steps 20 --npz-path-file " in line
        # rank 0 may run on another node than this script: its report goes to the shared submit folder
        assert f" --npz-path-file {tmp_path}/eval-sh-npz." in line, line
        assert line.endswith("USR1=trap -- '' SIGUSR1")
    # then the evaluator, once, on this node, scoring exactly the npz generate.py reported
    assert calls[-1] == (f"python -m evaluations.evaluator --ref_batch {ref} --sample_batch {samples}/run.npz "
                         f"--save-path {samples}/run-metrics.json USR1=")
    assert not any("requeue" in c for c in calls)

    done, calls = fake_slurm("eval.sbatch", **env, FAKE_STOP="1")  # a signal during sampling: requeued, not scored
    assert done.returncode == 0 and "scontrol requeue 42" in calls, done.stderr
    assert not any("evaluations.evaluator" in c for c in calls)
    done, calls = fake_slurm("eval.sbatch", **{**env, "REF_BATCH": str(tmp_path / "missing.npz")})
    assert done.returncode == 1 and not any(c.startswith("srun") for c in calls)  # checked before any sampling
