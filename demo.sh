#!/usr/bin/env bash
# Offline quick start: the whole REG pipeline, with tiny settings, on a laptop CPU, in a few minutes.
#
#   bash demo.sh                      # ~4 min on 2 CPU cores; demo_out/
#   DEMO_STEPS=8 DEMO_BATCH=16 DEMO_SAMPLES=16 DEMO_REF=8 DEMO_CLASSES=4 bash demo.sh   # smoke run (~1.5 min)
#   DEMO_DRY_RUN=1 bash demo.sh       # only print the settings and which weights would be used
#
# Stages, each through the real entry point (no toy code paths):
#   1 data      python -m preprocessing.synthetic         coloured shapes, class k = shape k%8 in colour k%7
#               + the reference batch for the evaluator    (an npz of the first DEMO_REF training images)
#   2 encode    preprocessing/dataset_tools.py encode      pixel-unshuffle-lowpass codec (weight-free: 2x2 average +
#                                                          space-to-depth, 48 channels; demo only), or DEMO_VAE
#   3 train     accelerate launcher + train.py             SiT-T/2 + REG with a DINOv2-S encoder, FID during training
#   4 baseline  the same, train.py --method sit            the plain SiT baseline (no encoder), the same evaluations
#   5 sample    generate.py                                SDE sampler with CFG -> npz + grid PNG + JSON
#   6 evaluate  python -m evaluations.evaluator            FID / sFID / IS / precision / recall -> JSON
#   7 compare   python -m evaluations.compare              the two runs side by side: table + FID/loss figure
#   8 plot      python -m evaluations.plot_losses          the loss terms over the training steps -> PNG
#
# Pretrained weights are used when they are already on this machine (nothing is downloaded):
#   DINOv2-S  REG_ENC_WEIGHTS (a local file), else the torch.hub cache (dinov2_vits14_pretrain.pth), else the
#             HF cache (timm/vit_small_patch14_dinov2.lvd142m), else RANDOM weights (said so in the output)
#   VAE       DEMO_VAE: a local AutoencoderKL directory or a hub id in the HF cache (the SD-VAE reconstructs
#             32 px images poorly: DEMO_RES=64 looks better but trains ~4x slower)
#   Inception REG_INCEPTION_WEIGHTS, else $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth,
#             else RANDOM weights (the metrics are then meaningless; said so in the output)
#
# Settings (environment, defaults in brackets): DEMO_OUT [demo_out], DEMO_RES [32], DEMO_IMAGES [512],
# DEMO_CLASSES [8], DEMO_STEPS [200], DEMO_BATCH [32], DEMO_LR [2e-3], DEMO_EMA [0.98], DEMO_LOG_EVERY [10],
# DEMO_SAMPLES [64], DEMO_SAMPLER_STEPS [50], DEMO_CFG [4.0], DEMO_REF [32], DEMO_VAE [pixel-unshuffle-lowpass],
# DEMO_EVAL_EVERY [DEMO_STEPS/2], DEMO_EVAL_SAMPLES [16] (FID during training, ODE 50 steps, no guidance),
# DEMO_THREADS [1], DEMO_DRY_RUN [0], PYTHON [python].
# DEMO_OUT is wiped at the start if an earlier demo made it (it holds a .reg_demo marker); any other
# non-empty folder is refused.
set -eEuo pipefail
cd "$(dirname "$0")"

