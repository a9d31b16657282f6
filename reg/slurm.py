"""SLURM launch checks: `srun --ntasks N python X.py` without a launcher would start N independent copies
of one run, all writing the same folders. Refused, with the command that works (docs/cluster.md)."""
from __future__ import annotations

import os
import shlex
import sys

from reg.utils import UserError, env_int


class SlurmLaunchError(UserError):
    """Started by srun as several independent tasks instead of through a launcher."""


# ----------------------------------------------------------------------------- SLURM

def slurm_launch_problem(command: str, launcher: str = "accelerate", env: dict | None = None) -> str | None:
    """A message when srun started several tasks that do not form one distributed job, else None."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" not in env or any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    # the step's counts, else the job's; a malformed value is a UserError naming the variable
    tasks_var = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS", "").strip() else "SLURM_NTASKS"
    tasks = env_int(tasks_var, 1, minimum=1, env=env)
    if tasks <= 1:
        return None
    nodes_var = "SLURM_STEP_NUM_NODES" if env.get("SLURM_STEP_NUM_NODES", "").strip() else "SLURM_NNODES"
    nodes = env_int(nodes_var, 1, minimum=1, env=env)
    per_node = max(tasks // nodes, 1)
    args = shlex.join(sys.argv[1:])
    if launcher == "torchrun":
        inner = (f"exec torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank $SLURM_NODEID "
                 f"--master-addr $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) --master-port 29500 "
                 f"{command} \"$@\"")
    else:
        multi = "--multi_gpu " if tasks > 1 else ""
        inner = (f"exec accelerate launch {multi}--num_machines {nodes} --num_processes {tasks} --machine_rank "
                 f"$SLURM_NODEID --main_process_ip $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) "
                 f"--main_process_port 29500 {command} \"$@\"")
    return (f"{command}: srun started {tasks} separate tasks (SLURM_PROCID set, no RANK/WORLD_SIZE/LOCAL_RANK): they "
            f"would be {tasks} independent runs writing the same folders. Start one launcher per node instead: "
            f"srun --ntasks-per-node=1 bash -c '{inner}' bash {args}" + (
                " (or: sbatch slurm/train.sbatch ...)" if command.endswith("train.py") else ""))


def check_slurm_launch(command: str, launcher: str = "accelerate") -> None:
    if (problem := slurm_launch_problem(command, launcher)) is not None:
        raise SlurmLaunchError(problem)
