#!/usr/bin/env bash
# Generate samples with the paper's settings, then score them with the ADM-equivalent evaluator.
#
#   CKPT=exps/NAME/checkpoints/4000000.pt REF_BATCH=/data/VIRTUAL_imagenet256_labeled.npz NUM_GPUS=8 bash eval.sh
#   NUM_GPUS=8 bash eval.sh --balanced            # extra arguments go to generate.py
#
# Defaults (REG, ImageNet 256, Table 2): SiT-XL/2, SDE 250 steps, cfg 2.3, class-token cfg 2.3,
# guidance while t <= 0.85, 50K samples, seed 0. Every setting below can be overridden from the
# environment. Multi-node: set LAUNCHER, e.g.
#   LAUNCHER="torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500"
# Outputs, in SAMPLE_DIR: RUN_NAME/ (PNGs), RUN_NAME.npz, RUN_NAME.json (settings) and
# RUN_NAME-metrics.json (FID, sFID, IS, precision, recall). Re-running resumes the sampling.
set -euo pipefail

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
SKIP_EVAL=${SKIP_EVAL:-0}  # 1: only generate
CKPT_NAME=$(basename "${CKPT%.*}")
RUN_NAME=${RUN_NAME:-${CKPT_NAME}-${MODE}-${NUM_STEPS}-cfg-${CFG_SCALE}-clscfg-${CLS_CFG_SCALE}-gl-${GUIDANCE_LOW}-gh-${GUIDANCE_HIGH}-seed-${GLOBAL_SEED}}

if [[ "$SKIP_EVAL" != 1 && ! -f "$REF_BATCH" ]]; then
    echo "eval.sh: reference batch REF_BATCH=$REF_BATCH not found (get VIRTUAL_imagenet${RESOLUTION:-256}_labeled.npz" \
         "from openai/guided-diffusion's evaluations page), or set SKIP_EVAL=1" >&2
    exit 1
fi

if [[ -n "${LAUNCHER:-}" ]]; then
    read -r -a launch <<< "$LAUNCHER"
elif (( NUM_GPUS > 1 )); then
    launch=(torchrun --standalone --nproc_per_node "$NUM_GPUS")
else
    launch=(python)
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
    --run-name "$RUN_NAME"
)
[[ -n "$VAE" ]] && gen_args+=(--vae "$VAE")
[[ -n "$MODEL" ]] && gen_args+=(--model "$MODEL")
[[ -n "$RESOLUTION" ]] && gen_args+=(--resolution "$RESOLUTION")
[[ -n "$PATH_TYPE" ]] && gen_args+=(--path-type "$PATH_TYPE")

"${launch[@]}" generate.py "${gen_args[@]}" "$@"

if [[ "$SKIP_EVAL" != 1 ]]; then
    python -m evaluations.evaluator \
        --ref_batch "$REF_BATCH" \
        --sample_batch "$SAMPLE_DIR/$RUN_NAME.npz" \
        --save-path "$SAMPLE_DIR/$RUN_NAME-metrics.json"
    echo "metrics: $SAMPLE_DIR/$RUN_NAME-metrics.json"
fi
