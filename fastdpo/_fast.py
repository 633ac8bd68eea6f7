"""Fast mode: the forward keeps what the backward needs, so the backward does not recompute the logits.

``memory="lean"`` (the default, budget 0) keeps only per-token statistics; the backward recomputes every logit
tile (5 head-sized matmuls per DPO step with a reference head). ``memory="fast"`` (an infinite budget) keeps
everything the backward reads (4 matmuls); a float is a budget in GiB: as many chunks as fit are kept, the others
recomputed. What is kept travels through the head's custom op as two tensors.

- Triton: each logit tile's ``e = exp(z − m_tile)`` in the inputs' dtype and ``m_tile`` in fp32 for the first
  ``V_keep`` vocabulary columns (``kernels/fastdpo_kernels/logprob_fast.py``); about ``2·N·V`` bytes for 16-bit inputs,
  where ``N`` counts every row (the labelled count stays on the device, so the buffer is sized without a host sync).
- chunked engine (:mod:`fastdpo._torch_backend`): for the leading vocabulary chunks within the budget, each chunk's
  ``e = exp(z − r)`` (16-bit on CUDA with 16-bit inputs, else the compute dtype) and the per-row reference ``r``;
  the backward reads them instead of recomputing the chunk's product (sized by all rows, like the Triton buffer).

What is kept is only read by the backward, so a second backward (``retain_graph=True``) reuses it; it is freed
with the autograd graph.
"""

from __future__ import annotations

import math

import torch

from . import _validate
from ._options import HeadOptions
from ._torch_backend import _keepable

_GIB = float(1 << 30)


def resolve_memory(memory) -> float:
    """The budget in GiB: ``"lean"`` is 0, ``"fast"`` infinite, a number itself (finite, >= 0); ValueError else."""
    if isinstance(memory, str):
        if memory in ("lean", "fast"):
            return 0.0 if memory == "lean" else math.inf
    elif _validate.is_real(memory) and 0 <= memory < math.inf:
        return float(memory)
    raise ValueError(f"memory must be 'lean', 'fast' or a budget in GiB (a finite number >= 0), got {memory!r}")


def _triton_kept_like(hidden, weight, opts: HeadOptions):
    """Empty tensors shaped like what :func:`_triton_forward` keeps (for the custom op's fake implementation)."""
    from . import _triton_backend
    from .kernels import logprob_fast as K

    N, V = hidden.shape[0], weight.shape[0]
    # Kept shapes depend on no tuned field (fwd_block_v is never tuned, nor vocab_chunk under a budget).
    config = _triton_backend._config(hidden, weight, None, opts)
    v_keep = K.keep_columns(N, V, hidden.dtype, opts.memory * _GIB, config) if _keepable(opts) else 0
    if v_keep:
        (e_shape, e_dtype), (m_shape, m_dtype) = K.kept_shapes(N, v_keep, hidden.dtype, config)
        return hidden.new_empty(e_shape, dtype=e_dtype), hidden.new_empty(m_shape, dtype=m_dtype)
    return hidden.new_empty(0), hidden.new_empty(0)



# --------------------------------------------------------------------------------------------- Triton backend


def _triton_forward(hidden, weight, bias, targets, opts: HeadOptions, rows=None):
    import functools

    from . import _triton_backend
    from .kernels import logprob_fast as K
    from .kernels import logprob_fwd

    config = _triton_backend._config(hidden, weight, bias, opts)
    N, V = hidden.shape[0], weight.shape[0]
    v_keep = K.keep_columns(N, V, hidden.dtype, opts.memory * _GIB, config) if _keepable(opts) else 0
    if v_keep == 0:
        out, _ = _triton_backend.forward(hidden, weight, bias, targets, opts, rows=rows)
        return out, (hidden.new_empty(0), hidden.new_empty(0))
    kept = K.allocate_kept(N, v_keep, hidden.dtype, hidden.device, config)
    out, _ = _triton_backend.forward(hidden, weight, bias, targets, opts,
                                  launch=functools.partial(logprob_fwd.logprob_forward, kept=kept), rows=rows)
    return out, (kept.e, kept.m_tile)


def _triton_backward(hidden, weight, bias, targets, lse, grad_logp, opts, needs, logp, kept_a, kept_b, rows=None):
    from . import _triton_backend
    from .kernels import logprob_fast as K

    if kept_a.dim() != 2:
        return _triton_backend.backward(hidden, weight, bias, targets, lse, grad_logp, opts, needs, rows=rows)
    config = _triton_backend._config(hidden, weight, bias, opts)
    N, V = hidden.shape[0], weight.shape[0]
    kept = K.Kept(kept_a, kept_b, K.keep_columns(N, V, hidden.dtype, opts.memory * _GIB, config),
                  config.fwd_block_v)
    rows, tgt, nv, valid = _triton_backend._compact(targets, opts.ignore_index, rows)
    zero = torch.zeros((), device=hidden.device)
    lse_c = torch.where(valid, lse.to(torch.float32).gather(0, rows), zero).contiguous()
    g = torch.where(valid, grad_logp.to(torch.float32).gather(0, rows), zero).contiguous()
    # The transformed target logit, for the softcap's derivative at the target: logp + lse.
    zt = torch.where(valid, logp.to(torch.float32).gather(0, rows), zero) + lse_c
    return K.logprob_backward_kept(hidden, weight, _triton_backend._unit_stride(bias), rows, tgt, nv, lse_c, g,
                                   zt.contiguous(), kept,
                                   softcap=opts.softcap, scale=opts.scale, needs=needs, config=config)
