#!/usr/bin/env bash
# The whole GPU check, offline, on synthetic photo-like data (one H100/H200; see the phase list below and
# docs/performance.md), in one run of about 8 minutes:
#   0. provisioning: any missing pure-Python package the pipeline needs (accelerate, timm, diffusers,
#      torch-fidelity, ...) is installed from the wheels folder .wheels/ (no network needed; make it with
#      the command in docs/performance.md#the-wheels-folder and carry it with the working tree);
#   1. the attention microbenchmark (B, 16, T, 72): T = 256, 257 and 1 + 256 split, per SDPA backend;
#   2. the data loader on photo-like 256 px PNGs (~120 KB, as ImageNet crops) with 4 and 8 workers;
#   3. SiT-XL/2 + REG through train.py (bf16, compile, fused AdamW) at 32, 64, 128 and 256 images per GPU,
#      the 32 one with an in-training evaluation (ODE 50 steps, SD-VAE decode, Inception) scaled to 10K;
#   4. benchmarks/speed.py ab: today's step against each speed flag at 32 per GPU, and a per-phase profile
#      (GEMM, attention + backend, elementwise, optimizer + EMA, copies, idle) at 32 and 128;
#   5. --compile-mode reduce-overhead at 32 per GPU through train.py (max-autotune-no-cudagraphs is left
#      out: its compile alone takes longer than the whole check; GPU_CHECK_AUTOTUNE=1 adds it);
#   6. benchmarks/run.py: sampling (SDE 250 steps, cfg 2.3, cls-cfg 2.3, t <= 0.85, eager fp32 vs compiled
#      bf16) and the evaluator; with GPU_CHECK_EXTRA=1 also the fp32-eager training baseline and SiT-B/2;
# then writes benchmarks/RESULTS.md (device, date, torch, every figure next to its target) and prints it.
# RESULTS.md is rewritten after every phase, so a run cut short keeps what it measured.
#
#   bash benchmarks/gpu_check.sh            # GPU
#   QUICK=1 bash benchmarks/gpu_check.sh    # tiny sizes on a CPU (tests/test_benchmarks.py runs this)
#
# Environment: GPU_CHECK_WORK (scratch folder, default a new temp dir), GPU_CHECK_RESULTS (default
# benchmarks/RESULTS.md), GPU_CHECK_BATCHES (per-GPU batches, default "32 64 128 256"), GPU_CHECK_WHEELS
# (default .wheels). Exit status 1 if a phase or a check failed.
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

if [[ $QUICK == 1 ]]; then  # one tiny train.py run and two benchmark processes: about a minute on 2 cores
  RES=32; BATCH=4; IMAGES=8; STEPS=2; LOG=1; ENC=dinov2-vit-s; WORKERS=0; XL=SiT-T/2; DEPTH_XL=4
  BENCH=(--quick --device cpu)
  export OMP_NUM_THREADS=1  # 2 busy cores: more threads than free cores make OpenMP wait at barriers
else
  RES=256; IMAGES=256; STEPS=30; LOG=10; ENC=dinov2-vit-b; EVAL=256; WORKERS=4
  XL=SiT-XL/2; B=SiT-B/2; DEPTH_XL=8; DEPTH_B=4
  read -r -a BATCHES <<< "${GPU_CHECK_BATCHES:-32 64 128 256}"
  BATCH=${BATCHES[0]}
  BENCH=(--batch-size 64 --eval-images 2000)
fi
WHEELS=${GPU_CHECK_WHEELS:-.wheels}

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

