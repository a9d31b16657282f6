# What slurm/train.sbatch and slurm/eval.sbatch share, sourced by both (docs/cluster.md#slurm).
# The first part is yours: edit it once for your cluster. The second reads the allocation.

# ----------------------------------------------------------------------------- your environment
# sbatch passes on the environment it was submitted from (a venv or conda env active at submission is
# active here). Otherwise set it up here, e.g.:
#   module load cuda/12.4 python/3.11
#   source "$HOME/venvs/reg/bin/activate"        # or: eval "$(conda shell.bash hook)"; conda activate reg
#   export HF_HOME=/shared/$USER/hf TORCH_HOME=/shared/$USER/torch   # the caches `python -m reg.prefetch` filled
#   export HF_HUB_OFFLINE=1                      # compute nodes without internet
# NCCL, when the multi-node rendezvous or the collectives hang or are slow:
#   export NCCL_DEBUG=WARN                       # INFO prints the transport each link uses
#   export NCCL_SOCKET_IFNAME=ib0                # the interface between nodes (default: NCCL picks one)
#   export NCCL_IB_HCA=mlx5                      # which InfiniBand adapters to use
#   export NCCL_IB_DISABLE=1                     # no InfiniBand: TCP sockets only

# ----------------------------------------------------------------------------- the allocation
REG_ROOT=${REG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
EXIT_STOPPED=75  # reg.stop_signals.EXIT_STOPPED
NNODES=${SLURM_NNODES:-1}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
(( GPUS_PER_NODE > 0 )) || GPUS_PER_NODE=1
NUM_PROCESSES=$(( NNODES * GPUS_PER_NODE ))
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
# One task per node, holding the node's CPUs: since SLURM 22.05 srun no longer inherits sbatch's
# --cpus-per-task, and without it the launcher, every rank and their loader workers share one core.
SRUN_ARGS=(--ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# Launchers turn a worker's exit status into 1: a command stopped by a signal also writes its status here.
export REG_STOP_FILE="${SLURM_SUBMIT_DIR:-$PWD}/.reg-stop-${SLURM_JOB_ID:-0}"
rm -f "$REG_STOP_FILE"
export NNODES GPUS_PER_NODE NUM_PROCESSES MAIN_ADDR MAIN_PORT REG_ROOT
echo "${SLURM_JOB_NAME:-reg}: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x" \
     "$GPUS_PER_NODE GPU(s), ${SLURM_CPUS_PER_TASK:-?} CPUs a node, rendezvous $MAIN_ADDR:$MAIN_PORT"

# finish STATUS: requeue the job when the command stopped on a signal (it resumes when the job restarts),
# else exit with STATUS.
finish() {
  if [[ $1 -eq $EXIT_STOPPED || -s "$REG_STOP_FILE" ]]; then
    rm -f "$REG_STOP_FILE"
    echo "${SLURM_JOB_NAME:-reg}: stopped on a signal after saving its work; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$1"
}
