#!/usr/bin/env bash
# Generate samples with the paper's settings, then score exactly the npz that generate.py wrote with
# the ADM-equivalent evaluator. Works from any directory.
#
#   CKPT=exps/NAME/checkpoints/4000000.pt REF_BATCH=/data/VIRTUAL_imagenet256_labeled.npz NUM_GPUS=8 bash eval.sh
#   NUM_GPUS=8 bash eval.sh --balanced            # extra arguments go to generate.py
#
# Defaults (REG, ImageNet 256, Table 2): SDE 250 steps, cfg 2.3, class-token cfg 2.3, guidance while
# t <= 0.85, 50K samples, seed 0; model, resolution, VAE and interpolant from the checkpoint. Every
# setting below can be overridden from the environment, and PYTHON names the interpreter (default: python,
# as in train.sh). Multi-node: set LAUNCHER, e.g.
#   LAUNCHER="torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500"
# and REPORT_DIR, a folder every node sees (default: TMPDIR or /tmp, this node's own).
# Outputs, in SAMPLE_DIR: RUN/ (PNGs), RUN.npz, RUN.json (settings) and RUN-metrics.json (FID, sFID,
# IS, precision, recall); RUN is the original generate.py's name unless RUN_NAME is set. Re-running
# resumes the sampling.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

CKPT=${CKPT:-hf:Martinser/REG}
REF_BATCH=${REF_BATCH:-VIRTUAL_imagenet256_labeled.npz}
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-}           # empty: inferred from the checkpoint (checked when given)
RESOLUTION=${RESOLUTION:-} # empty: inferred from the checkpoint
MODE=${MODE:-sde}
NUM_STEPS=${NUM_STEPS:-250}
CFG_SCALE=${CFG_SCALE:-2.3}
CLS_CFG_SCALE=${CLS_CFG_SCALE:-2.3}
GUIDANCE_LOW=${GUIDANCE_LOW:-0.0}
GUIDANCE_HIGH=${GUIDANCE_HIGH:-0.85}
NUM_FID_SAMPLES=${NUM_FID_SAMPLES:-50000}
PER_PROC_BATCH_SIZE=${PER_PROC_BATCH_SIZE:-64}
GLOBAL_SEED=${GLOBAL_SEED:-0}
PATH_TYPE=${PATH_TYPE:-}   # empty: the checkpoint's interpolant (linear for the official weights)
VAE=${VAE:-}               # empty: the checkpoint's VAE (ema for the official weights)
PRECISION=${PRECISION:-fp32}
SAMPLE_DIR=${SAMPLE_DIR:-samples}
RUN_NAME=${RUN_NAME:-}     # empty: generate.py's name (the original's)
SKIP_EVAL=${SKIP_EVAL:-0}  # 1: only generate
PY=${PYTHON:-python}       # the interpreter of both commands (as in train.sh)

if ! [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "eval.sh: NUM_GPUS=$NUM_GPUS is not a positive integer" >&2
    exit 1
fi
if [[ "$SKIP_EVAL" != 1 && ! -f "$REF_BATCH" ]]; then
    ref_name=$(cd "$ROOT" && "$PY" -c "from reg.prefetch import REF_BATCH_FILES; print(REF_BATCH_FILES[${RESOLUTION:-256}])" \
               2>/dev/null) || ref_name="ADM's VIRTUAL_imagenet*.npz"  # ADM's names (the 512 one has no _labeled)
    echo "eval.sh: reference batch REF_BATCH=$REF_BATCH not found (get $ref_name from openai/guided-diffusion's" \
         "evaluations page, or with $PY -m reg.prefetch --ref-batch ${RESOLUTION:-256}), or set SKIP_EVAL=1" >&2
    exit 1
fi

if [[ -n "${LAUNCHER:-}" ]]; then
    read -r -a launch <<< "$LAUNCHER"
elif (( NUM_GPUS > 1 )); then
    launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS")  # = torchrun, in $PY
else
    launch=("$PY")
fi

gen_args=(
    --ckpt "$CKPT"
    --mode "$MODE"
    --num-steps "$NUM_STEPS"
    --cfg-scale "$CFG_SCALE"
    --cls-cfg-scale "$CLS_CFG_SCALE"
    --guidance-low "$GUIDANCE_LOW"
    --guidance-high "$GUIDANCE_HIGH"
    --num-fid-samples "$NUM_FID_SAMPLES"
    --per-proc-batch-size "$PER_PROC_BATCH_SIZE"
    --global-seed "$GLOBAL_SEED"
    --precision "$PRECISION"
    --sample-dir "$SAMPLE_DIR"
)
[[ -n "$RUN_NAME" ]] && gen_args+=(--run-name "$RUN_NAME")
[[ -n "$VAE" ]] && gen_args+=(--vae "$VAE")
[[ -n "$MODEL" ]] && gen_args+=(--model "$MODEL")
[[ -n "$RESOLUTION" ]] && gen_args+=(--resolution "$RESOLUTION")
[[ -n "$PATH_TYPE" ]] && gen_args+=(--path-type "$PATH_TYPE")

# generate.py writes the path of the npz it made here: extra arguments (--sample-dir, --cfg-scale, ...)
# change that name, and the evaluator must score exactly that file. Its rank 0 writes it, on whichever node
# the launcher put rank 0 (torchrun's c10d ranks nodes by host name), so with several nodes REPORT_DIR must
# be a folder every node sees (slurm/eval.sbatch sets it).
npz_file=$(mktemp "${REPORT_DIR:-${TMPDIR:-/tmp}}/eval-sh-npz.XXXXXX")
trap 'rm -f "$npz_file"' EXIT
"${launch[@]}" "$ROOT/generate.py" "${gen_args[@]}" "$@" --npz-path-file "$npz_file"
NPZ=$(cat "$npz_file")
if [[ -z "$NPZ" || ! -f "$NPZ" ]]; then
    echo "eval.sh: generate.py did not report the npz it wrote (got '${NPZ}')" >&2
    exit 1
fi
echo "samples: $NPZ"

if [[ "$SKIP_EVAL" != 1 ]]; then
    METRICS="${NPZ%.npz}-metrics.json"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m evaluations.evaluator \
        --ref_batch "$REF_BATCH" \
        --sample_batch "$NPZ" \
        --save-path "$METRICS"
    echo "metrics: $METRICS"
fi
