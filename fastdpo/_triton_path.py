"""The Triton backend: compaction of the labelled tokens, kernel launches, merge of the split stats.

No host synchronisation: the labelled tokens are moved to the front by a stable sort and their count
stays on the device, where the kernels read it.
"""

from __future__ import annotations

import torch

from ._options import HeadOptions
from .kernels import logprob_bwd, logprob_fwd
from .kernels.config import default_config


def _config(x: torch.Tensor):
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    return default_config(x.dtype, capability)


def _compact(targets: torch.Tensor, ignore_index: int):
    """``rows``: a permutation of ``0..N-1`` with the labelled rows first (in order); ``nv``: their count."""
    mask = targets != ignore_index
    rows = torch.argsort((~mask).to(torch.int8), stable=True)
    nv = mask.sum().to(torch.int32).reshape(1)
    tgt = targets.gather(0, rows).to(torch.int64)
    valid = torch.arange(targets.numel(), device=targets.device) < nv
    return rows, tgt, nv, valid


def forward(hidden, weight, bias, targets, opts: HeadOptions, launch=None):
    """``launch`` replaces the forward kernel's launcher (same arguments and stats; fast mode's keeps tiles)."""
    N = hidden.shape[0]
    F = logprob_fwd
    rows, tgt, nv, valid = _compact(targets, opts.ignore_index)
    stats = (launch or F.logprob_forward)(hidden, weight, bias, rows, tgt, nv, softcap=opts.softcap,
                                          scale=opts.scale, extras=opts.extras, config=_config(hidden))
    # Merge the vocabulary splits. Columns past nv were never written: keep them out with where().
    m_split, s_split = stats[F.STAT_MAX], stats[F.STAT_SUMEXP]
    m = m_split.max(0).values
    w = torch.exp(m_split - m)
    s = (s_split * w).sum(0)
    lse = m + torch.log(s)
    zsum = stats[F.STAT_SUM].sum(0)
    logp = stats[F.STAT_TARGET].sum(0) - lse
    # A NaN anywhere in a token's logits reaches Σz even where max() dropped it.
    logp = torch.where(torch.isnan(zsum), zsum, logp)

    def scatter(values):
        out = torch.zeros(N, dtype=values.dtype, device=hidden.device)
        return out.index_copy_(0, rows, torch.where(valid, values, torch.zeros_like(values)))

    out = {"logp": scatter(logp), "mean_logit": scatter(zsum / weight.shape[0])}
    if opts.extras:
        entropy = lse - (stats[F.STAT_XSUMEXP] * w).sum(0) / s
        lssp = torch.log((stats[F.STAT_SQSUMEXP] * w * w).sum(0)) - 2 * torch.log(s)
        # The first argmax overall sits in the first split that reaches the overall max.
        best = m_split.argmax(0, keepdim=True)
        amax = stats[F.STAT_ARGMAX].gather(0, best).squeeze(0)
        out["entropy"] = scatter(entropy)
        out["log_sum_sq_probs"] = scatter(lssp)
        out["is_top1"] = scatter(valid & (amax == tgt.to(torch.float32)))
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    return out, (rows, tgt, nv, valid, lse)


def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs):
    rows, tgt, nv, valid, lse = saved
    g = torch.where(valid, grad_logp.to(torch.float32).gather(0, rows), torch.zeros((), device=hidden.device))
    gh, gw, gb = logprob_bwd.logprob_backward(hidden, weight, bias, rows, tgt, nv, lse, g.contiguous(),
                                              softcap=opts.softcap, scale=opts.scale, needs=needs,
                                              config=_config(hidden))
    return gh, gw, gb


