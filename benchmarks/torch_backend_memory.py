"""Peak memory of one DPO step on the torch backend, above its inputs, in units of the lm-head weight's size.

Counts the bytes of every tensor the step creates from the op that makes it until it is freed
(:class:`fastdpo.bench.memory.LiveBytes`): exact live tensor bytes, independent of the allocator. Policy and
reference share the head, as with a frozen reference model's own hidden states.

    python benchmarks/torch_backend_memory.py --vocab 32000 --hidden 1024 --tokens 1024 --dtype bf16
"""

from __future__ import annotations

import argparse

import torch

import fastdpo
from fastdpo.bench.memory import LiveBytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H (default 1024)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens 2B x T, all labelled (default 1024)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default bf16)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    T = args.tokens // 2
    hidden = torch.randn(2, T, args.hidden, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(dtype).requires_grad_()
    ref_hidden = torch.randn(2, T, args.hidden, generator=g).to(dtype)
    labels = torch.randint(0, args.vocab, (2, T), generator=g)
    with LiveBytes() as meter:
        out = fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight, backend="torch")
        out.loss.backward()
        del out
    wbytes = weight.numel() * weight.element_size()
    print(f"V={args.vocab} H={args.hidden} tokens={2 * T} {args.dtype}: peak above inputs "
          f"{meter.peak / 2**20:.1f} MiB = {meter.peak / wbytes:.2f}x the weight ({wbytes / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
