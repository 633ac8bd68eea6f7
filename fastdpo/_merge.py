"""The one merge of per-token partial statistics, shared by both backends.

Each backend walks the vocabulary in pieces (the Triton forward's splits, the torch backend's chunks) and
writes, for every labelled token and piece, a partial record ``stats[k, piece, token]`` whose rows ``k`` are
defined once in :mod:`fastdpo.kernels.records`.

:func:`merge` rescales the pieces to the overall max and sums them. The pieces may come from one device or,
for a vocabulary-parallel head, from several ranks: the max is then an all-reduce(max) of the ``[n]`` maxima and
the rescaled sums one all-reduce(sum) of the packed ``[k, n]`` sums (see :func:`merge`). The backward of such a
head sums the ranks' hidden gradients with :func:`all_reduce_sum`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The record layout the kernels write (one definition, shared with the torch backend).
from .kernels.records import ARGMAX, MAX, N_STATS, N_STATS_EXTRAS, SQSUMEXP, SUM, SUMEXP, TARGET, XSUMEXP  # noqa: F401


def _finite_ref(m: torch.Tensor) -> torch.Tensor:
    """The max to subtract before ``exp``: 0 where it is ``-inf`` (all logits masked), so ``exp(-inf − ref) = 0``."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def partial_stats(z: torch.Tensor, local_target: torch.Tensor, col0: int, extras: bool, out: torch.Tensor):
    """Write one piece's record for a chunk of tokens: ``z [rows, vc]`` are the piece's logits, ``local_target
    [rows]`` the target ids minus ``col0`` (the piece's first vocabulary id), ``out [k, rows]`` the record."""
    m = z.amax(1)
    e = (z - _finite_ref(m).unsqueeze(1)).exp_()
    out[MAX] = m
    out[SUMEXP] = e.sum(1)
    inside = (local_target >= 0) & (local_target < z.shape[1])
    zt = z.gather(1, local_target.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    out[TARGET] = torch.where(inside, zt, torch.zeros_like(zt))
    out[SUM] = z.sum(1)
    if extras:
        # A -inf logit becomes the lowest finite value, whose product with exp(-inf) = 0 is 0; NaN stays NaN.
        out[XSUMEXP] = z.clamp(min=torch.finfo(z.dtype).min).mul_(e).sum(1)
        out[SQSUMEXP] = e.square_().sum(1)
        out[ARGMAX] = (z.argmax(1) + col0).to(out.dtype)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place (nothing without a group or for an empty tensor, which every rank of a
    vocabulary-parallel head has alike: the ranks share the labels)."""
    if group is not None and t.numel():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def merge(stats: torch.Tensor, vocab: int, extras: bool, targets: torch.Tensor, group=None) -> dict:
    """Per-token statistics from the partial records ``stats [k, pieces, n]`` of a ``vocab``-token head.

    ``targets [n]`` are the tokens' target ids: one outside ``[0, vocab)`` (unchecked labels) matches no piece,
    and its log-prob is NaN rather than a finite wrong value.

    Returns ``[n]`` tensors: ``lse`` (logsumexp), ``logp`` (target log-prob; NaN if any logit is NaN),
    ``mean_logit`` and, with ``extras``, ``entropy`` (``lse − Σ p·z``), ``log_sum_sq_probs``
    (``log Σ p² = log Σ e² − 2 log Σ e``) and ``argmax`` (the first index of the overall max).

    With a process ``group`` the records are this rank's rows of a vocabulary-parallel head (``vocab`` is the
    whole vocabulary, ``ARGMAX`` holds global ids, every rank has the same ``n`` tokens) and the merge spans
    the ranks with two collectives: an all-reduce (max) of the ``[n]`` per-token maxima, then one all-reduce
    (sum) of the sums rescaled to that max, packed ``[3 or 5 + world, n]``. The first argmax rides in the sum:
    rank ``r`` writes its own first argmax into slot ``r`` where its max equals the global max and the sentinel
    ``vocab`` elsewhere (0 in the other ranks' slots, so each slot's sum is exact); the smallest slot is the
    first argmax overall, whatever the order of the ranks' ranges. Ids are exact in fp32 below 2²⁴.
    """
    m_split, s_split = stats[MAX], stats[SUMEXP]
    m_local = m_split.amax(0)
    m = m_local
    if group is not None and m.numel():
        m = m_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    ref = _finite_ref(m)
    w = torch.exp(m_split - ref)
    sums = [(s_split * w).sum(0), stats[TARGET].sum(0), stats[SUM].sum(0)]
    if extras:
        sums += [(stats[XSUMEXP] * w).sum(0), (stats[SQSUMEXP] * w * w).sum(0)]
        # The pieces go left to right and argmax takes the first maximal one: the first argmax of this head.
        best = m_split.argmax(0, keepdim=True)
        argmax = stats[ARGMAX].gather(0, best).squeeze(0)
        if group is not None:
            slots = torch.zeros((dist.get_world_size(group), argmax.numel()), dtype=argmax.dtype,
                                device=argmax.device)
            slots[dist.get_rank(group)] = torch.where(m_local == m, argmax, torch.full_like(argmax, vocab))
            sums += list(slots)
    if group is not None:
        packed = all_reduce_sum(torch.stack(sums), group)
        sums = list(packed[:5 if extras else 3])
        if extras:
            argmax = packed[5:].amin(0)
    s, target, zsum = sums[:3]
    lse = ref + torch.log(s)
    logp = target - lse
    logp = torch.where(torch.isnan(zsum), zsum, logp)
    logp = torch.where((targets < 0) | (targets >= vocab), torch.full_like(logp, float("nan")), logp)
    out = {"lse": lse, "logp": logp, "mean_logit": zsum / vocab}
    if extras:
        out["entropy"] = lse - sums[3] / s
        out["log_sum_sq_probs"] = torch.log(sums[4]) - 2 * torch.log(s)
        out["argmax"] = argmax
    return out


def token_outputs(merged: dict, extras: bool, scatter, is_top1) -> dict:
    """The backends' ``[N]`` outputs from :func:`merge`'s ``[n]`` statistics: ``scatter(values)`` places the
    labelled tokens' values (0 elsewhere); ``is_top1 [n]`` bool (None without ``extras``)."""
    out = {"logp": scatter(merged["logp"]), "mean_logit": scatter(merged["mean_logit"]),
           "lse": scatter(merged["lse"])}
    if extras:
        out["entropy"] = scatter(merged["entropy"])
        out["log_sum_sq_probs"] = scatter(merged["log_sum_sq_probs"])
        out["is_top1"] = scatter(is_top1)
    return out
