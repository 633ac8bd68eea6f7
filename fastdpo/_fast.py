"""Fast mode: the forward keeps what the backward needs, so the backward does not recompute the logits.

``memory="lean"`` (the default, budget 0) keeps only per-token statistics; the backward recomputes every logit
tile (5 head-sized matmuls per DPO step with a reference head). ``memory="fast"`` (an infinite budget) keeps
everything the backward reads (4 matmuls); a float is a budget in GiB: as many chunks as fit are kept, the others
recomputed. What is kept travels through the head's custom op as two tensors.

- Triton: each logit tile's ``e = exp(z − m_tile)`` in the inputs' dtype and ``m_tile`` in fp32 for the first
  ``V_keep`` vocabulary columns (``kernels/fastdpo_kernels/logprob_fast.py``); about ``2·N·V`` bytes for 16-bit inputs, where
  ``N`` counts every row (the labelled count stays on the device, so the buffer is sized without a host sync).
- torch: the transformed logits of whole token chunks in fp32 (fp64 for fp64 inputs), up to ``4·N·V`` bytes
  (sized by all rows, like the Triton buffer); the backward reuses them. This path walks token chunks with an
  fp32 copy of the weight, as the torch backend did before it walked the vocabulary: fine for CPU-sized heads.

What is kept is only read by the backward, so a second backward (``retain_graph=True``) reuses it; it is freed
with the autograd graph.
"""

from __future__ import annotations

import math

import torch

from . import _torch_path, _validate
from ._options import HeadOptions
from ._torch_path import _compute_dtype, _logits

_GIB = float(1 << 30)
# Elements of one [tokens, V] logits chunk on the torch backend (fp32: 16 MiB).
TORCH_CHUNK_ELEMENTS = 1 << 22


def resolve_memory(memory) -> float:
    """The budget in GiB: ``"lean"`` is 0, ``"fast"`` infinite, a number itself (finite, >= 0); ValueError else."""
    if isinstance(memory, str):
        if memory in ("lean", "fast"):
            return 0.0 if memory == "lean" else math.inf
    elif _validate.is_real(memory) and math.isfinite(memory) and memory >= 0:
        return float(memory)
    raise ValueError(f"memory must be 'lean', 'fast' or a budget in GiB (a finite number >= 0), got {memory!r}")


def _keepable(opts: HeadOptions) -> bool:
    # With a softcap the backward rebuilds tanh from the kept logits through the scale.
    return opts.softcap is None or opts.scale != 0


def forward(hidden, weight, bias, targets, opts: HeadOptions):
    """``(out, (kept_a, kept_b))``: the backend's outputs (with ``lse``) and what it keeps (empty if nothing fits)."""
    if opts.backend == "triton":
        return _triton_forward(hidden, weight, bias, targets, opts)
    return _torch_forward(hidden, weight, bias, targets, opts)


def backward(hidden, weight, bias, targets, lse, grad_logp, opts: HeadOptions, needs, logp, kept_a, kept_b):
    """Gradients as the backends' ``backward``; kept chunks are read from ``kept_a``/``kept_b``."""
    if opts.backend == "triton":
        return _triton_backward(hidden, weight, bias, targets, lse, grad_logp, opts, needs, logp, kept_a, kept_b)
    return _torch_backward(hidden, weight, bias, targets, lse, grad_logp, opts, needs, kept_a)


def kept_like(hidden, weight, opts: HeadOptions):
    """Empty tensors shaped like what :func:`forward` keeps (for the custom op's fake implementation)."""
    N, V = hidden.shape[0], weight.shape[0]
    if opts.backend == "triton":
        from . import _triton_path
        from .kernels import logprob_fast as K

        # Kept shapes depend on no tuned field (fwd_block_v is never tuned, nor vocab_chunk under a budget).
        config = _triton_path._config(hidden, weight, None, opts)
        v_keep = K.keep_columns(N, V, hidden.dtype, opts.memory * _GIB, config) if _keepable(opts) else 0
        if v_keep:
            (e_shape, e_dtype), (m_shape, m_dtype) = K.kept_shapes(N, v_keep, hidden.dtype, config)
            return hidden.new_empty(e_shape, dtype=e_dtype), hidden.new_empty(m_shape, dtype=m_dtype)
        return hidden.new_empty(0), hidden.new_empty(0)
    rows = _torch_kept_rows(N, V, hidden.dtype, opts)
    return hidden.new_empty((rows, V) if rows else (0,), dtype=_compute_dtype(hidden.dtype)), hidden.new_empty(0)


# ---------------------------------------------------------------------------------------------- torch backend


