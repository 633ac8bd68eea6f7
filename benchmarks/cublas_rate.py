"""The card's measured bf16 matmul rate (cuBLAS through ``torch.mm``), the yardstick the
kernels are measured against (docs/design.md, "The work and its floor").

For the head-shaped products a DPO step runs at llama3-8b (6144 labelled tokens, H=4096, V=128256): the
forward's ``x·Wᵀ`` (over TRL's 32768-column tiles and the whole vocabulary), the grad-weight ``dZᵀ·x`` and the
grad-hidden ``dZ·W``, plus a square 8192³: CUDA-event median of ``--repeats`` after warm-up, in TFLOP/s.
Writes ``$OUT/cublas.json`` (and prints a table). ``--tiny --device cpu`` runs the flow at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

# (name, M, N, K, transpose-a) of C[M, N] = A[M, K]·B[K, N].
PRODUCTS = [
    ("fwd x.W^T, 32768-column tile", 6144, 32768, 4096),
    ("fwd x.W^T, whole vocabulary", 6144, 128256, 4096),
    ("grad-weight dZ^T.x", 128256, 4096, 6144),
    ("grad-hidden dZ.W", 6144, 4096, 128256),
    ("square 8192^3", 8192, 8192, 8192),
]


def measure(M, N, K, dtype, device, repeats, warmup):
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    del a, b
    ms = statistics.median(times)
    return {"M": M, "N": N, "K": K, "ms": ms, "tflops": 2 * M * N * K / (ms * 1e-3) / 1e12}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cublas_rate.py: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    for label, M, N, K in PRODUCTS:
        if args.tiny:
            M, N, K = max(8, M // 512), max(8, N // 512), max(8, K // 512)
        row = dict(product=label, **measure(M, N, K, dtype, device, args.repeats, args.warmup))
        rows.append(row)
        print(f"{label:32s} {M}x{N}x{K}: {row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s", flush=True)
    result = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "products": rows,
              "peak_tflops": max(r["tflops"] for r in rows)}
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cublas.json"), "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
