"""pytest-benchmark suites of the DPO loss step: forward, backward and the full step, per fastdpo backend and per
competitor that is installed and runs on this device.

Each benchmark records, in ``extra_info``, the shape, the valid tokens and the derived TFLOP/s (useful work:
policy forward 2·Nv·H·V, backward 4·Nv·H·V, reference forward 2·Nv·H·V) and GB/s (inputs read plus gradients
written once). Run ``pytest benchmarks --benchmark-enable`` (``--benchmark-json=FILE`` to keep the numbers).
"""

import pytest
import torch

from fastdpo import _validate
from fastdpo.bench.competitors import get_implementations, make_inputs

# fastdpo per backend and memory mode (lean; fast keeps what the backward needs), then every competitor; a case
# that cannot run here is skipped with its reason.
CASES = ("fastdpo[torch]", "fastdpo[triton]", "fastdpo-fast[torch]", "fastdpo-fast[triton]", "naive", "trl", "liger",
         "cce")
PHASES = ("forward", "backward", "step")


def device_for(case):
    """CUDA when there is one; fastdpo[triton] on CPU only through the Triton interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(case, size, dtype=None):
    """The implementation and inputs of ``case`` at ``size`` (a dict of pairs/seq_len/hidden/vocab), or a skip."""
    device = device_for(case)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    impl = get_implementations([case])[0]
    if case.endswith("[triton]") and device.type == "cpu" and not _validate.interpreting():
        pytest.skip(f"{case} needs CUDA or TRITON_INTERPRET=1")
    reason = impl.unavailable_reason(device, dtype)
    if reason:
        pytest.skip(f"{case}: {reason}")
    inp = make_inputs(size["pairs"], size["seq_len"], size["hidden"], size["vocab"], dtype=dtype, device=device)
    return impl, inp


def sync(inp):
    if inp.hidden.is_cuda:
        torch.cuda.synchronize()


def phase_work(inp, phase):
    """(FLOPs, bytes) of the useful work of one phase, for the derived rates."""
    V, H = inp.weight.shape
    unit = 2 * inp.valid_tokens * H * V
    flops = {"forward": unit * (2 if inp.has_ref else 1), "backward": 2 * unit, "step": inp.work_flops()}[phase]
    return flops, inp.min_bytes()


def run_phase(benchmark, impl, inp, phase):
    """Benchmark one phase; returns the loss of the last run. Backward re-runs the forward in its setup."""
    def forward():
        loss = impl.loss(inp)
        sync(inp)
        return loss

    if phase == "forward":
        def fn():
            with torch.enable_grad():
                return forward().detach()
        loss = benchmark(fn)
    elif phase == "backward":
        state = {}

        def setup():
            inp.zero_grad()
            state["loss"] = forward()

        def fn():
            state["loss"].backward()
            sync(inp)

        benchmark.pedantic(fn, setup=setup, rounds=3 if benchmark.disabled else 5, iterations=1)
        loss = state["loss"].detach()
    else:
        def fn():
            inp.zero_grad()
            out = impl.step(inp)
            sync(inp)
            return out
        loss = benchmark(fn)
    flops, nbytes = phase_work(inp, phase)
    stats = getattr(benchmark, "stats", None)
    mean = getattr(getattr(stats, "stats", None), "median", None) if stats else None
    V, H = inp.weight.shape
    benchmark.extra_info.update({"hidden": H, "vocab": V, "pairs": inp.hidden.shape[0] // 2,
                                 "seq_len": inp.hidden.shape[1], "valid_tokens": inp.valid_tokens,
                                 "dtype": str(inp.hidden.dtype), "flops": flops, "bytes": nbytes})
    if mean:
        benchmark.extra_info["tflops"] = flops / mean / 1e12
        benchmark.extra_info["gbps"] = nbytes / mean / 1e9
    return loss


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", CASES)
def test_dpo_loss(benchmark, bench_size, case, phase):
    size_name, size = bench_size
    impl, inp = build(case, size)
    benchmark.group = f"{phase} {size_name}"
    loss = run_phase(benchmark, impl, inp, phase)
    assert torch.isfinite(loss).all()
    if phase != "forward":
        assert inp.hidden.grad is not None and torch.isfinite(inp.hidden.grad).all()
