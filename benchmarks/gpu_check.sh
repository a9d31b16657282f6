#!/usr/bin/env bash
# The whole GPU check, offline, on synthetic data (about 8 minutes on one H100):
#   1. SiT-XL/2 + REG trained through train.py with its defaults (bf16, compile, fused AdamW), with one
#      in-training evaluation at train.py's eval defaults (ODE 50 steps, no guidance), scaled to 10K images;
#   2. benchmarks/run.py: the same training step as fp32-eager baseline vs optimised (SiT-B/2 and SiT-XL/2,
#      step-0 losses compared), sampling (SDE 250 steps, cfg 2.3, cls-cfg 2.3, guidance t <= 0.85, eager
#      fp32 vs compiled bf16) and the evaluator (Inception images/s, the five metrics on 50K x 10K features);
#   3. SiT-B/2 + REG through train.py;
# then writes benchmarks/RESULTS.md (device, date, torch, every figure, ratios, checks) and prints it.
#
#   bash benchmarks/gpu_check.sh            # GPU
#   QUICK=1 bash benchmarks/gpu_check.sh    # tiny sizes on a CPU (tests/test_benchmarks.py runs this)
#
# Environment: GPU_CHECK_WORK (scratch folder, default a new temp dir), GPU_CHECK_RESULTS (default
# benchmarks/RESULTS.md), GPU_CHECK_BATCH (per-GPU batch, default 64). Exit status 1 if a phase or a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ "${1:-}" == "--quick" ]] && QUICK=1
QUICK=${QUICK:-0}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/RESULTS.md}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK/exps"
: > "$WORK/phases.txt"
: > "$WORK/failures.txt"

if [[ $QUICK == 1 ]]; then  # one tiny train.py run and one benchmarks/run.py process: under a minute on 2 cores
  RES=32; BATCH=4; IMAGES=8; STEPS=2; LOG=1; ENC=dinov2-vit-s; WORKERS=0; XL=SiT-T/2; DEPTH_XL=4
  BENCH=(--quick --device cpu)
  export OMP_NUM_THREADS=1  # 2 busy cores: more threads than free cores make OpenMP wait at barriers
else
  RES=256; BATCH=${GPU_CHECK_BATCH:-64}; IMAGES=256; STEPS=40; LOG=10; ENC=dinov2-vit-b; EVAL=256; WORKERS=4
  XL=SiT-XL/2; B=SiT-B/2; DEPTH_XL=8; DEPTH_B=4
  BENCH=(--batch-size "$BATCH" --eval-images 2000)
fi

report() {
  "$PY" -m benchmarks.gpu_check report --work "$WORK" --out "$RESULTS" \
    --command "$([[ $QUICK == 1 ]] && echo 'QUICK=1 ')bash benchmarks/gpu_check.sh" > /dev/null
}

phase() {  # phase NAME CMD...: run, time, log to $WORK/NAME.log; a failure is recorded and the check goes on
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" >&2
  if ! "$@" > "$WORK/$name.log" 2>&1; then
    echo "$name" >> "$WORK/failures.txt"
    echo "== $name FAILED; last lines of $WORK/$name.log:" >&2
    tail -n 20 "$WORK/$name.log" >&2
  fi
  echo -n "$name $((SECONDS - t0)); " >> "$WORK/phases.txt"
  [[ $QUICK == 1 ]] || report || true  # RESULTS.md is kept current, so a run cut short still leaves its figures
}

train() {  # train NAME MODEL DEPTH [extra flags]
  local name=$1 model=$2 depth=$3; shift 3
  "$PY" train.py --model "$model" --encoder-depth "$depth" --enc-type "$ENC" --enc-weights random \
    --data-dir "$WORK/data" --resolution "$RES" --output-dir "$WORK/exps" --exp-name "$name" \
    --batch-size "$BATCH" --max-train-steps "$STEPS" --log-every "$LOG" --checkpointing-steps 1000000 \
    --num-workers "$WORKERS" --report-to none "$@"
}

# what the evaluator and the VAE need: a missing package fails here, by name, not minutes into a phase
# (looked up, not imported: importing all four takes 10-20 s)
phase imports "$PY" -c "import importlib.util as u, sys
missing = [m for m in ('accelerate', 'timm', 'torch_fidelity', 'diffusers') if u.find_spec(m) is None]
sys.exit(f'missing packages: {\", \".join(missing)}' if missing else 0)"
phase data "$PY" -m benchmarks.gpu_check data --dest "$WORK/data" --num-images "$IMAGES" --resolution "$RES"
if [[ $QUICK == 1 ]]; then
  phase train_tiny train tiny "$XL" "$DEPTH_XL"
  phase bench "$PY" -m benchmarks.run "${BENCH[@]}" --out "$WORK/bench_1.json"
else
  phase vae "$PY" -m benchmarks.gpu_check vae --dest "$WORK/vae"
  phase train_xl train xl "$XL" "$DEPTH_XL" --eval-every "$STEPS" --eval-samples "$EVAL" \
    --eval-ref "$WORK/data/ref.npz" --vae "$WORK/vae" --inception-weights random
  phase bench_train "$PY" -m benchmarks.run "${BENCH[@]}" --sections train --models "$B,$XL" --out "$WORK/bench_1.json"
  phase bench_sample_eval "$PY" -m benchmarks.run "${BENCH[@]}" --sections sample,eval --out "$WORK/bench_2.json"
  phase train_b train b "$B" "$DEPTH_B"
fi
"$PY" -m benchmarks.gpu_check report --work "$WORK" --out "$RESULTS" \
  --command "$([[ $QUICK == 1 ]] && echo 'QUICK=1 ')bash benchmarks/gpu_check.sh"
status=$?
echo "results: $RESULTS (scratch and logs: $WORK)" >&2
exit $status
