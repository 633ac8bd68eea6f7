"""Sizes of the pytest-benchmark suites.

``pytest benchmarks --benchmark-enable`` measures at ``small`` size on CPU and ``full`` size (the llama3-8b head
of docs/benchmarks.md's reference figures) on a GPU; set ``FASTDPO_BENCH_SIZE=tiny|small|full`` to choose. With
benchmarking disabled (the project's default ``--benchmark-disable``, as in ``make test``) every benchmark runs once
at ``tiny`` size, so CI catches a broken benchmark without spending minutes on it.
"""

import os

import pytest
import torch

SIZES = {
    "tiny": dict(pairs=1, seq_len=12, hidden=24, vocab=80),
    "small": dict(pairs=2, seq_len=128, hidden=512, vocab=32000),
    "full": dict(pairs=4, seq_len=1024, hidden=4096, vocab=128256),
}


@pytest.fixture(scope="session")
def bench_size(request):
    """``(name, sizes)`` for this test run (see the module docstring)."""
    chosen = os.environ.get("FASTDPO_BENCH_SIZE")
    if chosen:
        if chosen not in SIZES:
            raise pytest.UsageError(f"FASTDPO_BENCH_SIZE must be one of {list(SIZES)}, got {chosen!r}")
    elif request.config.getoption("benchmark_disable", default=False):
        chosen = "tiny"
    else:
        chosen = "full" if torch.cuda.is_available() else "small"
    return chosen, SIZES[chosen]
