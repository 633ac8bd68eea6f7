"""The plain-PyTorch reference: materializes the ``[tokens, vocab]`` logits.

This is the ground truth of the tests and the "naive" row of the benchmarks; the fast paths never
call it. Pass float64 tensors to get a float64 reference.
"""

from __future__ import annotations

from typing import Any

import torch

from ._options import IGNORE_INDEX, compute_dtype
from .losses import LossConfig, compute_dpo_loss

__all__ = ["reference_logits", "reference_token_stats", "reference_sequence_logprobs", "reference_dpo_loss"]


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     softcap: float | None = None, logit_scale: float = 1.0, temperature: float = 1.0):
    """Full transformed logits ``[..., V]`` in fp32 (fp64 for fp64 inputs).

    The matmul runs in the inputs' dtype, as a model's own lm-head does, and is upcast afterwards.
    """
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.to(compute_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z * (logit_scale / temperature)


def reference_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                          softcap: float | None = None, logit_scale: float = 1.0, temperature: float = 1.0):
    """Per-token statistics from materialized logits, each shaped like ``targets``, 0 where ignored.

    Returns a dict with ``logp`` (log-prob of the target, differentiable), ``mean_logit`` (mean over
    the vocabulary), ``entropy``, ``log_sum_sq_probs`` (``log Σ_v p_v²``) and ``is_top1`` (target is
    the first argmax), the last four detached.
    """
    z = reference_logits(hidden, weight, bias, softcap=softcap, logit_scale=logit_scale, temperature=temperature)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    with torch.no_grad():
        p = logsm.exp()
        entropy = -(p * logsm).sum(-1)
        lssp = torch.logsumexp(2 * logsm, dim=-1)
        top1 = z.argmax(-1) == safe
        mean_logit = z.mean(-1)
    return {
        "logp": torch.where(mask, logp, zero),
        "mean_logit": torch.where(mask, mean_logit, zero),
        "entropy": torch.where(mask, entropy, zero),
        "log_sum_sq_probs": torch.where(mask, lssp, zero),
        "is_top1": top1 & mask,
    }


def reference_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                average: bool = False, bias: torch.Tensor | None = None,
                                ignore_index: int = IGNORE_INDEX, softcap: float | None = None,
                                logit_scale: float = 1.0, temperature: float = 1.0):
    """``[S]`` summed (or per-token mean) log-probs of the labelled tokens of each sequence."""
    stats = reference_token_stats(hidden, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                                  logit_scale=logit_scale, temperature=temperature)
    total = stats["logp"].sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total


def reference_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                       ref_logps: torch.Tensor | None = None, reference_free: bool = False,
                       bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, softcap: float | None = None, logit_scale: float = 1.0,
                       temperature: float = 1.0, config: LossConfig | None = None, **loss_kwargs: Any):
    """The DPO loss with materialized logits; same arguments and output as :func:`fastdpo.dpo_loss`."""
    config = config if config is not None else LossConfig(**loss_kwargs)
    head = dict(ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale, temperature=temperature)
    stats = reference_token_stats(hidden, weight, labels, bias, **head)
    ref_token_logps = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_token_logps = reference_token_stats(ref_hidden, ref_weight, labels, ref_bias, **head)["logp"]
    return compute_dpo_loss(stats, labels != ignore_index, config, ref_token_logps=ref_token_logps,
                            ref_logps=ref_logps, reference_free=reference_free)
