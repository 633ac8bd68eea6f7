"""The CPU backend: plain PyTorch, chunked over the vocabulary and the tokens so that no ``[N, V]`` tensor and no
compute-dtype copy of the whole ``[V, H]`` weight exists.

Same semantics as the Triton kernels: logits in fp32 (fp64 for fp64 inputs) from the matmul on, only labelled
tokens are projected, the backward recomputes each chunk's logits. The vocabulary is the outer loop: one chunk
of the weight is upcast at a time, each token chunk writes the chunk's partial statistics (merged by
:func:`fastdpo._merge.merge`, as the Triton splits are), and the backward writes each chunk's weight gradient
once, in the parameter's dtype.
"""

from __future__ import annotations

import torch

from . import _merge
from ._options import HeadOptions

# Elements of one [tokens, vocab chunk] logits tile (fp32: 16 MiB); a few such temporaries live at once.
CHUNK_ELEMENTS = 1 << 22
# Vocabulary rows of the weight upcast at once: at most VOCAB_CHUNK (8192 x H=4096 in fp32 is 128 MiB, 1/8 of a
# 128k-token bf16 head) and at most a sixteenth of the vocabulary, but not under MIN_VOCAB_CHUNK: the fp32 copies
# of one chunk of a 16-bit weight and of its gradient then stay an eighth of the weight's bytes each, and a
# logits tile (at most V·H/16 elements) as much, so that a bf16 step stays under 2x the weight above its inputs.
VOCAB_CHUNK = 8192
MIN_VOCAB_CHUNK = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(columns: int, weight_elements: int | None = None) -> int:
    """Token rows of one ``[rows, columns]`` logits tile: CHUNK_ELEMENTS, or V·H/16 for a smaller head (not under
    64k elements, where the head is too small for its memory to matter)."""
    elements = CHUNK_ELEMENTS
    if weight_elements is not None:
        elements = min(elements, max(1 << 16, weight_elements // 16))
    return max(1, elements // max(columns, 1))


def _vocab_chunks(vocab: int):
    step = max(1, min(VOCAB_CHUNK, max(MIN_VOCAB_CHUNK, -(-vocab // 16))))
    return [(v0, min(vocab, v0 + step)) for v0 in range(0, vocab, step)]


def _logits(x, w, b, opts: HeadOptions):
    """Transformed logits of one chunk, and tanh(z/softcap) when softcapping (for the backward); in place where
    possible, so that few ``[rows, columns]`` tiles live at once."""
    z = x @ w.t()
    if b is not None:
        z.add_(b)
    t = None
    if opts.softcap is not None:
        t = torch.tanh(z.div_(opts.softcap))
        z = t * opts.softcap
    return z.mul_(opts.scale), t


def _cast(weight, bias, cd):
    return weight.to(cd), (bias.to(cd) if bias is not None else None)


def _labelled(targets, ignore_index):
    idx = (targets != ignore_index).nonzero().squeeze(1)
    return idx, targets[idx].to(torch.int64)


def forward(hidden, weight, bias, targets, opts: HeadOptions):
    """Per-token statistics over ``N`` flattened tokens.

    Returns ``(out, saved)``: ``out`` maps names to ``[N]`` tensors (0 where ignored), ``saved`` is what
    :func:`backward` needs (the ``[N]`` logsumexp, 0 where ignored; also ``out["lse"]``).
    """
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    idx, tgt = _labelled(targets, opts.ignore_index)
    n = idx.numel()
    chunks = _vocab_chunks(V)
    stats = torch.empty((_merge.N_STATS_EXTRAS if opts.extras else _merge.N_STATS, len(chunks), n), dtype=cd,
                        device=hidden.device)
    # A vocabulary-parallel head holds the rows from global id vocab_start on.
    for c, (v0, v1) in enumerate(chunks):
        w, b = _cast(weight[v0:v1], bias[v0:v1] if bias is not None else None, cd)
        step = _rows_per_chunk(v1 - v0, weight.numel())
        col0 = opts.vocab_start + v0
        for s in range(0, n, step):
            z, _ = _logits(hidden[idx[s:s + step]].to(cd), w, b, opts)
            _merge.partial_stats(z, tgt[s:s + step] - col0, col0, opts.extras, stats[:, c, s:s + step])
        del w, b
    merged = _merge.merge(stats, opts.vocab_total if opts.vocab_total >= 0 else V, opts.extras, tgt,
                          _merge.resolve_group(opts.group))

    def scatter(values):
        return torch.zeros(N, dtype=values.dtype, device=hidden.device).index_copy_(0, idx, values)

    top1 = merged["argmax"] == tgt.to(cd) if opts.extras else None
    out = _merge.token_outputs(merged, opts.extras, scatter, top1)
    return out, out["lse"]


def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs):
    """Gradients for (hidden, weight, bias) given ``grad_logp [N]``, in their dtypes; None where not needed.

    ``d logp_t / d z_v = onehot(y_t)_v − softmax(z_t)_v``, times the upstream gradient, back through the scale
    and the softcap. The hidden gradient is summed over the vocabulary chunks in the compute dtype; each chunk's
    weight and bias gradient is complete when its chunk is done and is written once in the parameter dtype.
    For a vocabulary-parallel head ``saved`` is the logsumexp over the whole vocabulary and the ranks' hidden
    gradients are summed (one all-reduce of the labelled rows, in the compute dtype).
    """
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    idx, tgt = _labelled(targets, opts.ignore_index)
    n = idx.numel()
    lse = saved[idx].to(cd)
    g = grad_logp[idx].to(cd)
    acc_h = torch.zeros((n, H), dtype=cd, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.empty(V, dtype=bias.dtype, device=bias.device) if need_b else None
    for v0, v1 in _vocab_chunks(V):
        w, b = _cast(weight[v0:v1], bias[v0:v1] if bias is not None else None, cd)
        gw = torch.zeros((v1 - v0, H), dtype=cd, device=weight.device) if need_w else None
        gb = torch.zeros(v1 - v0, dtype=cd, device=weight.device) if need_b else None
        step = _rows_per_chunk(v1 - v0, weight.numel())
        for s in range(0, n, step):
            e = s + step
            x = hidden[idx[s:e]].to(cd)
            z, t = _logits(x, w, b, opts)
            gs = g[s:e].unsqueeze(1)
            dz = z.sub_(lse[s:e].unsqueeze(1)).exp_().mul_(-gs)
            local = tgt[s:e] - (opts.vocab_start + v0)
            inside = ((local >= 0) & (local < v1 - v0)).unsqueeze(1)
            dz.scatter_add_(1, local.clamp(0, v1 - v0 - 1).unsqueeze(1), torch.where(inside, gs, 0))
            dz.mul_(opts.scale)
            if t is not None:
                dz.mul_(t.square_().neg_().add_(1))
            if need_h:
                acc_h[s:e].addmm_(dz, w)
            if need_w:
                gw.addmm_(dz.t(), x)
            if need_b:
                gb += dz.sum(0)
        if need_w:
            grad_w[v0:v1] = gw
        if need_b:
            grad_b[v0:v1] = gb
        # Free this chunk's upcast weight and its gradient before the next chunk allocates its own.
        del w, b, gw, gb
    grad_h = None
    if need_h:
        # A vocabulary-parallel head sums the ranks' hidden gradients here, once, before the cast.
        _merge.all_reduce_sum(acc_h, _merge.resolve_group(opts.group))
        grad_h = torch.zeros((N, H), dtype=hidden.dtype, device=hidden.device).index_copy_(0, idx,
                                                                                          acc_h.to(hidden.dtype))
    return grad_h, grad_w, grad_b


def chunked_backward(hidden, weight, bias, rows_all, dlogits, opts: HeadOptions, needs, *, logits=None, step=None):
    """Gradients for (hidden, weight, bias) of a sum of per-row functions of the transformed logits.

    Walks ``rows_all`` in chunks of whole rows (the function may need a row's every logit, as TRL's entropy
    gradient does); ``dlogits(z, start, rows)`` returns the function's gradient w.r.t. the chunk's transformed
    logits ``z`` (it may reuse ``z``'s memory unless ``logits`` hands out kept logits), which is taken back through
    the scale and the softcap here. ``logits(x, w, b, start, rows)`` returns the chunk's ``(z, tanh)`` as
    :func:`_logits` does (the default: recomputed), e.g. kept from the forward (fast mode); ``step`` is the
    chunk's row count (default: a ``CHUNK_ELEMENTS`` tile). Returns the gradients in the compute dtype, None where
    not needed. Unlike :func:`backward` it upcasts the whole weight and sums its gradient over the token chunks in
    the compute dtype.
    """
    need_h, need_w, need_b = needs
    cd = _compute_dtype(hidden.dtype)
    w, b = _cast(weight, bias, cd)
    grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
    step = step or _rows_per_chunk(weight.shape[0])
    for s in range(0, rows_all.numel(), step):
        rows = rows_all[s:s + step]
        x = hidden[rows].to(cd)
        z, t = logits(x, w, b, s, rows) if logits is not None else _logits(x, w, b, opts)
        dz = dlogits(z, s, rows).mul_(opts.scale)
        if t is not None:
            dz.mul_(1 - t * t)
        if need_h:
            grad_h[rows] = dz @ w
        if need_w:
            grad_w.addmm_(dz.t(), x)
        if need_b:
            grad_b += dz.sum(0)
    return grad_h, grad_w, grad_b
