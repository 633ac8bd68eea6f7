"""The Triton backend: compaction of the labelled tokens, kernel launches, merge of the split stats.

No host synchronisation: the labelled tokens are moved to the front by a stable sort and their count
stays on the device, where the kernels read it.
"""

from __future__ import annotations

import torch

from . import _merge
from ._options import HeadOptions
from .kernels import logprob_bwd, logprob_fwd
from .kernels.config import default_config

# The kernel writes the record layout that the shared merge reads.
assert (logprob_fwd.STAT_MAX, logprob_fwd.STAT_SUMEXP, logprob_fwd.STAT_TARGET, logprob_fwd.STAT_SUM,
        logprob_fwd.STAT_XSUMEXP, logprob_fwd.STAT_SQSUMEXP, logprob_fwd.STAT_ARGMAX) == tuple(range(7))
assert (_merge.MAX, _merge.SUMEXP, _merge.TARGET, _merge.SUM, _merge.XSUMEXP, _merge.SQSUMEXP,
        _merge.ARGMAX) == tuple(range(7))


def _config(x: torch.Tensor):
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    return default_config(x.dtype, capability)


def compaction_order(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A permutation of ``0..N-1`` with the labelled rows first, in order (a stable sort, no host sync); the
    forward computes it once and the backward reuses it."""
    return torch.argsort((targets == ignore_index).to(torch.int8), stable=True)


def _compact(targets: torch.Tensor, ignore_index: int, rows=None):
    """``rows``: :func:`compaction_order` (computed unless given); ``tgt`` the targets in that order; ``nv``: the
    labelled count; ``valid``: which of ``rows`` are labelled."""
    mask = targets != ignore_index
    if rows is None:
        rows = compaction_order(targets, ignore_index)
    nv = mask.sum().to(torch.int32).reshape(1)
    tgt = targets.gather(0, rows).to(torch.int64)
    valid = torch.arange(targets.numel(), device=targets.device) < nv
    return rows, tgt, nv, valid


def _unit_stride(bias):
    """The kernels index the bias as ``b_ptr + v`` (no stride argument): an expanded or strided ``[V]`` bias is
    copied (``[V]`` is small); hidden states and weight go with their strides."""
    return bias if bias is None or bias.stride(0) == 1 else bias.contiguous()


def forward(hidden, weight, bias, targets, opts: HeadOptions, launch=None, rows=None):
    """As :func:`fastdpo._torch_path.forward`: ``(out, saved)`` with ``saved`` the ``[N]`` fp32 logsumexp.

    ``launch`` replaces the forward kernel's launcher (same arguments and record; fast mode's also keeps tiles);
    ``rows`` is :func:`compaction_order` when the caller already has it.
    """
    N = hidden.shape[0]
    bias = _unit_stride(bias)
    rows, tgt, nv, valid = _compact(targets, opts.ignore_index, rows)
    # A vocabulary-parallel head's rows start at global id vocab_start: the kernels see local ids (a target
    # outside this rank's rows matches no column).
    stats = (launch or logprob_fwd.logprob_forward)(hidden, weight, bias, rows, tgt - opts.vocab_start, nv,
                                                    softcap=opts.softcap, scale=opts.scale, extras=opts.extras,
                                                    config=_config(hidden))
    if opts.extras and opts.vocab_start:
        stats[_merge.ARGMAX] += opts.vocab_start
    # Columns past nv were never written: where() keeps them (NaN or not) out of the outputs; across ranks
    # their garbage is reduced alike and dropped alike.
    merged = _merge.merge(stats, opts.vocab_total if opts.vocab_total >= 0 else weight.shape[0], opts.extras, tgt,
                          _merge.resolve_group(opts.group))

    def scatter(values):
        out = torch.zeros(N, dtype=values.dtype, device=hidden.device)
        return out.index_copy_(0, rows, torch.where(valid, values, torch.zeros_like(values)))

    top1 = valid & (merged["argmax"] == tgt.to(torch.float32)) if opts.extras else None
    out = _merge.token_outputs(merged, opts.extras, scatter, top1)
    return out, out["lse"]


def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs, rows=None):
    """As :func:`fastdpo._torch_path.backward`; ``rows``: the forward's :func:`compaction_order`, if kept."""
    bias = _unit_stride(bias)
    rows, tgt, nv, valid = _compact(targets, opts.ignore_index, rows)
    zero = torch.zeros((), device=hidden.device)
    lse = torch.where(valid, saved.to(torch.float32).gather(0, rows), zero)
    g = torch.where(valid, grad_logp.to(torch.float32).gather(0, rows), zero)
    group = _merge.resolve_group(opts.group)
    # Across ranks the hidden gradient is summed in fp32, then cast once.
    gh, gw, gb = logprob_bwd.logprob_backward(hidden, weight, bias, rows, tgt - opts.vocab_start, nv,
                                              lse.contiguous(), g.contiguous(), softcap=opts.softcap,
                                              scale=opts.scale, needs=needs, config=_config(hidden),
                                              grad_x_dtype=torch.float32 if group is not None else None)
    if gh is not None and group is not None:
        gh = _merge.all_reduce_sum(gh, group).to(hidden.dtype)
    return gh, gw, gb
