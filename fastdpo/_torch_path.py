"""The CPU backend: plain PyTorch, chunked over tokens so that no ``[N, V]`` tensor exists.

Same semantics as the Triton kernels: logits in fp32 (fp64 for fp64 inputs) from the matmul on,
only labelled tokens are projected, the backward recomputes each chunk's logits.
"""

from __future__ import annotations

import torch

from ._options import HeadOptions

# Elements of one [tokens, V] logits chunk (fp32: 16 MiB); a few such temporaries live at once.
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _logits(x, w, b, opts: HeadOptions):
    """Transformed logits of one chunk, and tanh(z/softcap) when softcapping (for the backward)."""
    z = x @ w.t()
    if b is not None:
        z = z + b
    t = None
    if opts.softcap is not None:
        t = torch.tanh(z / opts.softcap)
        z = opts.softcap * t
    return z * opts.scale, t


def _cast(weight, bias, cd):
    return weight.to(cd), (bias.to(cd) if bias is not None else None)


def forward(hidden, weight, bias, targets, opts: HeadOptions):
    """Per-token statistics over ``N`` flattened tokens.

    Returns ``(out, saved)``: ``out`` maps names to ``[N]`` tensors (0 where ignored), ``saved`` is
    what :func:`backward` needs.
    """
    N = hidden.shape[0]
    cd = _compute_dtype(hidden.dtype)
    idx = (targets != opts.ignore_index).nonzero().squeeze(1)
    w, b = _cast(weight, bias, cd)
    n = idx.numel()
    lse = torch.empty(n, dtype=cd, device=hidden.device)
    logp = torch.zeros(N, dtype=cd, device=hidden.device)
    mean = torch.zeros(N, dtype=cd, device=hidden.device)
    out = {"logp": logp, "mean_logit": mean}
    if opts.extras:
        for k in ("entropy", "log_sum_sq_probs"):
            out[k] = torch.zeros(N, dtype=cd, device=hidden.device)
        out["is_top1"] = torch.zeros(N, dtype=torch.bool, device=hidden.device)
    step = _rows_per_chunk(weight.shape[0])
    for s in range(0, n, step):
        rows = idx[s:s + step]
        y = targets[rows].unsqueeze(1)
        z, _ = _logits(hidden[rows].to(cd), w, b, opts)
        chunk_lse = torch.logsumexp(z, dim=1)
        lse[s:s + step] = chunk_lse
        logp[rows] = z.gather(1, y).squeeze(1) - chunk_lse
        mean[rows] = z.mean(1)
        if opts.extras:
            logsm = z - chunk_lse.unsqueeze(1)
            out["entropy"][rows] = -(logsm.exp() * logsm).sum(1)
            out["log_sum_sq_probs"][rows] = torch.logsumexp(2 * logsm, dim=1)
            out["is_top1"][rows] = z.argmax(1) == y.squeeze(1)
    return out, (idx, lse)


def chunked_backward(hidden, weight, bias, rows_all, dlogits, opts: HeadOptions, needs):
    """Gradients for (hidden, weight, bias) of a sum of per-row functions of the transformed logits.

    Walks ``rows_all`` in chunks; ``dlogits(z, start, rows)`` returns the function's gradient w.r.t. the
    chunk's transformed logits ``z`` (it may reuse ``z``'s memory), which is taken back through the scale
    and the softcap here. Returns the gradients in the compute dtype, None where not needed.
    """
    need_h, need_w, need_b = needs
    cd = _compute_dtype(hidden.dtype)
    w, b = _cast(weight, bias, cd)
    grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
    step = _rows_per_chunk(weight.shape[0])
    for s in range(0, rows_all.numel(), step):
        rows = rows_all[s:s + step]
        x = hidden[rows].to(cd)
        z, t = _logits(x, w, b, opts)
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


def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs):
    """Gradients for (hidden, weight, bias) given ``grad_logp [N]``, in their dtypes; None where not needed."""
    idx, lse = saved
    g_all = grad_logp.to(_compute_dtype(hidden.dtype))

    def dlogp(z, start, rows):
        # d logp / d z = onehot(y) - softmax(z), times the upstream gradient.
        g = g_all[rows].unsqueeze(1)
        dz = torch.exp(z - lse[start:start + rows.numel()].unsqueeze(1)).mul_(-g)
        return dz.scatter_add_(1, targets[rows].unsqueeze(1), g)

    grads = chunked_backward(hidden, weight, bias, idx, dlogp, opts, needs)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))
