"""Shared test set-up. The tests use CPU tensors, also on a machine with a GPU: the Triton kernels go
through the interpreter, which must be switched on before the kernels are first imported. The compiled
kernels are checked by tests/test_kernels_compile.py (no GPU needed) and, on a GPU, by
benchmarks/gpu_checks.py."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared helpers live in tests/fdtest.py (a unique module name: benchmarks/ has a conftest too).
