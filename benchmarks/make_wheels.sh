#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a machine that has torch (+ torchvision, numpy,
# scipy, pillow) but no network: the pure-Python packages of the pipeline and their dependencies, pinned to
# the versions this repository is tested with, for Python 3.12 on x86-64 Linux (the lent GPU machine's).
# The few compiled ones (safetensors, hf-xet, regex, psutil, PyYAML, charset-normalizer) are taken as
# cp312 / abi3 manylinux wheels. About 20 MB in all; .wheels/ is git-ignored and travels with the working
# tree when it is named in the device tool's `carry`.
#
#   bash benchmarks/make_wheels.sh [DEST=.wheels] [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.wheels}
PYV=${2:-3.12}
PACKAGES=(
  accelerate==1.15.0 timm==1.0.31 diffusers==0.42.1 torch-fidelity==0.4.0 safetensors==0.8.0
  huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0
  idna==3.20 click==8.5.1 h11==0.16.0 sniffio==1.3.1 regex==2026.5.9 importlib_metadata==10.2.0 zipp==4.1.2
  psutil==7.2.2 PyYAML==6.0.3 tqdm==4.70.1 requests==2.34.2 urllib3==2.7.0 certifi==2026.5.20
  charset-normalizer==3.4.7 packaging==26.2 filelock==4.3.2 fsspec==2026.9.0 typing_extensions==4.16.0
)
mkdir -p "$DEST"
python -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
