#!/usr/bin/env bash
# Download, into .wheels/, the few wheels that the one-script GPU run (benchmarks/device_run.sh) installs on a GPU
# machine that has python3.12, torch, triton and transformers but no network: TRL 1.16 (its
# ChunkedLogProbFunction needs only torch, triton and transformers.utils), Liger-Kernel 0.8.5 and Cut
# Cross-Entropy 25.1.1, each without its dependencies; plus setuptools and wheel (in .wheels/build) for
# fastdpo's editable install without build isolation where the GPU machine's Python lacks them.
#
#   bash benchmarks/fetch_wheels.sh                        # wheels for Python 3.12 (the default)
#   PY_VERSIONS="3.11 3.12 3.13" bash benchmarks/fetch_wheels.sh
#
# Then copy the checkout, .wheels/ included, to the GPU machine (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSIONS=${PY_VERSIONS:-3.12}
PINS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
mkdir -p .wheels/build
for PY_VERSION in $PY_VERSIONS; do
  TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
          --platform linux_x86_64)
  $PY -m pip download --quiet --no-deps -d .wheels "${TARGET[@]}" "${PINS[@]}"
  $PY -m pip download --quiet --no-deps -d .wheels/build "${TARGET[@]}" "setuptools>=68" wheel
done
echo "wheels for Python $PY_VERSIONS in .wheels/ ($(du -sh .wheels | cut -f1)): $(ls .wheels | tr '\n' ' ')"
