"""Fast mode: the forward keeps what the backward needs, so the backward does not recompute the logits.

``memory="lean"`` (the default) keeps only per-token statistics; the backward recomputes every logit tile
(5 head-sized matmuls per DPO step with a reference head). ``memory="fast"`` keeps everything the backward
reads (4 matmuls); a float is a budget in GiB: as many chunks as fit are kept, the others recomputed.

- Triton: each logit tile's ``e = exp(z − m_tile)`` in the inputs' dtype and ``m_tile`` in fp32 for the first
  ``V_keep`` vocabulary columns (``kernels/logprob_fast.py``); about ``2·N·V`` bytes for 16-bit inputs, where
  ``N`` counts every row (the labelled count stays on the device, so the buffer is sized without a host sync).
- torch: the transformed logits of whole token chunks in fp32 (fp64 for fp64 inputs), ``4·Nv·V`` bytes; the
  backward reuses them, so its gradients equal lean mode's.

What is kept is only read by the backward, so a second backward (``retain_graph=True``) reuses it; it is freed
with the autograd graph.
"""

from __future__ import annotations

import math

import torch

from ._options import HeadOptions

_GIB = float(1 << 30)
# Elements of one [tokens, V] logits chunk on the torch backend (fp32: 16 MiB).
TORCH_CHUNK_ELEMENTS = 1 << 22


def resolve_memory(memory):
    """``"lean"``, ``"fast"`` or a budget in GiB (a float >= 0); ValueError otherwise."""
    if isinstance(memory, str):
        if memory in ("lean", "fast"):
            return memory
    elif isinstance(memory, (int, float)) and not isinstance(memory, bool) and math.isfinite(memory) and memory >= 0:
        return float(memory)
    raise ValueError(f"memory must be 'lean', 'fast' or a budget in GiB (a finite number >= 0), got {memory!r}")


def budget_bytes(memory) -> float:
    if memory == "lean":
        return 0.0
    if memory == "fast":
        return math.inf
    return float(memory) * _GIB


def backend_for(opts: HeadOptions):
    return _TritonFast if opts.backend == "triton" else _TorchFast


# ---------------------------------------------------------------------------------------------- torch backend


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x, w, b, opts: HeadOptions):
    """Transformed logits of one chunk and ``tanh`` of the capped ones (None without a softcap)."""
    z = x @ w.t()
    if b is not None:
        z = z + b
    t = None
    if opts.softcap is not None:
        t = torch.tanh(z / opts.softcap)
        z = opts.softcap * t
    return z * opts.scale, t