OUT=${DEMO_OUT:-demo_out}
RES=${DEMO_RES:-32}
NUM_IMAGES=${DEMO_IMAGES:-512}
NUM_CLASSES=${DEMO_CLASSES:-8}
STEPS=${DEMO_STEPS:-200}
BATCH=${DEMO_BATCH:-32}
LR=${DEMO_LR:-2e-3}
EMA=${DEMO_EMA:-0.98}          # the paper's 0.9999 would leave the EMA at its initialisation after 200 steps
LOG_EVERY=${DEMO_LOG_EVERY:-10}
SAMPLES=${DEMO_SAMPLES:-64}
SAMPLER_STEPS=${DEMO_SAMPLER_STEPS:-50}
CFG=${DEMO_CFG:-4.0}
NUM_REF=${DEMO_REF:-32}
EVAL_EVERY=${DEMO_EVAL_EVERY:-$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))}
EVAL_SAMPLES=${DEMO_EVAL_SAMPLES:-16}
VAE=${DEMO_VAE:-pixel-unshuffle-lowpass}
PY=${PYTHON:-python}
# One thread per process by default: the models are tiny, and on a machine that other jobs keep busy
# several threads wait for each other (measured on a shared 2-core box: at load 4 one thread was 2-3x
# faster per train step and 1.5x on sqrtm; whole demos at load 1-2 took 237 s with 2 threads, 170-187 s
# with 1). On an idle machine DEMO_THREADS=2..4 can be faster.
THREADS=${DEMO_THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # offline: never wait on the network
export TOKENIZERS_PARALLELISM=false

EXP=demo
DATA=$OUT/data
RUN=$OUT/exps/$EXP
BASE_RUN=$OUT/exps/demo-sit
COMPARE=$OUT/compare
SAMPLE_DIR=$OUT/samples
REF_NPZ=$OUT/ref_batch.npz
METRICS_JSON=$OUT/metrics.json
LOSS_PNG=$OUT/losses.png

STAGE=setup
STAGE_START=$SECONDS
on_error() {
  local rc=$1
  echo >&2
  echo "demo.sh: FAILED in stage '$STAGE' (exit code $rc, after $((SECONDS - STAGE_START)) s of that stage);" \
       "see the messages above. Outputs so far are in $OUT/" >&2
  exit "$rc"
}
trap 'on_error $?' ERR

TIMES=""
stage() {  # stage NUMBER NAME WHAT: close the previous stage's clock, announce the next one
  [[ $STAGE == setup ]] || TIMES+="$STAGE $((SECONDS - STAGE_START)) s, "
  STAGE=$2
  STAGE_START=$SECONDS
  echo
  echo "==> [$1/8] $2: $3   (t = ${SECONDS} s)"
}

# ---------------------------------------------------------------------------------------- setup
# Encoder weights: a local file, the HF cache, or random.
ENC_CHOICE=${REG_ENC_WEIGHTS:-}
if [[ "$ENC_CHOICE" == random ]]; then
  ENC_NOTE="RANDOM weights (asked for with REG_ENC_WEIGHTS=random)"
elif [[ -n "$ENC_CHOICE" ]]; then
  ENC_NOTE="weights from $ENC_CHOICE"
elif LOCAL=$("$PY" -c "from models.encoders import local_weights; print(local_weights('dinov2-vit-s') or '')" 2>/dev/null) \
     && [[ -n "$LOCAL" ]]; then
  ENC_CHOICE=hub
  ENC_NOTE="pretrained weights found locally ($LOCAL)"
else
  ENC_CHOICE=random
  ENC_NOTE="RANDOM weights (no REG_ENC_WEIGHTS and none in the torch.hub or HF cache): the alignment and class-token targets are features of a random network"
fi

# Inception weights: REG_INCEPTION_WEIGHTS, torch-fidelity's file in the torch hub cache, or random.
INCEPTION_FILE=weights-inception-2015-12-05-6726825d.pth
TORCH_HUB_FILE=${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints/$INCEPTION_FILE
INCEPTION_FLAGS=()
if [[ -n "${REG_INCEPTION_WEIGHTS:-}" ]]; then
  INCEPTION_NOTE="Inception weights from $REG_INCEPTION_WEIGHTS"
  [[ "$REG_INCEPTION_WEIGHTS" == random ]] && INCEPTION_NOTE="RANDOM Inception weights (REG_INCEPTION_WEIGHTS=random)"
elif [[ -f "$TORCH_HUB_FILE" ]]; then
  INCEPTION_NOTE="Inception weights from $TORCH_HUB_FILE"
else
  INCEPTION_FLAGS=(--inception-weights random)
  INCEPTION_NOTE="RANDOM Inception weights ($INCEPTION_FILE not found): the numbers only show that the evaluator runs"
fi

echo "REG offline demo: ${RES}x${RES} synthetic shapes ($NUM_IMAGES images, $NUM_CLASSES classes), codec $VAE,"
echo "  SiT-T/2 + REG, $STEPS steps of batch $BATCH (lr $LR, EMA $EMA), $SAMPLES samples (SDE $SAMPLER_STEPS steps, cfg $CFG),"
echo "  $THREADS thread(s) per process (DEMO_THREADS); outputs in $OUT/"
echo "  encoder dinov2-vit-s: $ENC_NOTE"
echo "  evaluator: $INCEPTION_NOTE"
if [[ ${DEMO_DRY_RUN:-0} == 1 ]]; then exit 0; fi  # DEMO_DRY_RUN=1: only say what would be used

if [[ -e "$OUT" && ! -f "$OUT/.reg_demo" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
  echo "demo.sh: $OUT exists, is not empty and was not made by demo.sh; set DEMO_OUT to another folder" >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.reg_demo"

# ---------------------------------------------------------------------------------------- stages
stage 1 data "synthetic labelled images + the evaluator's reference batch"
"$PY" -m preprocessing.synthetic --dest "$DATA/imagenet_${RES}_vae" --num-images "$NUM_IMAGES" \
  --resolution "$RES" --num-classes "$NUM_CLASSES"
# The reference batch for FID is the training set itself: ADM's npz layout, arr_0 uint8 (N, H, W, 3).
"$PY" - "$DATA/imagenet_${RES}_vae" "$REF_NPZ" "$NUM_REF" <<'EOF'
import glob, os, sys
import numpy as np
from PIL import Image
src, dest, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(glob.glob(os.path.join(src, "*", "*.png")))[:n]
if len(files) < n:
    raise SystemExit(f"reference batch: asked for {n} images, {src} has only {len(files)}")
images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
np.savez(dest, arr_0=images)
print(f"reference batch: {images.shape} uint8 from the first {n} training images -> {dest}")
EOF

stage 2 encode "images -> latents with the $VAE codec"
"$PY" preprocessing/dataset_tools.py encode --source "$DATA/imagenet_${RES}_vae" --dest "$DATA/vae-sd" \
  --model-url "$VAE" --batch-size 64 --num-workers 0

EVAL_FLAGS=(--eval-every "$EVAL_EVERY" --eval-ref "$REF_NPZ" --eval-samples "$EVAL_SAMPLES" --eval-batch-size 64
            "${INCEPTION_FLAGS[@]}")
stage 3 train "SiT-T/2 + REG through accelerate (encoder dinov2-vit-s: ${ENC_CHOICE}), FID every $EVAL_EVERY steps"
"$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train.py --model SiT-T/2 --resolution "$RES" --num-classes "$NUM_CLASSES" --data-dir "$DATA" \
  --enc-type dinov2-vit-s --enc-weights "$ENC_CHOICE" --encoder-depth 2 --projector-dim 256 \
  --batch-size "$BATCH" --learning-rate "$LR" --ema-decay "$EMA" --max-train-steps "$STEPS" \
  --checkpointing-steps "$STEPS" --log-every "$LOG_EVERY" --num-workers 1 --report-to none \
  --output-dir "$OUT/exps" --exp-name "$EXP" "${EVAL_FLAGS[@]}"
CKPT=$(ls "$RUN"/checkpoints/ema_*.safetensors | sort | tail -n 1)

stage 4 baseline "the plain SiT-T/2 baseline (--method sit: no alignment, no class token), the same evaluations"
"$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train.py --model SiT-T/2 --method sit --resolution "$RES" --num-classes "$NUM_CLASSES" --data-dir "$DATA" \
  --batch-size "$BATCH" --learning-rate "$LR" --ema-decay "$EMA" --max-train-steps "$STEPS" \
  --checkpointing-steps "$STEPS" --log-every "$LOG_EVERY" --num-workers 1 --report-to none \
  --output-dir "$OUT/exps" --exp-name demo-sit "${EVAL_FLAGS[@]}"

stage 5 sample "$SAMPLES images from $(basename "$CKPT"), image i of class i mod $NUM_CLASSES (--balanced)"
"$PY" generate.py --ckpt "$CKPT" --mode sde --num-steps "$SAMPLER_STEPS" --cfg-scale "$CFG" --cls-cfg-scale "$CFG" \
  --num-fid-samples "$SAMPLES" --per-proc-batch-size 64 --balanced --grid "$SAMPLES" \
  --sample-dir "$SAMPLE_DIR" --run-name demo
SAMPLE_NPZ=$SAMPLE_DIR/demo.npz
GRID_PNG=$SAMPLE_DIR/demo-grid.png

stage 6 evaluate "$SAMPLES samples vs $NUM_REF training images"
"$PY" -m evaluations.evaluator "$REF_NPZ" "$SAMPLE_NPZ" --save-path "$METRICS_JSON" "${INCEPTION_FLAGS[@]}" \
  --batch-size 64

stage 7 compare "REG against plain SiT: FID during training and the loss terms"
"$PY" -m evaluations.compare "$RUN" "$BASE_RUN" --out "$COMPARE"

stage 8 plot "loss terms over the training steps"
"$PY" -m evaluations.plot_losses "$RUN/metrics.jsonl" --out "$LOSS_PNG"

# ---------------------------------------------------------------------------------------- summary
TIMES+="$STAGE $((SECONDS - STAGE_START)) s"
STAGE=summary
for f in "$CKPT" "$GRID_PNG" "$LOSS_PNG" "$METRICS_JSON" "$SAMPLE_NPZ" "$COMPARE/comparison.md" "$COMPARE/comparison.png"; do
  [[ -s "$f" ]] || { echo "demo.sh: expected output $f is missing" >&2; false; }
done
echo
GRID_COLS=1
while (( GRID_COLS * GRID_COLS < SAMPLES )); do GRID_COLS=$((GRID_COLS + 1)); done  # generate.py: ceil(sqrt(N))
GRID_NOTE="image i has class i mod $NUM_CLASSES"
[[ $GRID_COLS == "$NUM_CLASSES" ]] && GRID_NOTE="column k = class k: $GRID_NOTE"
echo "==> done in ${SECONDS} s ($TIMES). Outputs:"
echo "  checkpoint    $CKPT"
echo "  sample grid   $GRID_PNG   ($GRID_NOTE)"
echo "  loss plot     $LOSS_PNG"
echo "  metrics JSON  $METRICS_JSON"
echo "  comparison    $COMPARE/comparison.md and $COMPARE/comparison.png   (REG vs SiT: FID over steps, losses below)"
echo "  (also: samples $SAMPLE_NPZ, training log $RUN/log.txt and $RUN/metrics.jsonl)"
"$PY" - "$RUN/metrics.jsonl" "$METRICS_JSON" "$ENC_CHOICE" <<'EOF'
import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
lines = [r for r in records if "loss" in r]  # training lines (evaluation lines carry fid instead)
first, last = lines[0], lines[-1]
m = json.load(open(sys.argv[2]))
enc = " (random DINOv2-S)" if sys.argv[3] == "random" else ""
print(f"summary: losses at step {last['step']}: loss {last['loss']:.4f} (step {first['step']}: {first['loss']:.4f}), "
      f"denoise {last['loss_denoise']:.4f}, proj {last['loss_proj']:.4f}, cls {last['loss_cls']:.4f}{enc}")
note = ("  <- RANDOM Inception weights: meaningless, a smoke test of the evaluator only"
        if "warning" in m else f"  (Inception: {m.get('inception_weights')})")
print(f"summary: metrics vs {m['ref_batch']['num_images']} training images: FID {m['fid']:.2f}, sFID {m['sfid']:.2f}, "
      f"IS {m['inception_score']:.3f}, precision {m['precision']:.3f}, recall {m['recall']:.3f}{note}")
EOF
