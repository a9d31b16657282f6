"""reg/slurm.py and slurm/train.sbatch: srun with several tasks and no launcher is refused before anything is
written; the sbatch script launches once per node and requeues the job when the run stops on a signal."""
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