def _torch_step(V: int) -> int:
    return max(1, TORCH_CHUNK_ELEMENTS // max(V, 1))


def _torch_kept_rows(N: int, V: int, dtype, opts: HeadOptions) -> int:
    """Labelled rows whose logits are kept: whole token chunks within the budget, sized by all ``N`` rows (the
    labelled count is data)."""
    if not _keepable(opts) or N == 0:
        return 0
    per_row = V * _compute_dtype(dtype).itemsize
    fit = N if math.isinf(opts.memory) else int(opts.memory * _GIB // per_row)
    if fit >= N:
        return N
    step = _torch_step(V)
    return fit // step * step


def _torch_forward(hidden, weight, bias, targets, opts: HeadOptions):
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    dev = hidden.device
    idx = (targets != opts.ignore_index).nonzero().squeeze(1)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    out = {k: torch.zeros(N, dtype=cd, device=dev) for k in ("logp", "mean_logit", "lse")}
    if opts.extras:
        out["entropy"] = torch.zeros(N, dtype=cd, device=dev)
        out["log_sum_sq_probs"] = torch.zeros(N, dtype=cd, device=dev)
        out["is_top1"] = torch.zeros(N, dtype=torch.bool, device=dev)
    rows_kept = _torch_kept_rows(N, V, hidden.dtype, opts)
    kept = torch.empty((rows_kept, V) if rows_kept else (0,), dtype=cd, device=dev)
    step = _torch_step(V)
    for s in range(0, idx.numel(), step):
        rows = idx[s:s + step]
        y = targets[rows].unsqueeze(1)
        z, _ = _logits(hidden[rows].to(cd), w, b, opts)
        chunk_lse = torch.logsumexp(z, dim=1)
        out["lse"][rows] = chunk_lse
        out["logp"][rows] = z.gather(1, y).squeeze(1) - chunk_lse
        out["mean_logit"][rows] = z.mean(1)
        if opts.extras:
            logsm = z - chunk_lse.unsqueeze(1)
            p = logsm.exp()
            # p·log p → 0 for a masked (-inf) logit, its limit, instead of 0·(-inf) = NaN.
            out["entropy"][rows] = -torch.where(p > 0, p * logsm, 0).sum(1)
            del p
            out["log_sum_sq_probs"][rows] = torch.logsumexp(2 * logsm, dim=1)
            out["is_top1"][rows] = z.argmax(1) == y.squeeze(1)
            del logsm
        if s + rows.numel() <= rows_kept:
            kept[s:s + rows.numel()] = z
    return out, (kept, hidden.new_empty(0))


def _torch_backward(hidden, weight, bias, targets, lse_all, grad_logp, opts: HeadOptions, needs, kept):
    cd = _compute_dtype(hidden.dtype)
    idx = (targets != opts.ignore_index).nonzero().squeeze(1)
    g_all = grad_logp.to(cd)
    lse_all = lse_all.to(cd)
    rows_kept = kept.shape[0] if kept.dim() == 2 else 0

    def chunk_logits(x, w, b, s, rows):
        if s + rows.numel() <= rows_kept:
            z = kept[s:s + rows.numel()]
            return z, (z / (opts.softcap * opts.scale) if opts.softcap is not None else None)
        return _logits(x, w, b, opts)

    def dlogp(z, s, rows):
        g = g_all[rows].unsqueeze(1)
        # Out of place: the kept z serves a second backward too.
        dz = torch.exp(z - lse_all[rows].unsqueeze(1)).mul_(-g)
        return dz.scatter_add_(1, targets[rows].unsqueeze(1), g)

    grads = _torch_path.chunked_backward(hidden, weight, bias, idx, dlogp, opts, needs, logits=chunk_logits,
                                         step=_torch_step(weight.shape[0]))
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))


# --------------------------------------------------------------------------------------------- Triton backend


def _triton_forward(hidden, weight, bias, targets, opts: HeadOptions):
    import functools

    from . import _triton_path
    from .kernels import logprob_fast as K
    from .kernels import logprob_fwd

    config = _triton_path._config(hidden, weight, bias, opts)
    N, V = hidden.shape[0], weight.shape[0]
    v_keep = K.keep_columns(N, V, hidden.dtype, opts.memory * _GIB, config) if _keepable(opts) else 0
    if v_keep == 0:
        out, _ = _triton_path.forward(hidden, weight, bias, targets, opts)
        return out, (hidden.new_empty(0), hidden.new_empty(0))
    kept = K.allocate_kept(N, v_keep, hidden.dtype, hidden.device, config)
    out, _ = _triton_path.forward(hidden, weight, bias, targets, opts,
                                  launch=functools.partial(logprob_fwd.logprob_forward, kept=kept))
    return out, (kept.e, kept.m_tile)


def _triton_backward(hidden, weight, bias, targets, lse, grad_logp, opts, needs, logp, kept_a, kept_b):
    from . import _triton_path
    from .kernels import logprob_fast as K

    if kept_a.dim() != 2:
        return _triton_path.backward(hidden, weight, bias, targets, lse, grad_logp, opts, needs)
    config = _triton_path._config(hidden, weight, bias, opts)
    N, V = hidden.shape[0], weight.shape[0]
    kept = K.Kept(kept_a, kept_b, K.keep_columns(N, V, hidden.dtype, opts.memory * _GIB, config),
                  config.fwd_block_v)
    rows, tgt, nv, valid = _triton_path._compact(targets, opts.ignore_index)
    zero = torch.zeros((), device=hidden.device)
    lse_c = torch.where(valid, lse.to(torch.float32).gather(0, rows), zero).contiguous()
    g = torch.where(valid, grad_logp.to(torch.float32).gather(0, rows), zero).contiguous()
    # The transformed target logit, for the softcap's derivative at the target: logp + lse.
    zt = torch.where(valid, logp.to(torch.float32).gather(0, rows), zero) + lse_c
    return K.logprob_backward_kept(hidden, weight, _triton_path._unit_stride(bias), rows, tgt, nv, lse_c, g,
                                   zt.contiguous(), kept,
                                   softcap=opts.softcap, scale=opts.scale, needs=needs, config=config)
