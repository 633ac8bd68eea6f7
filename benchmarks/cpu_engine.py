"""The chunked engine on CPU against the naive reference, side by side in one process: time and peak memory of one
DPO step (policy forward and backward, reference forward through the same head), fp32.

Rounds are interleaved (each round runs every implementation once, in turn) and the medians of the rounds are
reported, so that a change in the machine's load hits every implementation alike. Peak memory is the exact peak
of the bytes of the tensors a step creates (:class:`fastdpo.bench.memory.LiveBytes`, the gradients included),
measured in a separate untimed step. Then the same step with two other busy processes on the machine (lean, fast
and naive again, interleaved). The load average (``os.getloadavg``) is recorded before and after each part.
Timed with them, the work fast mode leaves out of lean's step (the backward's logit recompute, alone): lean's time
less it, over lean's, is the ratio fast mode would reach if keeping its tiles cost nothing (``fast_vs_lean_ideal``,
an estimate: the recompute timed alone runs with warm caches).

    python benchmarks/cpu_engine.py                      # both shapes, writes benchmarks/results/cpu_engine.json
    python benchmarks/cpu_engine.py --shapes small --rounds 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fastdpo
from fastdpo import _torch_backend
from fastdpo.bench.memory import LiveBytes
from fastdpo.reference import reference_dpo_loss

# name: (H, V, pairs, T); the first quarter of every row is prompt (ignored).
SHAPES = {"small": (512, 32000, 4, 512), "large": (1024, 128256, 1, 512)}
IMPLS = ("naive", "lean", "fast")


def _inputs(H, V, pairs, T):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, T, H, generator=g)
    # Logits with a standard deviation of about 4 (a peaked softmax, as in a trained model).
    weight = torch.randn(V, H, generator=g) * (4.0 / H ** 0.5)
    ref_hidden = torch.randn(2 * pairs, T, H, generator=g)
    labels = torch.randint(0, V, (2 * pairs, T), generator=g)
    labels[:, :T // 4] = -100
    return hidden, weight, ref_hidden, labels


def _step(impl, hidden, weight, ref_hidden, labels):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if impl == "naive":
        out = reference_dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=weight)
    else:
        out = fastdpo.dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=weight, backend="torch", memory=impl)
    out.loss.backward()
    return out.loss.item()


def _skipped_work(hidden, weight, ref_hidden, labels):
    """What fast mode leaves out of lean's step: the backward's logit recompute, each of the engine's tiles' product
    (the gathered rows with the ``−lse`` column) and its ``exp``."""
    rows = hidden.reshape(-1, hidden.shape[-1])[labels.reshape(-1) != -100]
    x = torch.cat([rows, rows.new_zeros(rows.shape[0], 1)], 1)
    for v0, v1 in _torch_backend._vocab_chunks(weight.shape[0]):
        w = torch.cat([weight[v0:v1], weight.new_ones(v1 - v0, 1)], 1)
        step = _torch_backend._rows_per_chunk(v1 - v0, weight.numel())
        for s in range(0, x.shape[0], step):
            (x[s:s + step] @ w.t()).exp_()


def _timed(impl, inputs):
    t0 = time.perf_counter()
    if impl == "skipped":
        _skipped_work(*inputs)
    else:
        _step(impl, *inputs)
    return time.perf_counter() - t0


def _interleaved(impls, inputs, rounds):
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            times[impl].append(_timed(impl, inputs))
    return {impl: {"median_s": statistics.median(t), "runs_s": t} for impl, t in times.items()}


def _busy():
    while True:
        pass


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _machine():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def run_shape(name, rounds, loaded):
    H, V, pairs, T = SHAPES[name]
    inputs = _inputs(H, V, pairs, T)
    losses = {impl: _step(impl, *inputs) for impl in IMPLS}  # warm-up, and the losses agree
    result = {"H": H, "V": V, "tokens": 2 * pairs * T, "labelled": int((inputs[3] != -100).sum()),
              "dtype": "fp32", "loss": losses, "load_before": _load()}
    result["time"] = _interleaved(IMPLS + ("skipped",), inputs, rounds)
    result["load_after_timing"] = _load()
    peaks = {}
    for impl in IMPLS:
        with LiveBytes() as meter:
            _step(impl, *inputs)
        peaks[impl] = meter.peak
    result["peak_bytes_above_inputs"] = peaks
    grads = (V * H + 2 * pairs * T * H) * 4
    result["gradient_bytes"] = grads
    if loaded:
        procs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(2)]
        for p in procs:
            p.start()
        try:
            time.sleep(1.0)
            result["loaded"] = _interleaved(IMPLS, inputs, rounds)
            result["load_during_loaded"] = _load()
        finally:
            for p in procs:
                p.terminate()
                p.join()
    naive_t = result["time"]["naive"]["median_s"]
    lean_t = result["time"]["lean"]["median_s"]
    result["ratios"] = {
        "lean_vs_naive_time": lean_t / naive_t,
        "fast_vs_lean_time": result["time"]["fast"]["median_s"] / lean_t,
        "fast_vs_lean_ideal": (lean_t - result["time"]["skipped"]["median_s"]) / lean_t,
        "lean_vs_naive_peak": peaks["lean"] / peaks["naive"],
        "lean_vs_naive_workspace": (peaks["lean"] - grads) / (peaks["naive"] - grads),
    }
    if loaded:
        result["ratios"]["loaded_lean_vs_naive_time"] = (result["loaded"]["lean"]["median_s"]
                                                         / result["loaded"]["naive"]["median_s"])
        result["ratios"]["loaded_fast_vs_naive_time"] = (result["loaded"]["fast"]["median_s"]
                                                         / result["loaded"]["naive"]["median_s"])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3; medians)")
    parser.add_argument("--no-loaded", action="store_true", help="skip the run beside two busy processes")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_engine.json"))
    args = parser.parse_args(argv)
    report = {"machine": _machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shapes": {}}
    for name in args.shapes:
        report["shapes"][name] = res = run_shape(name, args.rounds, not args.no_loaded)
        t, p, r = res["time"], res["peak_bytes_above_inputs"], res["ratios"]
        print(f"{name}: H={res['H']} V={res['V']} tokens={res['tokens']} (labelled {res['labelled']}), load "
              f"{res['load_before']} -> {res['load_after_timing']}")
        for impl in IMPLS:
            loaded = f", loaded {res['loaded'][impl]['median_s']:.2f} s" if "loaded" in res else ""
            print(f"  {impl:6s} {t[impl]['median_s']:7.2f} s  peak {p[impl] / 2**20:8.1f} MiB{loaded}")
        print(f"  the recompute fast mode skips: {t['skipped']['median_s']:.2f} s")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        # Written after every shape, so that an interrupted run keeps what it measured.
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
