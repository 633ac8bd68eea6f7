#!/usr/bin/env bash
# Download, into .wheels/, the wheels that benchmarks/gpu_compare.py needs on a GPU machine that has torch and
# triton but no network: TRL 1.16, Liger-Kernel 0.8.5, Cut Cross-Entropy 25.1.1, and transformers with its
# dependencies (TRL's ChunkedLogProbFunction imports transformers.utils). torch, triton and the CUDA libraries
# are left out: the device already has them, and they are gigabytes.
#
#   bash benchmarks/fetch_wheels.sh                    # wheels for Python 3.11-3.13 (transformers 5.23 needs >= 3.11)
#   PY_VERSIONS=3.12 bash benchmarks/fetch_wheels.sh   # only the wheels for that Python
#
# Then on the device: python benchmarks/install_wheels.py && python benchmarks/gpu_compare.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The device's Python is not known here: fetch for each likely version (only 3 small wheels differ between
# them); benchmarks/install_wheels.py installs the ones that fit the interpreter that runs it.
PY_VERSIONS=${PY_VERSIONS:-3.11 3.12 3.13}
# What the packages below need besides torch and triton, resolved for the target Python.
PINS=(trl==1.16.0 transformers==5.23.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
mkdir -p .wheels
report=$(mktemp)
scratch=$(mktemp -d)
trap 'rm -rf "$report" "$scratch"' EXIT
for PY_VERSION in $PY_VERSIONS; do
  TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
          --platform linux_x86_64)
  # Resolve transformers' dependency closure (TRL itself goes in without its trainer dependencies: datasets,
  # accelerate and pyarrow are not on the path gpu_compare.py uses).
  $PY -m pip install --quiet --dry-run --ignore-installed --report "$report" --target "$scratch" "${TARGET[@]}" \
      transformers==5.23.0
  mapfile -t deps < <($PY - "$report" <<'PYEOF'
import json, sys
# torch brings these itself (numpy too, on the device); replacing its copies could only break it.
skip = ("torch", "triton", "nvidia-", "cuda-", "numpy", "pip", "setuptools", "wheel", "filelock", "typing-extensions",
        "typing_extensions", "fsspec")
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    name = meta["name"].lower()
    if not name.startswith(skip):
        print(f"{name}=={meta['version']}")
PYEOF
  )
  $PY -m pip download --quiet --no-deps -d .wheels "${TARGET[@]}" "${PINS[@]}" "${deps[@]}"
  # The device has no network, so the editable install of fastdpo builds without isolation; bring its build
  # backend too (kept apart in build/, installed only where the device lacks it).
  $PY -m pip download --quiet --no-deps -d .wheels/build "${TARGET[@]}" "setuptools>=68" wheel
done
echo "wheels for Python $PY_VERSIONS in .wheels/ ($(du -sh .wheels | cut -f1)); on the device: python benchmarks/install_wheels.py"
