#!/usr/bin/env bash
# The core tests on the oldest software we support: Python 3.10 and the lower bound of every range in
# requirements.txt (torch 2.4.0, numpy 1.26, accelerate 1.0, ...), installed into a venv of their own.
#
# Core = model, loss, samplers, checkpoints, two training steps, one generation (CORE_TESTS below).
# Before them, two pip dry runs: installing requirements.txt over this torch with reg.constraints keeps it, and
# requirements-lock.txt resolves on Python 3.10.
# PyPI's Linux torch wheels are CUDA builds: the first run downloads ~3.5 GB (torch + nvidia-* libraries,
# ~5 GB installed); the tests run on the CPU. Later runs reuse the venv.
#   REG_OLD_VENV  where the venv lives (default: $TMPDIR/reg-old-torch, outside the repository)
#   OLD_PYTHON    the interpreter (default: the first Python 3.10 found, pyenv's included)
set -euo pipefail
cd "$(dirname "$0")/.."

# test_compat trains 2 steps (wandb offline, bf16 autocast) and writes a checkpoint; test_resume_is_exact
# trains, saves and resumes. torch.compile's test is left out: inductor's C++ build takes ~1.5 min on 2 cores
# (it passed on torch 2.4.0 when checked by hand; the main suite runs it on the locked torch).
CORE_TESTS=(
  tests/test_model.py tests/test_loss.py tests/test_samplers.py tests/test_checkpoints.py tests/test_loading.py
  tests/test_compat.py "tests/test_train.py::test_resume_is_exact"
  "tests/test_generate.py::test_npz_byte_identical_across_batch_sizes_and_adm_format"
  --deselect tests/test_model.py::test_torch_compile_forward_matches_eager
)

find_python() {
  local c
  for c in ${OLD_PYTHON:-} python3.10 "$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python3.10; do
    if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      command -v "$c" || echo "$c"; return
    fi
  done
  if [ -n "${OLD_PYTHON:-}" ]; then echo "old_torch.sh: OLD_PYTHON=$OLD_PYTHON is not a Python 3.10" >&2; exit 2; fi
  echo "old_torch.sh: WARNING no Python 3.10 found; using python3, and vermin checks the 3.10 syntax" >&2
  command -v python3
}

PY=$(find_python)
VENV=${REG_OLD_VENV:-${TMPDIR:-/tmp}/reg-old-torch}
# the lower bounds of requirements.txt, pinned: "pkg>=X" -> "pkg==X"
MINIMUMS=$(sed -nE 's/^([A-Za-z0-9_.-]+)>=([^,; ]+).*/\1==\2/p' requirements.txt)
STAMP="$("$PY" --version 2>&1) $(echo "$MINIMUMS" | tr '\n' ' ')"
start=$SECONDS
if [ "$(cat "$VENV/.reg-stamp" 2>/dev/null)" != "$STAMP" ]; then
  # a new interpreter needs a new venv; changed bounds only reinstall what changed
  if [ "$("$VENV/bin/python" --version 2>&1)" != "$("$PY" --version 2>&1)" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile $MINIMUMS  # no .pyc: faster
  echo "$STAMP" > "$VENV/.reg-stamp"
fi
echo "old_torch.sh: $("$VENV/bin/python" -c 'import sys, torch, numpy, accelerate, timm, diffusers
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"accelerate {accelerate.__version__}, timm {timm.__version__}, diffusers {diffusers.__version__}")') \
(venv ready in $((SECONDS - start)) s)"
# Installing on a cluster's own torch (docs/compat.md): with the constraints reg.constraints writes, pip keeps the
# venv's torch 2.4.0 and torchvision 0.19.0 even when told to upgrade everything else (--upgrade: the newest
# release of every other package, as in a fresh environment on a cluster). And requirements-lock.txt resolves
# on Python 3.10 (its 3.10 lines). --dry-run resolves from the index's metadata: no wheel is downloaded.
pip_start=$SECONDS
pip_dir=$(mktemp -d)
trap 'rm -rf "$pip_dir"' EXIT
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --dry-run)
"${PIP[@]}" --ignore-installed -r requirements-lock.txt &  # alongside: both wait mostly on the index
lock_check=$!
"$VENV/bin/python" -m reg.constraints -o "$pip_dir/constraints.txt"
"${PIP[@]}" --upgrade --report "$pip_dir/report.json" -r requirements.txt -c "$pip_dir/constraints.txt"
"$VENV/bin/python" - "$pip_dir" <<'PY'
import json, sys
folder = sys.argv[1]
kept = [line.strip().split("==") for line in open(f"{folder}/constraints.txt") if not line.startswith("#")]
report = json.load(open(f"{folder}/report.json"))
install = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
replaced = [f"{name} {version} -> {install[name]}" for name, version in kept if name in install]
if replaced or not kept:
    sys.exit(f"old_torch.sh: reg.constraints did not keep the installed packages: {replaced or 'no constraint'}")
print(f"old_torch.sh: requirements.txt -c constraints keeps {', '.join(' '.join(nv) for nv in kept)} "
      f"({len(install)} other packages would be installed or upgraded)")
PY
wait $lock_check
echo "old_torch.sh: requirements-lock.txt resolves on $("$VENV/bin/python" --version 2>&1) (pip checks: $((SECONDS - pip_start)) s)"
if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 10)'; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check vermin
  # shellcheck disable=SC2046
  "$VENV/bin/vermin" --no-tips --violations --eval-annotations -t=3.10- $(git ls-files '*.py')
fi
"$VENV/bin/python" -m pytest -q -p no:xdist -o addopts="" "${CORE_TESTS[@]}"
echo "old_torch.sh: done in $((SECONDS - start)) s"
