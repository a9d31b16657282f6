#!/bin/bash
# Runs one SLURM task's launcher (accelerate launch, torchrun) with SIGUSR1 ignored: SLURM's --signal=USR1
# reaches every process of the step, and would kill the launcher. Its children inherit the ignore until the
# command itself (train.py, generate.py) installs its handler, which saves its work and exits with status 75.
trap "" USR1
exec "$@"