class _TorchFast:
    @staticmethod
    def forward(hidden, weight, bias, targets, opts: HeadOptions):
        N, V = hidden.shape[0], weight.shape[0]
        cd = _compute_dtype(hidden.dtype)
        dev = hidden.device
        idx = (targets != opts.ignore_index).nonzero().squeeze(1)
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        n = idx.numel()
        lse = torch.empty(n, dtype=cd, device=dev)
        out = {"logp": torch.zeros(N, dtype=cd, device=dev), "mean_logit": torch.zeros(N, dtype=cd, device=dev)}
        if opts.extras:
            out["entropy"] = torch.zeros(N, dtype=cd, device=dev)
            out["log_sum_sq_probs"] = torch.zeros(N, dtype=cd, device=dev)
            out["is_top1"] = torch.zeros(N, dtype=torch.bool, device=dev)
        budget = budget_bytes(opts.memory)
        # The softcap's derivative is rebuilt from the kept z through the scale.
        keepable = opts.softcap is None or opts.scale != 0
        kept, used = {}, 0
        step = max(1, TORCH_CHUNK_ELEMENTS // max(V, 1))
        for s in range(0, n, step):
            rows = idx[s:s + step]
            y = targets[rows].unsqueeze(1)
            z, _ = _logits(hidden[rows].to(cd), w, b, opts)
            chunk_lse = torch.logsumexp(z, dim=1)
            lse[s:s + step] = chunk_lse
            out["logp"][rows] = z.gather(1, y).squeeze(1) - chunk_lse
            out["mean_logit"][rows] = z.mean(1)
            if opts.extras:
                logsm = z - chunk_lse.unsqueeze(1)
                out["entropy"][rows] = -(logsm.exp() * logsm).sum(1)
                out["log_sum_sq_probs"][rows] = torch.logsumexp(2 * logsm, dim=1)
                out["is_top1"][rows] = z.argmax(1) == y.squeeze(1)
                del logsm
            nbytes = z.numel() * z.element_size()
            if keepable and used + nbytes <= budget:
                kept[s] = z
                used += nbytes
        return out, (idx, lse, kept)

    @staticmethod
    def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs):
        idx, lse, kept = saved
        need_h, need_w, need_b = needs
        cd = _compute_dtype(hidden.dtype)
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        g_all = grad_logp.to(cd)
        grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
        step = max(1, TORCH_CHUNK_ELEMENTS // max(weight.shape[0], 1))
        for s in range(0, idx.numel(), step):
            rows = idx[s:s + step]
            x = hidden[rows].to(cd)
            z = kept.get(s)
            if z is None:
                z, t = _logits(x, w, b, opts)
            else:
                t = z / (opts.softcap * opts.scale) if opts.softcap is not None else None
            g = g_all[rows].unsqueeze(1)
            # Out of place: a kept z serves a second backward too.
            dz = torch.exp(z - lse[s:s + rows.numel()].unsqueeze(1)).mul_(-g)
            dz.scatter_add_(1, targets[rows].unsqueeze(1), g).mul_(opts.scale)
            if t is not None:
                dz.mul_(1 - t * t)
            if need_h:
                grad_h[rows] = dz @ w
            if need_w:
                grad_w.addmm_(dz.t(), x)
            if need_b:
                grad_b += dz.sum(0)
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip((grad_h, grad_w, grad_b),
                                                                           (hidden, weight, bias)))


# --------------------------------------------------------------------------------------------- Triton backend


class _TritonFast:
    @staticmethod
    def forward(hidden, weight, bias, targets, opts: HeadOptions):
        import functools

        from . import _triton_path
        from .kernels import logprob_fast as K

        config = _triton_path._config(hidden)
        N, V = hidden.shape[0], weight.shape[0]
        keepable = opts.softcap is None or opts.scale != 0
        v_keep = K.keep_columns(N, V, hidden.dtype, budget_bytes(opts.memory), config) if keepable else 0
        if v_keep == 0:
            out, saved = _triton_path.forward(hidden, weight, bias, targets, opts)
            return out, (saved, None, None)
        kept = K.allocate_kept(N, v_keep, hidden.dtype, hidden.device, config)
        out, saved = _triton_path.forward(hidden, weight, bias, targets, opts,
                                          launch=functools.partial(K.logprob_forward_keep, kept=kept))
        zt = None
        if opts.softcap is not None:
            rows, lse = saved[0], saved[-1]
            zt = out["logp"].to(torch.float32).gather(0, rows) + lse
        return out, (saved, kept, zt)

    @staticmethod
    def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs):
        from . import _triton_path
        from .kernels import logprob_fast as K

        lean_saved, kept, zt = saved
        if kept is None:
            return _triton_path.backward(hidden, weight, bias, targets, lean_saved, grad_logp, opts, needs)
        rows, tgt, nv, valid, lse = lean_saved
        g = torch.where(valid, grad_logp.to(torch.float32).gather(0, rows), torch.zeros((), device=hidden.device))
        return K.logprob_backward_kept(hidden, weight, bias, rows, tgt, nv, lse, g.contiguous(),
                                       zt if zt is not None else lse, kept, softcap=opts.softcap,
                                       scale=opts.scale, needs=needs, config=_triton_path._config(hidden))
