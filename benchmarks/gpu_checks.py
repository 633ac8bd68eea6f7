"""Correctness of the Triton path on a real GPU, before any timing: ``run_checks("cuda")``.

The CPU test suite runs the kernels through the interpreter; this runs the compiled kernels at odd
shapes (H, V, T not multiples of any block) in fp32, bf16 and fp16, with a softcap, a bias and ignored
tokens, in lean mode, fast mode and a GiB budget that keeps part of the vocabulary, against a float64
reference on the same device, every gradient included; then the cases only
a GPU can hold: a weight and a hidden-state tensor of more than 2^31 elements (int64 offsets),
bit-identical reruns, and an all-ignored batch; and every config the autotuner may choose, against float64. The
checks run with autotuning off (``FASTDPO_AUTOTUNE=0``: the default config), the candidates explicitly. ``tiny=True``
shrinks everything so the same code can be smoke-tested on CPU through the interpreter.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback

import torch

import fastdpo
from fastdpo.reference import reference_token_stats

STATS = ("logp", "mean_logit", "entropy", "log_sum_sq_probs")
HEADS = {"plain": dict(), "softcap+bias+scale": dict(softcap=9.0, logit_scale=1.2, temperature=0.8, bias=True)}


def _batch(rows, T, H, V, device, seed, logit_std=4.0, prompt_frac=0.25):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (logit_std / H ** 0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, : max(1, int(prompt_frac * T))] = -100
    labels[1::2, T - T // 5:] = -100
    return hidden.to(device), weight.to(device), bias.to(device), labels.to(device)


def _stats_and_grads(fn, hidden, weight, bias, labels, upstream, head, dtype):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = bias.to(dtype).requires_grad_() if head.get("bias") else None
    kw = {k: v for k, v in head.items() if k != "bias" and (fn is _ours or k != "memory")}
    stats = fn(h, w, labels, b, kw)
    grads = torch.autograd.grad((stats["logp"] * upstream.to(stats["logp"].dtype)).sum(),
                                [t for t in (h, w, b) if t is not None])
    return stats, grads


def _ours(h, w, labels, b, kw):
    return fastdpo.token_stats(h, w, labels, bias=b, backend="triton", extras=True, **kw)


def _half_budget_gib(hidden, weight, dtype):
    """A ``memory`` budget that keeps about half of the vocabulary's chunks (the rest recomputed)."""
    from fastdpo import _triton_backend
    from fastdpo.kernels import logprob_fast

    config = _triton_backend._config(hidden.to(dtype))
    N, V = hidden.shape[0] * hidden.shape[1], weight.shape[0]
    chunk = min(config.vocab_chunk, V)
    keep = max(chunk, (V // 2) // chunk * chunk)
    return logprob_fast.kept_bytes(N, keep, dtype, config) / 2 ** 30


def _reference(h, w, labels, b, kw):
    return reference_token_stats(h, w, labels, b, **kw)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_odd_shapes(device, tiny):
    """Every per-token output and gradient against float64 on the same (dtype-rounded) inputs.

    With the inputs rounded to the dtype first, the float64 reference is exact for what the kernel
    sees: what is left is the kernel's own error (fp32 accumulation, the logit gradient and the
    outputs rounded to the dtype), which the tolerances bound.
    """
    rows, T, H, V = (4, 9, 19, 53) if tiny else (6, 37, 1031, 50021)
    tolerances = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 5e-3), torch.bfloat16: (1e-3, 1.5e-2)}
    lines, ok = [], True
    hidden, weight, bias, labels = _batch(rows, T, H, V, device, seed=1)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    for head_name, head in HEADS.items():
        for dtype, (logp_tol, grad_tol) in tolerances.items():
            rounded = [t.to(dtype).double() for t in (hidden, weight, bias)]
            ref, ref_g = _stats_and_grads(_reference, *rounded, labels, upstream, head, torch.float64)
            for memory in ("lean", "fast", _half_budget_gib(hidden, weight, dtype)):
                mode = memory if isinstance(memory, str) else f"{memory * 1024:.3g} MiB budget"
                ours, ours_g = _stats_and_grads(_ours, hidden, weight, bias, labels, upstream,
                                                dict(head, memory=memory), dtype)
                errs = {name: _abs(ours[name], ref[name]) for name in STATS}
                grad_err = max(_rel(a, b) for a, b in zip(ours_g, ref_g))
                top1 = bool(torch.equal(ours["is_top1"], ref["is_top1"]))
                finite = all(bool(torch.isfinite(ours[n]).all()) for n in STATS)
                good = finite and max(errs.values()) <= logp_tol and grad_err <= grad_tol and top1
                ok &= good
                lines.append(f"{head_name} {str(dtype).split('.')[-1]} {mode}: logp err {errs['logp']:.1e}, extras "
                             f"err {max(errs[n] for n in STATS[1:]):.1e} (tol {logp_tol:.0e}), grad rel err "
                             f"{grad_err:.1e} (tol {grad_tol:.1e}), top1 {'ok' if top1 else 'DIFFERS'}: "
                             f"{'PASS' if good else 'FAIL'}")
    return ok, lines


