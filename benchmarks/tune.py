"""A wider search of the kernel tiles on a GPU than the autotuner's: time candidate configs of each kernel family.

    python benchmarks/tune.py [--shape llama3-8b] [--dtype bf16] [--repeats 5]

Coordinate descent from ``default_config``: the forward's tiles (and vocabulary split), then each backward
kernel's tiles with the others held at the best so far, then the backward's vocabulary chunk (which also
sets the workspace, so its peak memory is printed beside its time). Each row reports the registers
spilled by the compiled kernel. The result is a ``KernelConfig(...)`` to weigh for the defaults in
``kernels/fastdpo_kernels/config.py`` (the one place tiles are chosen), and a JSON file under ``$OUT`` when set. The
library's own autotuning (``fastdpo tune``, or the first call at a shape; ``kernels/fastdpo_kernels/autotune.py``)
times only the small space of ``config.tuning_space``. ``--tiny --device cpu`` runs the same flow through the Triton
interpreter at toy sizes (the tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from fastdpo import _triton_backend
from fastdpo.bench.competitors import make_inputs
from fastdpo.kernels import logprob_bwd, logprob_fwd
from fastdpo.kernels.config import KernelConfig

SHAPES = {"llama3-8b": (4, 1024, 4096, 128256), "gemma2-2b": (4, 1024, 2304, 256000),
          "qwen2.5-7b": (8, 512, 3584, 152064)}
TINY = (2, 16, 40, 300)

# (BLOCK_M or BLOCK_V, BLOCK_V or BLOCK_H, BLOCK_K, warps, stages) per family; the first is the default.
TILE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3),
                   (128, 64, 64, 4, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
FAMILIES = {
    "fwd": ("fwd_block_m", "fwd_block_v", "fwd_block_k", "fwd_warps", "fwd_stages"),
    "dlogits": ("dlogits_block_m", "dlogits_block_v", "dlogits_block_k", "dlogits_warps", "dlogits_stages"),
    "gw": ("gw_block_v", "gw_block_h", "gw_block_k", "gw_warps", "gw_stages"),
    "gh": ("gh_block_m", "gh_block_h", "gh_block_k", "gh_warps", "gh_stages"),
}
SPLIT_CANDIDATES = (264, 528, 1056)
CHUNK_CANDIDATES = (2048, 4096, 8192, 16384)


def _timer(device, repeats, warmup):
    def run(fn):
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for s, e in zip(start, end):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
        else:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
        return times[len(times) // 2]
    return run


def _compiled(kernel):
    """The compiled variants of ``kernel`` so far (empty under the interpreter)."""
    found = {}
    for entry in getattr(kernel, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cache, dict):
            found.update(cache)
    return found


def _new_spills(kernel, before):
    """Register spills of the variants compiled since ``before`` (None when nothing new was compiled)."""
    spills = [getattr(k, "n_spills", None) for key, k in _compiled(kernel).items() if key not in before]
    spills = [s for s in spills if s is not None]
    return max(spills) if spills else None


def tune(args):
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pairs, T, H, V = TINY if args.tiny else SHAPES[args.shape]
    inp = make_inputs(pairs, T, H, V, dtype=dtype, device=device, with_ref=False)
    x = inp.hidden.detach().reshape(-1, H)
    w = inp.weight.detach()
    rows, tgt, nv, valid = _triton_backend._compact(inp.labels.reshape(-1), -100)
    time_ms = _timer(device, args.repeats, args.warmup)
    best = _triton_backend._config(x) if not args.tiny else KernelConfig(
        fwd_block_m=16, fwd_block_v=16, fwd_block_k=16, dlogits_block_m=16, dlogits_block_v=16, dlogits_block_k=16,
        gw_block_v=16, gw_block_h=16, gw_block_k=16, gh_block_m=16, gh_block_h=16, gh_block_k=16, vocab_chunk=128,
        min_programs=4)
    candidates = [(16, 16, 16, 4, 2), (32, 16, 16, 4, 2)] if args.tiny else TILE_CANDIDATES
    chunks = (64, 128) if args.tiny else CHUNK_CANDIDATES
    splits = (4, 8) if args.tiny else SPLIT_CANDIDATES
    stats = logprob_fwd.logprob_forward(x, w, None, rows, tgt, nv, softcap=None, scale=1.0, extras=False, config=best)
    m = stats[0].max(0).values
    lse = torch.where(valid, m + torch.log((stats[1] * torch.exp(stats[0] - m)).sum(0)), torch.zeros_like(m))
    grad = torch.where(valid, torch.full_like(lse, 1e-3), torch.zeros_like(lse))
    needs = (True, True, False)
    lines = [f"# tune: {args.shape if not args.tiny else 'tiny'} H={H} V={V} {pairs} pairs x {T}, {args.dtype}, "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", ""]

    def fwd(cfg):
        return lambda: logprob_fwd.logprob_forward(x, w, None, rows, tgt, nv, softcap=None, scale=1.0, extras=False,
                                                   config=cfg)

    def bwd(cfg):
        return lambda: logprob_bwd.logprob_backward(x, w, None, rows, tgt, nv, lse, grad, softcap=None, scale=1.0,
                                                    needs=needs, config=cfg)

    kernels = {"fwd": logprob_fwd._logprob_fwd_kernel, "dlogits": logprob_bwd._dlogits_kernel,
               "gw": logprob_bwd._grad_weight_kernel, "gh": logprob_bwd._grad_hidden_kernel}
    results = {}
    for family, fields in FAMILIES.items():
        rows_out = []
        for cand in candidates:
            cfg = dataclasses.replace(best, **dict(zip(fields, cand)))
            before = set(_compiled(kernels[family]))
            try:
                ms = time_ms((fwd if family == "fwd" else bwd)(cfg))
                note = f"register spills {_new_spills(kernels[family], before)}"
            except Exception as err:  # noqa: BLE001 - a tile that does not compile or fit is a row, not a crash
                ms, note = float("inf"), f"{type(err).__name__}: {str(err)[:80]}"
            rows_out.append((ms, cand, note))
        rows_out.sort(key=lambda r: r[0])
        best = dataclasses.replace(best, **dict(zip(fields, rows_out[0][1])))
        results[family] = [(ms, list(c), n) for ms, c, n in rows_out]
        lines += [f"## {family} ({'forward' if family == 'fwd' else 'whole backward'} ms; tiles, warps, stages)"]
        lines += [f"- {ms:9.3f} ms  {c}  {n}" for ms, c, n in rows_out] + [""]
    split_rows = sorted((time_ms(fwd(dataclasses.replace(best, min_programs=s))), s) for s in splits)
    best = dataclasses.replace(best, min_programs=split_rows[0][1])
    lines += ["## forward: min_programs (vocabulary split)"] + [f"- {ms:9.3f} ms  {s}" for ms, s in split_rows] + [""]
    chunk_rows = []
    for c in chunks:
        cfg = dataclasses.replace(best, vocab_chunk=c)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        ms = time_ms(bwd(cfg))
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else float("nan")
        chunk_rows.append((ms, c, peak))
    lines += ["## backward: vocab_chunk (time, peak GiB of the backward incl. its gradients)"]
    lines += [f"- {ms:9.3f} ms  {c}  {peak:.3f} GiB" for ms, c, peak in sorted(chunk_rows)] + [""]
    lines += ["fastest tiles found (vocab_chunk left as configured; pick it from the table against the memory target):",
              f"`{best!r}`"]
    return "\n".join(lines), {"families": results, "min_programs": split_rows, "vocab_chunk": chunk_rows,
                              "best": dataclasses.asdict(best)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes and tiles (a CPU smoke test through the interpreter)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune.py: no CUDA device visible to torch (or use --tiny --device cpu with TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    text, data = tune(args)
    print(text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "tune.json"), "w") as f:
            json.dump(data, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
