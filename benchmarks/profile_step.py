"""Where one DPO loss step spends its GPU time: a per-kernel breakdown from ``torch.profiler``.

For each implementation (default: fastdpo lean and fast, and TRL when installed) at one shape: warm-up steps
(compiles the kernels), then one profiled step; the kernels sorted by their own device time, with their share of
the step and, against the step's useful work, what the whole step reaches in TFLOP/s. Writes
``$OUT/profile.md`` and ``$OUT/profile.json``. ``--tiny --device cpu`` runs the flow at toy sizes (CPU times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from fastdpo.bench.competitors import get_implementations, make_inputs
from fastdpo.bench.run import SHAPES

TINY = dict(hidden=32, vocab=96, pairs=2, seq_len=16)


def _self_time_us(evt, cuda: bool) -> float:
    if not cuda:
        return evt.self_cpu_time_total
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return getattr(evt, attr)
    return 0.0


def profile_one(impl, inp, warmup: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = inp.hidden.is_cuda
    for _ in range(max(1, warmup)):
        inp.zero_grad()
        impl.step(inp)
    if cuda:
        torch.cuda.synchronize()
    inp.zero_grad()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        impl.step(inp)
        if cuda:
            torch.cuda.synchronize()
    inp.zero_grad()
    events = [e for e in prof.key_averages() if _self_time_us(e, cuda) > 0]
    if cuda:
        # Device-side events only (kernels, memcpy/memset): CPU operators carry no self device time.
        events = [e for e in events if getattr(e, "device_type", None) is None or "CUDA" in str(e.device_type)]
    events.sort(key=lambda e: _self_time_us(e, cuda), reverse=True)
    total = sum(_self_time_us(e, cuda) for e in events)
    rows = [{"name": e.key[:120], "calls": e.count, "us": _self_time_us(e, cuda),
             "share": _self_time_us(e, cuda) / total if total else 0.0} for e in events[:top]]
    return {"impl": impl.key, "label": impl.label, "total_us": total, "kernels": rows,
            "launches": sum(e.count for e in events),
            "tflops": inp.work_flops() / (total * 1e-6) / 1e12 if total else None}


def to_markdown(result: dict) -> str:
    out = [f"### {result['label']}: {result['total_us'] / 1e3:.2f} ms of {'device' if result['cuda'] else 'CPU'} "
           f"time, {result['launches']} launches"
           + (f", {result['tflops']:.0f} TFLOP/s of useful work" if result["tflops"] else ""), "",
           "| kernel | calls | ms | share |", "|---|---|---|---|"]
    for r in result["kernels"]:
        name = r["name"].replace("|", "/")
        out.append(f"| `{name}` | {r['calls']} | {r['us'] / 1e3:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--impl", default="fastdpo,fastdpo-fast,trl")
    p.add_argument("--no-ref", action="store_true", help="reference-free (default: with a reference head)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_step.py: no CUDA device", file=sys.stderr)
        return 2
    s = SHAPES[args.shape]
    size = TINY if args.tiny else dict(hidden=s.hidden, vocab=s.vocab, pairs=s.pairs, seq_len=s.seq_len)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    inp = make_inputs(size["pairs"], size["seq_len"], size["hidden"], size["vocab"], dtype=dtype, device=device,
                      with_ref=not args.no_ref)
    results, text = [], [f"## One step at {args.shape} (H={size['hidden']} V={size['vocab']}, {size['pairs']} pairs x "
                         f"{size['seq_len']}, {'no reference' if args.no_ref else 'with a reference head'}, "
                         f"{args.dtype}): top kernels by own time", ""]
    out = os.environ.get("OUT")
    for impl in get_implementations([k.strip() for k in args.impl.split(",") if k.strip()]):
        reason = impl.unavailable_reason(device, dtype)
        if reason:
            text += [f"### {impl.label}: skipped ({reason})", ""]
            continue
        try:
            res = dict(profile_one(impl, inp, args.warmup, args.top), cuda=device.type == "cuda")
        except Exception as err:  # noqa: BLE001 - one failing implementation must not cost the others' profile
            text += [f"### {impl.label}: failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})", ""]
            continue
        results.append(res)
        text += [to_markdown(res), ""]
        print(text[-2], flush=True)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "profile.md"), "w") as f:
                f.write("\n".join(text) + "\n")
            with open(os.path.join(out, "profile.json"), "w") as f:
                json.dump({"shape": args.shape, "size": size, "results": results}, f, indent=2)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
