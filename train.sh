#!/usr/bin/env bash
# Train SiT + REG with the paper's settings (batch 256, AdamW 1e-4, EMA 0.9999, linear path,
# v-prediction, uniform t, DINOv2-B, proj-coeff 0.5, cls 0.03; arXiv 2507.01467, Sec. 4.1).
#
#   bash train.sh                                   # SiT-XL/2 + REG, 4M steps, on one 8-GPU node: FID 1.36
#   PRESET=B bash train.sh                          # SiT-B/2 + REG, 400K steps; extra flags go to train.py (and win)
#   NUM_NODES=4 NODE_RANK=$RANK MAIN_ADDR=$MASTER_ADDR bash train.sh   # on every node
#
# Each preset trains one row of the paper (v2; ImageNet 256, FID-50K; "guided": SDE 250 steps, cfg 2.3 on the
# latents and the class token while t <= 0.85, i.e. eval.sh; "unguided": cfg 1):
#   XL  SiT-XL/2 + REG, 4M steps = 800 epochs: guided FID 1.36 (the system-level comparison with guidance),
#       unguided 1.8. Its checkpoints on the way are the shorter XL rows: 0400000.pt is 80 epochs (guided 1.86,
#       unguided 3.4), 0200000.pt unguided 5.0, 1000000.pt unguided 2.7 (nothing else depends on the length).
#   L   SiT-L/2 + REG, 400K steps: unguided FID 4.6 (the comparison without guidance at 400K iterations).
#   B   SiT-B/2 + REG, 400K steps: unguided FID 15.2 (the same comparison).
# train.py aligns block 4 for B and 8 for L/XL, as the paper.
#
# Environment: PRESET (XL|L|B), NUM_GPUS (per node), NUM_NODES, NODE_RANK, MAIN_ADDR, MAIN_PORT,
# DATA_DIR, OUTPUT_DIR, EXP_NAME, PRECISION (bf16|fp16|no), REPORT_TO (tensorboard|wandb|none),
# REG_ENC_WEIGHTS (local DINOv2 weights for offline clusters), PYTHON (the interpreter, default python),
# DRY_RUN=1 (print the command only).
# Re-running the same command resumes from the newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-XL}
case "$PRESET" in
  XL) MODEL=SiT-XL/2; STEPS=4000000 ;;
  L)  MODEL=SiT-L/2;  STEPS=400000 ;;
  B)  MODEL=SiT-B/2;  STEPS=400000 ;;
  *)  echo "train.sh: unknown PRESET=$PRESET (use XL, L or B)" >&2; exit 2 ;;
esac
NUM_GPUS=${NUM_GPUS:-8}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
for var in NUM_GPUS NUM_NODES; do
  if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    echo "train.sh: $var must be a positive integer, got '${!var}'" >&2; exit 2
  fi
done
if (( NUM_NODES > 1 )) && [[ -z "${MAIN_ADDR:-}" ]]; then
  # without it every node would wait for a rendezvous on its own loopback address, forever
  echo "train.sh: NUM_NODES=$NUM_NODES needs MAIN_ADDR, the address of the node with NODE_RANK=0" >&2; exit 2
fi
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-exps}
EXP_NAME=${EXP_NAME:-${MODEL//\//-}-reg-linear-dinov2-b}
PRECISION=${PRECISION:-bf16}
REPORT_TO=${REPORT_TO:-tensorboard}

# Flags live in an array, one per line: no line-continuation backslashes, so no comment can cut the
# list short (the original train.sh lost every flag after "--encoder-depth=4 \   #comment").
flags=(
  --report-to "$REPORT_TO"
  --allow-tf32
  --mixed-precision "$PRECISION"
  --seed 0
  --path-type linear
  --prediction v
  --weighting uniform
  --model "$MODEL"
  --enc-type dinov2-vit-b
  --proj-coeff 0.5
  --output-dir "$OUTPUT_DIR"
  --exp-name "$EXP_NAME"
  --batch-size 256
  --data-dir "$DATA_DIR"
  --cls 0.03
  --max-train-steps "$STEPS"
)
if [[ -n "${REG_ENC_WEIGHTS:-}" ]]; then flags+=(--enc-weights "$REG_ENC_WEIGHTS"); fi

total=$((NUM_GPUS * NUM_NODES))
# accelerate's launcher itself: the `accelerate` command first imports its model-size estimator, which
# imports timm and torchvision (4-6 s on a CPU) before anything starts. Same parser, same flags.
launch=("${PYTHON:-python}" -m accelerate.commands.launch --num_machines "$NUM_NODES" --num_processes "$total"
        --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --dynamo_backend no)
if (( total > 1 )); then launch+=(--multi_gpu); fi

cmd=("${launch[@]}" train.py "${flags[@]}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
