"""Shared test set-up. Every test runs on a machine without a GPU: the Triton kernels go through
the interpreter, which must be switched on before the kernels are first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared helpers live in tests/fdtest.py (a unique module name: benchmarks/ has a conftest too).
