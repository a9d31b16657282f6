#!/usr/bin/env bash
# Known-answer check of evaluations/evaluator.py against OpenAI's ADM evaluator (docs/design.md#evaluation).
#
# ADM's guided-diffusion README reports, for ADM-G + ADM-U samples vs the ImageNet 256 reference batch:
#   Inception Score 215.837, FID 3.94256, sFID 6.14043, Precision 0.8265, Recall 0.5309.
# This script downloads both npz files if they are missing (~9.8 GB + ~2 GB), runs our evaluator
# and fails unless every number matches (FID within 0.01).
#
# Needs network for the npz files and the real Inception weights: torch-fidelity's
# weights-inception-2015-12-05-6726825d.pth in the torch hub checkpoints dir (downloaded on first
# use), or REG_INCEPTION_WEIGHTS=/path/to/that/file. A GPU makes it take minutes instead of hours.
#
# Usage:  bash evaluations/check_adm_reference.sh            (env: ADM_DIR, DEVICE, BATCH_SIZE)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ADM_DIR=${ADM_DIR:-data/adm_reference}
# ADM's address and reference name, from the one place that states them (reg/prefetch.py)
BASE_URL=$(python -c "from reg.prefetch import ADM_REF_BATCHES; print(ADM_REF_BATCHES)")/256
REF=$ADM_DIR/$(python -c "from reg.prefetch import REF_BATCH_FILES; print(REF_BATCH_FILES[256])")
SAMPLE=$ADM_DIR/admnet_guided_upsampled_imagenet256.npz
OUT=$ADM_DIR/adm_reference_check.json

mkdir -p "$ADM_DIR"
for f in "$REF" "$SAMPLE"; do
  if [ ! -f "$f" ]; then
    echo "downloading $(basename "$f") ..."
    if command -v wget >/dev/null; then
      wget -c -O "$f.part" "$BASE_URL/$(basename "$f")"
    else
      curl -L -C - -o "$f.part" "$BASE_URL/$(basename "$f")"
    fi
    mv "$f.part" "$f"
  fi
done

args=("$REF" "$SAMPLE" --save-path "$OUT")
[ -n "${DEVICE:-}" ] && args+=(--device "$DEVICE")
[ -n "${BATCH_SIZE:-}" ] && args+=(--batch-size "$BATCH_SIZE")
python -m evaluations.evaluator "${args[@]}"

python - "$OUT" <<'EOF'
import json, sys

result = json.load(open(sys.argv[1]))
# (ADM's published value, allowed |difference|)
expected = {
    "inception_score": (215.837, 0.1),
    "fid": (3.94256, 0.01),
    "sfid": (6.14043, 0.01),
    "precision": (0.8265, 0.002),
    "recall": (0.5309, 0.002),
}
failed = False
for name, (value, tol) in expected.items():
    got = result[name]
    ok = abs(got - value) <= tol
    failed |= not ok
    print(f"{name:16s} ours {got:10.5f}  ADM {value:10.5f}  diff {got - value:+.5f}  (tol {tol})  {'ok' if ok else 'FAIL'}")
if result.get("inception_weights") == "random":
    sys.exit("random Inception weights were used: the check is meaningless")
sys.exit("ADM known-answer check FAILED" if failed else 0)
EOF
echo "ADM known-answer check passed ($OUT)"