provision() {  # install what is missing from the wheels folder, offline; then name anything still missing
  local missing
  missing=$("$PY" -c "import importlib.util as u
need = {'accelerate': 'accelerate', 'timm': 'timm', 'torch_fidelity': 'torch-fidelity', 'diffusers': 'diffusers',
        'safetensors': 'safetensors', 'huggingface_hub': 'huggingface_hub', 'scipy': 'scipy', 'PIL': 'pillow',
        'tqdm': 'tqdm', 'yaml': 'pyyaml', 'tensorboard': 'tensorboard'}
print(' '.join(dist for mod, dist in need.items() if u.find_spec(mod) is None))")
  if [[ -n $missing && -d $WHEELS ]]; then
    echo "installing from $WHEELS: $missing" >&2
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $missing || true
  fi
  # looked up, not imported: importing them all takes 10-20 s
  "$PY" -c "import importlib.util as u, sys
missing = [m for m in ('accelerate', 'timm', 'torch_fidelity', 'diffusers', 'scipy', 'PIL') if u.find_spec(m) is None]
sys.exit(f'missing packages: {\", \".join(missing)} (see docs/performance.md#the-wheels-folder)' if missing else 0)"
}

speed_flags=(--attn-split --device-skip --ema-lerp --ddp-bucket-view --ddp-static-graph --ddp-bucket-mb 100)
phase imports provision
phase data "$PY" -m benchmarks.gpu_check data --dest "$WORK/data" --num-images "$IMAGES" --resolution "$RES"
if [[ $QUICK == 1 ]]; then
  phase train_tiny train tiny "$XL" "$DEPTH_XL" "${speed_flags[@]}"  # every speed flag runs (defaults: everywhere else)
  phase speed "$PY" -m benchmarks.speed attn,loader,ab --data "$WORK/data" --workers 1 --out "$WORK/speed_all.json"
  phase bench "$PY" -m benchmarks.run "${BENCH[@]}" --out "$WORK/bench_1.json"
else
  phase attn "$PY" -m benchmarks.speed attn --out "$WORK/speed_attn.json"
  phase loader "$PY" -m benchmarks.speed loader --data "$WORK/data" --workers 4,8 --out "$WORK/speed_loader.json"
  phase vae "$PY" -m benchmarks.gpu_check vae --dest "$WORK/vae"
  for b in "${BATCHES[@]}"; do
    if [[ $b == "$BATCH" ]]; then  # the paper's per-GPU batch, with the in-training evaluation
      phase "train_xl_$b" train "xl-$b" "$XL" "$DEPTH_XL" --batch-size "$b" --eval-every "$STEPS" \
        --eval-samples "$EVAL" --eval-ref "$WORK/data/ref.npz" --vae "$WORK/vae" --inception-weights random
    else
      phase "train_xl_$b" train "xl-$b" "$XL" "$DEPTH_XL" --batch-size "$b"
    fi
  done
  phase ab "$PY" -m benchmarks.speed ab --batches "$BATCH,128" --out "$WORK/speed_ab.json"
  phase train_xl_ro train "xl-$BATCH-reduce-overhead" "$XL" "$DEPTH_XL" --compile-mode reduce-overhead
  [[ ${GPU_CHECK_AUTOTUNE:-0} == 1 ]] && phase train_xl_mat train "xl-$BATCH-max-autotune" "$XL" "$DEPTH_XL" \
    --compile-mode max-autotune-no-cudagraphs
  phase bench_sample_eval "$PY" -m benchmarks.run "${BENCH[@]}" --sections sample,eval --out "$WORK/bench_2.json"
  if [[ ${GPU_CHECK_EXTRA:-0} == 1 ]]; then
    phase bench_train "$PY" -m benchmarks.run "${BENCH[@]}" --sections train --models "$XL" --out "$WORK/bench_1.json"
    phase train_b train b "$B" "$DEPTH_B" --batch-size 64
  fi
fi
"$PY" -m benchmarks.gpu_check report --work "$WORK" --out "$RESULTS" \
  --command "$([[ $QUICK == 1 ]] && echo 'QUICK=1 ')bash benchmarks/gpu_check.sh"
status=$?
echo "results: $RESULTS (scratch and logs: $WORK)" >&2
exit $status