def check_large_weight(device, tiny):
    """A weight of more than 2^31 elements: its row offsets need int64."""
    V, H = (67, 33) if tiny else (262147, 8200)
    rows, T = 4, 16
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float32) * (4.0 / H ** 0.5)).to(device, torch.bfloat16)
    hidden = torch.randn(rows, T, H, generator=g).to(device, torch.bfloat16)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :4] = -100
    labels[:, -1] = V - 1  # the last vocabulary row, at the largest offset
    labels = labels.to(device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fastdpo.fused_logprobs(h, w, labels, backend="triton")
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    hr, wr = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = reference_token_stats(hr, wr, labels)["logp"]
    rgh, rgw = torch.autograd.grad(ref.sum(), (hr, wr))
    errs = (_abs(logp, ref), _rel(gh, rgh), _rel(gw, rgw), _rel(gw[-1000:], rgw[-1000:]))
    good = errs[0] <= 2e-3 and max(errs[1:]) <= 2e-2
    verdict = "PASS" if good else "FAIL"
    return good, [f"weight {V}x{H} = {V * H / 2**31:.2f}x2^31 elements: logp err {errs[0]:.1e}, grad-hidden rel "
                  f"{errs[1]:.1e}, grad-weight rel {errs[2]:.1e} (last rows {errs[3]:.1e}): {verdict}"]


def check_large_hidden(device, tiny):
    """Hidden states of more than 2^31 elements, labelled tokens at the far end."""
    rows, T, H, V = (2, 40, 24, 31) if tiny else (4, 65600, 8200, 1000)
    g = torch.Generator().manual_seed(4)
    hidden = torch.empty(rows, T, H, dtype=torch.bfloat16, device=device).normal_(generator=None)
    weight = (torch.randn(V, H, generator=g) * (4.0 / H ** 0.5)).to(device, torch.bfloat16)
    labels = torch.full((rows, T), -100, dtype=torch.long)
    labels[:, -6:] = torch.randint(0, V, (rows, 6), generator=g)
    labels[0, 3] = 5
    labels = labels.to(device)
    h, w = hidden.requires_grad_(), weight.clone().requires_grad_()
    logp = fastdpo.fused_logprobs(h, w, labels, backend="triton")
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    mask = labels != -100
    hs = hidden.detach()[mask].float().requires_grad_()
    wr = weight.float().requires_grad_()
    ref = reference_token_stats(hs, wr, labels[mask])["logp"]
    rgh, rgw = torch.autograd.grad(ref.sum(), (hs, wr))
    stray = (gh.float().abs().sum() - gh[mask].float().abs().sum()).item()
    errs = (_abs(logp[mask], ref), _rel(gh[mask], rgh), _rel(gw, rgw))
    good = errs[0] <= 2e-3 and max(errs[1:]) <= 2e-2 and stray == 0 and bool((logp[~mask] == 0).all())
    return good, [f"hidden {rows}x{T}x{H} = {rows * T * H / 2**31:.2f}x2^31 elements: logp err {errs[0]:.1e}, "
                  f"grad-hidden rel {errs[1]:.1e}, grad-weight rel {errs[2]:.1e}, gradient outside labelled rows "
                  f"{stray:g}: {'PASS' if good else 'FAIL'}"]


def check_determinism_and_empty(device, tiny):
    rows, T, H, V = (4, 9, 19, 53) if tiny else (8, 513, 2049, 32003)
    hidden, weight, _, labels = _batch(rows, T, H, V, device, seed=5)
    outs = []
    for _ in range(2):
        h, w = hidden.to(torch.bfloat16).requires_grad_(), weight.to(torch.bfloat16).requires_grad_()
        logp = fastdpo.fused_logprobs(h, w, labels, backend="triton")
        outs.append((logp, *torch.autograd.grad(logp.sum(), (h, w))))
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    none = torch.full_like(labels, -100)
    logp = fastdpo.fused_logprobs(h, w, none, backend="triton")
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    zeros = bool((logp == 0).all() and (gh == 0).all() and (gw == 0).all())
    return same and zeros, [f"bit-identical rerun: {'PASS' if same else 'FAIL'}; all-ignored batch gives zeros: "
                            f"{'PASS' if zeros else 'FAIL'}"]


def check_packed(device, tiny):
    """Packed (padding-free) DPO against the same sequences padded, and a loss reduction without host syncs."""
    import os

    from fastdpo.losses import LossConfig, compute_dpo_loss

    rows, T, H, V = (4, 9, 19, 53) if tiny else (8, 515, 2049, 32003)
    hidden, weight, _, labels = _batch(rows, T, H, V, device, seed=6)
    # Odd rows end in T//5 ignored tokens: here they are padding, absent from the packed stream.
    lengths = [T if r % 2 == 0 else T - T // 5 for r in range(rows)]
    cu = torch.tensor([0] + [sum(lengths[:r + 1]) for r in range(rows)], device=device, dtype=torch.int32)
    lines, ok = [], True
    for dtype in (torch.float32, torch.bfloat16):
        ref_hidden = (hidden * 0.9).to(dtype)
        results = []
        for packed in (False, True):
            h = hidden.to(dtype)
            r, y = ref_hidden, labels
            if packed:
                h = torch.cat([h[i, :n] for i, n in enumerate(lengths)])
                r = torch.cat([r[i, :n] for i, n in enumerate(lengths)])
                y = torch.cat([y[i, :n] for i, n in enumerate(lengths)])
            h = h.requires_grad_()
            w = weight.to(dtype).requires_grad_()
            out = fastdpo.dpo_loss(h, w, y, ref_hidden=r, ref_weight=w.detach(), backend="triton",
                                   loss_type=["sigmoid", "ipo"], ld_alpha=0.5, use_weighting=True,
                                   cu_seqlens=cu if packed else None)
            gh, gw = torch.autograd.grad(out.loss, (h, w))
            if packed:
                gh = torch.stack([torch.nn.functional.pad(gh[cu[i]:cu[i + 1]], (0, 0, 0, T - n))
                                  for i, n in enumerate(lengths)])
            results.append((out, gh, gw))
        (a, gha, gwa), (b, ghb, gwb) = results
        errs = {"loss": _rel(b.loss, a.loss), "logps": _rel(torch.cat([b.chosen_logps, b.rejected_logps]),
                                                             torch.cat([a.chosen_logps, a.rejected_logps])),
                "grad-h": _rel(ghb, gha), "grad-W": _rel(gwb, gwa)}
        good = all(e <= 1e-4 for e in errs.values())
        ok &= good
        lines.append(f"{str(dtype).replace('torch.', '')} packed vs padded: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" {'PASS' if good else 'FAIL'}")
    # The per-sequence reductions, the loss formulas and their backward on the packed stream, with CUDA's sync
    # debugging set to raise on any host synchronisation (offset value checks off, as FASTDPO_CHECK_LABELS=0 does).
    L = int(cu[-1])
    g = torch.Generator(device="cpu").manual_seed(7)
    logp = (-torch.rand(L, generator=g)).to(device).requires_grad_()
    stats = {"logp": logp, "mean_logit": torch.zeros(L, device=device), "entropy": torch.zeros(L, device=device),
             "is_top1": torch.zeros(L, dtype=torch.bool, device=device),
             "log_sum_sq_probs": torch.zeros(L, device=device)}
    mask = torch.rand(L, generator=g).to(device) > 0.3
    config = LossConfig(loss_type=["sigmoid", "ipo", "sft", "simpo"], use_weighting=True, extra_metrics=True)
    previous = os.environ.get("FASTDPO_CHECK_LABELS")
    os.environ["FASTDPO_CHECK_LABELS"] = "0"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = compute_dpo_loss(stats, mask, config, ref_token_logps=torch.zeros(L, device=device), cu_seqlens=cu)
        out.loss.backward()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        if previous is None:
            del os.environ["FASTDPO_CHECK_LABELS"]
        else:
            os.environ["FASTDPO_CHECK_LABELS"] = previous
    lines.append("packed loss reductions and backward without a host sync: "
                 + ("PASS" if device == "cuda" else "not checked off CUDA (ran)"))
    return ok, lines


def check_tuning_candidates(device, tiny):
    """Each config the autotuner may choose here (:func:`fastdpo.kernels.config.tuning_space` from the default),
    bf16 on a GPU (fp32 through the interpreter), softcap, bias and extras, lean and fast, against float64."""
    from fastdpo import _triton_backend
    from fastdpo.kernels.config import tuning_space, use_config

    rows, T, H, V = (2, 9, 19, 53) if tiny else (4, 129, 1031, 20011)
    dtype, (logp_tol, grad_tol) = ((torch.float32, (1e-4, 1e-4)) if device == "cpu" else
                                   (torch.bfloat16, (1e-3, 1.5e-2)))
    hidden, weight, bias, labels = _batch(rows, T, H, V, device, seed=7)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device)
    head = HEADS["softcap+bias+scale"]
    rounded = [t.to(dtype).double() for t in (hidden, weight, bias)]
    ref, ref_g = _stats_and_grads(_reference, *rounded, labels, upstream, head, torch.float64)
    base = _triton_backend._config(hidden.to(dtype))
    sm = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else None
    configs = list(dict.fromkeys(dataclasses.replace(base, **c) for _, cands in tuning_space(base, sm) for c in cands))
    lines, ok = [], True
    for cfg in configs:
        changed = {k: v for k, v in dataclasses.asdict(cfg).items() if getattr(base, k) != v} or "default"
        if tiny and changed != "default" and all(k.endswith("_stages") for k in changed):
            continue  # the interpreter ignores the pipeline depth: the same run as the default's
        for memory in ("lean", "fast"):
            with use_config(cfg):
                ours, ours_g = _stats_and_grads(_ours, hidden, weight, bias, labels, upstream,
                                                dict(head, memory=memory), dtype)
            err = max(_abs(ours[name], ref[name]) for name in STATS)
            grad_err = max(_rel(a, b) for a, b in zip(ours_g, ref_g))
            good = err <= logp_tol and grad_err <= grad_tol
            ok &= good
            lines.append(f"{changed} {memory}: stats err {err:.1e} (tol {logp_tol:.0e}), grad rel err {grad_err:.1e} "
                         f"(tol {grad_tol:.1e}): {'PASS' if good else 'FAIL'}")
    return ok, lines


CHECKS = {
    "odd shapes vs float64": check_odd_shapes,
    "weight > 2^31 elements": check_large_weight,
    "hidden > 2^31 elements": check_large_hidden,
    "determinism, empty batch": check_determinism_and_empty,
    "packed (padding-free) vs padded": check_packed,
    "autotuning candidates vs float64": check_tuning_candidates,
}


def run_checks(device="cuda", tiny=False):
    """Run every check; returns ``(all_passed, markdown_lines)``. A check that raises counts as failed."""
    all_ok, out = True, []
    # The default config in every check; check_tuning_candidates runs the others.
    saved = os.environ.get("FASTDPO_AUTOTUNE")
    os.environ["FASTDPO_AUTOTUNE"] = "0"
    try:
        for name, fn in CHECKS.items():
            t0 = time.perf_counter()
            try:
                ok, lines = fn(device, tiny)
            except Exception:  # noqa: BLE001 - a crash is a failed check, reported with its traceback
                ok, lines = False, ["raised:", "```", traceback.format_exc(limit=6).rstrip(), "```"]
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            all_ok &= ok
            out.append(f"- **{name}** ({time.perf_counter() - t0:.1f} s): {'PASS' if ok else 'FAIL'}")
            out += [f"  - {line}" if not line.startswith(("`", "  ")) else line for line in lines]
    finally:
        if saved is None:
            os.environ.pop("FASTDPO_AUTOTUNE", None)
        else:
            os.environ["FASTDPO_AUTOTUNE"] = saved
    return all_ok, out


def main(argv=None) -> int:
    """``python3 benchmarks/gpu_checks.py [--device cpu --tiny]``: the checks alone; ``$OUT/gpu_checks.md``."""
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_checks.py: no CUDA device", file=sys.stderr)
        return 2
    ok, lines = run_checks(args.device, tiny=args.tiny)
    text = "\n".join(["## Correctness checks (benchmarks/gpu_checks.py)", ""] + lines) + "\n"
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_checks.md"), "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
