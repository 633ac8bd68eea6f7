"""The DPO loss family: functions of the four sequence log-probs.

Everything here runs on ``[2B]`` / ``[2B, T]`` tensors after the fused kernels have produced the
per-token log-probs, so autograd through these few ops yields the one coefficient per token that the
kernel backward consumes. Any loss written here therefore works on every backend unchanged.

Notation (per pair ``b``; ``c`` chosen, ``r`` rejected):

- ``π_c, π_r``: policy sequence log-probs (sum over the completion tokens, or their mean with
  ``average_log_prob``, or LD-DPO's shared-plus-``ld_alpha``-tail sum with ``ld_alpha``).
- ``ρ_c, ρ_r``: the same for the reference (0 without one).
- ``u_c = π_c − ρ_c``, ``u_r = π_r − ρ_r``: the log-ratios.
- ``s_c = f'(u_c)``, ``s_r = f'(u_r)``: the f-divergence scores (``s = u`` for the default reverse KL);
  ``Δ = s_c − s_r``.
- ``|c|, |r|``: completion lengths (labelled tokens), ``ā_c, ā_r``: per-token mean policy log-probs.
- ``NLL``: mean negative log-prob of all chosen completion tokens of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import _metrics
from ._loss_config import (
    _MEAN_LOGP_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    TRL_LOSS_TYPES,
    LossConfig,
)
from ._packing import Sequences

__all__ = ["LossConfig", "DPOOutput", "compute_dpo_loss", "LOSS_TYPES", "TRL_LOSS_TYPES", "F_DIVERGENCE_TYPES",
           "F_DIVERGENCE_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES"]

# The exp() of the α-divergence score is clamped here, as TRL does for fp32, so it stays finite.
_ALPHA_EXP_CLAMP = 80.0


class _Pairs:
    """The ``[B]`` quantities the loss formulas read; see the module docstring for the notation."""

    def __init__(self, **values):
        self.__dict__.update(values)


# --- the loss types -------------------------------------------------------------------------------------------
# Each maps (pairs, config) -> per-pair loss [B]. They follow TRL 1.16 DPOTrainer._compute_loss line by line
# where TRL has the type, so that the same config gives the same numbers.

def _sigmoid(p, cfg):
    """DPO (arXiv 2305.18290): ``−log σ(β·Δ)``."""
    return -F.logsigmoid(cfg.beta * p.delta)


def _hinge(p, cfg):
    """SLiC (arXiv 2305.10425): ``max(0, 1 − β·Δ)``."""
    return torch.relu(1 - cfg.beta * p.delta)


def _ipo(p, cfg):
    """IPO (arXiv 2310.12036, eq. 17), length-normalised as TRL: ``(s_c/|c| − s_r/|r| − 1/(2β))²``."""
    return (p.chosen_scores / p.chosen_len - p.rejected_scores / p.rejected_len - 1 / (2 * cfg.beta)) ** 2


def _exo_pair(p, cfg):
    """EXO-pref (arXiv 2402.00856, eq. 16) with ε = ``label_smoothing``:
    ``σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)``."""
    x = cfg.beta * p.delta
    eps = cfg.label_smoothing
    return (torch.sigmoid(x) * (F.logsigmoid(x) - _log(1 - eps, math.log1p(-eps) if eps < 1 else None))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - _log(eps)))


def _log(x, value=None):
    """``log x`` as a Python float, −inf at 0 and NaN below (as torch gives them: ε outside (0, 1) is accepted, as
    TRL accepts it), where ``math.log`` raises; ``value`` is an accurate form of it for ``x > 0``."""
    if x > 0:
        return math.log(x) if value is None else value
    return -math.inf if x == 0 else math.nan


def _nca_pair(p, cfg):
    """NCA (arXiv 2402.05369): ``−log σ(βu_c) − ½ log σ(−βu_c) − ½ log σ(−βu_r)``."""
    rc, rr = cfg.beta * p.chosen_logratios, cfg.beta * p.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def _robust(p, cfg):
    """Robust DPO (arXiv 2403.00409) with flip rate ε = ``label_smoothing``:
    ``(−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)``."""
    x = cfg.beta * p.delta
    eps = cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _bco_pair(p, cfg):
    """BCO, paired form (arXiv 2404.04656): ``−log σ(βu_c) − log σ(−βu_r)``."""
    return -F.logsigmoid(cfg.beta * p.chosen_logratios) - F.logsigmoid(-cfg.beta * p.rejected_logratios)


def _sppo_hard(p, cfg):
    """SPPO with hard labels (arXiv 2405.00675): ``(u_c − 1/(2β))² + (u_r + 1/(2β))²``."""
    return (p.chosen_logratios - 0.5 / cfg.beta) ** 2 + (p.rejected_logratios + 0.5 / cfg.beta) ** 2


def _smoothed_logsigmoid(x, eps):
    """Conservative DPO's smoothed logistic loss: ``−(1−ε)·log σ(x) − ε·log σ(−x)``."""
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def _smoothed_sigmoid(delta, cfg):
    return _smoothed_logsigmoid(cfg.beta * delta, cfg.label_smoothing)


def _aot(p, cfg):
    """AOT, paired (arXiv 2406.05882): sort ``π_c − π_r`` and ``ρ_c − ρ_r`` across the batch, ``d`` their
    difference rank by rank; ``−(1−ε)·log σ(βd) − ε·log σ(−βd)``. The per-pair losses are in sorted order."""
    policy, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    ref, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(policy - ref, cfg)


def _aot_unpaired(p, cfg):
    """AOT, unpaired (arXiv 2406.05882): sort ``u_c`` and ``u_r`` across the batch separately, then as ``aot``."""
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen - rejected, cfg)


def _apo_zero(p, cfg):
    """APO-zero (arXiv 2408.06266, eq. 7): ``1 − σ(βu_c) + σ(βu_r)``."""
    return 1 - torch.sigmoid(cfg.beta * p.chosen_logratios) + torch.sigmoid(cfg.beta * p.rejected_logratios)


def _apo_down(p, cfg):
    """APO-down (arXiv 2408.06266, eq. 8): ``σ(βu_c) + 1 − σ(β(u_c − u_r))``."""
    return (torch.sigmoid(cfg.beta * p.chosen_logratios)
            + 1 - torch.sigmoid(cfg.beta * (p.chosen_logratios - p.rejected_logratios)))


def _discopop(p, cfg):
    """DiscoPOP (arXiv 2406.08414, eq. 5), ``x = βΔ``, ``m = σ(x/τ)``: ``(1−m)·(−log σ(x)) + m·e^(−x)``."""
    x = cfg.beta * p.delta
    m = torch.sigmoid(x / cfg.discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


def _sft(p, cfg):
    """The NLL of the chosen completions (RPO's term, arXiv 2404.19733): ``NLL`` for every pair."""
    return p.nll.expand(p.delta.shape[0])


def _sigmoid_norm(p, cfg):
    """Length-normalised DPO, as TRL: ``−log σ(β·(s_c/|c| − s_r/|r|))``."""
    return -F.logsigmoid(cfg.beta * (p.chosen_scores / p.chosen_len - p.rejected_scores / p.rejected_len))


def _simpo(p, cfg):
    """SimPO (Meng et al., arXiv 2405.14734, eq. 6), no reference, length-normalised, target margin γ, with
    ``x = β·(ā_c − ā_r) − γ`` (γ = ``simpo_gamma``): ``−(1−ε)·log σ(x) − ε·log σ(−x)``, ε = ``label_smoothing``
    (TRL's CPOTrainer with ``loss_type="simpo"``; ε = 0 is the paper's loss)."""
    return _smoothed_logsigmoid(cfg.beta * (p.chosen_mean_logps - p.rejected_mean_logps) - cfg.simpo_gamma,
                                cfg.label_smoothing)


def _cpo(p, cfg):
    """CPO (Xu et al., arXiv 2401.08417, eq. 7), no reference, with ``x = β·(π_c − π_r)``:
    ``−(1−ε)·log σ(x) − ε·log σ(−x) + α·NLL`` with α = ``cpo_alpha``, ε = ``label_smoothing`` (TRL's CPOTrainer
    with ``loss_type="sigmoid"``; ε = 0 is the paper's loss)."""
    return (_smoothed_logsigmoid(cfg.beta * (p.chosen_logps - p.rejected_logps), cfg.label_smoothing)
            + cfg.cpo_alpha * p.nll)


def _log1mexp(x):
    """``log(1 − eˣ)`` for ``x < 0``, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo_log_odds(p):
    """``log odds(ā_c) − log odds(ā_r)`` with ``log odds(a) = a − log(1 − eᵃ)``; ā is clamped just below 0 so
    that a completion without tokens (ā = 0) stays finite."""
    tiny = torch.finfo(p.chosen_mean_logps.dtype).eps
    ac = p.chosen_mean_logps.clamp(max=-tiny)
    ar = p.rejected_mean_logps.clamp(max=-tiny)
    return (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))


def _orpo(p, cfg):
    """ORPO (Hong et al., arXiv 2403.07691, eqs. 6-7), no reference, λ = β as in TRL's ORPOTrainer:
    ``NLL − β·log σ(log odds(ā_c) − log odds(ā_r))`` (see :func:`_orpo_log_odds`)."""
    return p.nll - cfg.beta * F.logsigmoid(_orpo_log_odds(p))


_PAIR_LOSSES = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo, "cpo": _cpo, "orpo": _orpo,
}
assert tuple(_PAIR_LOSSES) == LOSS_TYPES


def _f_scores(logratios, cfg):
    """``f'(u)`` of the configured f-divergence (f-DPO, arXiv 2309.16240), as TRL computes it."""
    kind = cfg.f_divergence_type
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(cfg.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a1 = cfg.f_alpha_divergence_coef - 1.0
        return torch.expm1(torch.clamp(a1 * logratios, max=_ALPHA_EXP_CLAMP)) / a1
    # reverse KL, and the α → 1 limit of the α-divergence, which is reverse KL too.
    return logratios


@dataclass
class DPOOutput:
    """What :func:`fastdpo.dpo_loss` returns.

    Attributes:
        loss: scalar loss, ``Σ_i weight_i · mean_b loss_i(b)``.
        chosen_logps, rejected_logps: ``[B]`` policy sequence log-probs ``π`` (differentiable).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs (zeros without a reference).
        chosen_rewards, rejected_rewards: ``[B]`` detached ``β·(π − ρ)``.
        losses: ``[B]`` per-pair losses ``Σ_i weight_i · loss_i(b)`` (so ``loss = losses.mean()``); ``aot``
            terms are in the batch's sorted order, not the pairs'.
        metrics: scalar tensors named as TRL's DPOTrainer logs them; with an ``sft``/``cpo``/``orpo`` term also
            ``nll_loss`` (the mean NLL of the chosen tokens, as TRL's CPO/ORPO trainers log it), with ``orpo`` also
            ``log_odds_ratio`` (mean ``log σ`` of the log odds ratio) and ``log_odds_chosen`` (mean log odds ratio),
            as TRL's ORPOTrainer names them.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    losses: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _ld_weights(mask: torch.Tensor, alpha: float, dtype, seqs: Sequences) -> torch.Tensor:
    """LD-DPO token weights (the tokens' layout): 1 on the first ``min(|c|, |r|)`` completion tokens of each
    sequence, ``alpha`` on the rest (TRL's shared and tail masks), 0 off the completion."""
    position = seqs.cumsum(mask)
    lengths = seqs.sum(mask)
    B = seqs.pairs
    shared = seqs.per_token(torch.minimum(lengths[:B], lengths[B:]).repeat(2))
    tail = mask & (position > shared)
    return (mask & ~tail).to(dtype) + alpha * tail.to(dtype)


def compute_dpo_loss(stats: dict[str, torch.Tensor], mask: torch.Tensor, config: LossConfig, *,
                     ref_token_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                     reference_free: bool = False, cu_seqlens: torch.Tensor | None = None) -> DPOOutput:
    """The loss, rewards and metrics from per-token statistics of the policy (and reference).

    Args:
        stats: per-token tensors ``[2B, T]`` (``[L]`` packed) as produced by the fused head, 0 off the mask: ``logp``
            (differentiable), ``mean_logit``; ``log_sum_sq_probs`` with ``use_weighting``; ``entropy`` and
            ``is_top1`` with ``extra_metrics`` (when present they are reported in any case).
        mask: ``[2B, T]`` (``[L]`` packed) bool, the completion tokens.
        config: the loss options.
        ref_token_logps: ``[2B, T]`` reference per-token log-probs (0 off the mask), or None.
        ref_logps: ``[2B]`` precomputed reference sequence log-probs, used as given, or None.
        reference_free: no reference (``ρ = 0``); also what happens when neither reference is given.
        cu_seqlens: ``[2B+1]`` offsets when the per-token tensors are a packed ``[L]`` stream (chosen 1..B then
            rejected 1..B, see :mod:`fastdpo._packing`); per-sequence sums are then segment sums. Taken as checked.
    """
    logp = stats["logp"]
    seqs = Sequences(mask, cu_seqlens)
    counts = seqs.sum(mask).to(logp.dtype).clamp(min=1)
    pol, ref = _sequence_logps(logp, mask, counts, config, seqs, ref_token_logps, ref_logps, reference_free)
    pairs = _pairs(pol, ref, logp, mask, counts, config, seqs)
    losses = _weighted_losses(pairs, config, _wpo_weights(stats, mask, counts, config, seqs))
    chosen_rewards = config.beta * pairs.chosen_logratios.detach()
    rejected_rewards = config.beta * pairs.rejected_logratios.detach()
    metrics = dpo_metrics(stats, mask, config, seqs, pairs, chosen_rewards, rejected_rewards)
    return DPOOutput(loss=losses.mean(), chosen_logps=pairs.chosen_logps, rejected_logps=pairs.rejected_logps,
                     ref_chosen_logps=pairs.ref_chosen_logps, ref_rejected_logps=pairs.ref_rejected_logps,
                     chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, losses=losses, metrics=metrics)


# --- the steps of compute_dpo_loss ----------------------------------------------------------------------------

def _sequence(token_logps, counts, config, ld, seqs):
    if ld is not None:
        return seqs.sum(token_logps * ld)
    total = seqs.sum(token_logps)
    return total / counts if config.average_log_prob else total


def _sequence_logps(logp, mask, counts, config, seqs, ref_token_logps, ref_logps, reference_free):
    """``[2B]`` policy and reference sequence log-probs ``π`` and ``ρ`` (``ρ = 0`` without a reference)."""
    dtype = logp.dtype
    ld = _ld_weights(mask, config.ld_alpha, dtype, seqs) if config.ld_alpha is not None else None
    pol = _sequence(logp, counts, config, ld, seqs)
    if ref_token_logps is not None and not reference_free:
        ref = _sequence(ref_token_logps.detach().to(dtype), counts, config, ld, seqs)
    elif ref_logps is not None and not reference_free:
        ref = ref_logps.detach().to(dtype)
    else:
        ref = torch.zeros_like(pol.detach())
    return pol, ref


def _pairs(pol, ref, logp, mask, counts, config, seqs) -> _Pairs:
    """The ``[B]`` quantities of every pair that the loss formulas read."""
    B = seqs.pairs
    pc, pr = pol[:B], pol[B:]
    rc, rr = ref[:B], ref[B:]
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    chosen_scores, rejected_scores = _f_scores(chosen_ratio, config), _f_scores(rejected_ratio, config)
    used = set(config.loss_types)
    pairs = _Pairs(
        chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
        chosen_logratios=chosen_ratio, rejected_logratios=rejected_ratio,
        chosen_scores=chosen_scores, rejected_scores=rejected_scores, delta=chosen_scores - rejected_scores,
        chosen_len=counts[:B], rejected_len=counts[B:], nll=None, chosen_mean_logps=None, rejected_mean_logps=None,
    )
    if used & {"sft", "cpo", "orpo"}:
        # Mean over all chosen tokens of the batch (TRL's sft, and the cross-entropy of CPO/ORPO), 0 without any.
        pairs.nll = -seqs.chosen(logp).sum() / seqs.chosen(mask).sum().clamp(min=1).to(logp.dtype)
    if used & _MEAN_LOGP_LOSS_TYPES:
        means = seqs.sum(logp) / counts
        pairs.chosen_mean_logps, pairs.rejected_mean_logps = means[:B], means[B:]
    return pairs


def _wpo_weights(stats, mask, counts, config, seqs):
    """WPO's ``[B]`` per-pair weights ``w_c·w_r`` (without gradient), or None without ``use_weighting``."""
    if not config.use_weighting:
        return None
    lssp = stats.get("log_sum_sq_probs")
    if lssp is None:
        raise ValueError("use_weighting=True needs stats['log_sum_sq_probs'] (compute the head with extras=True)")
    logp = stats["logp"]
    with torch.no_grad():
        aligned = seqs.sum((logp.detach() - lssp.to(logp.dtype)) * mask) / counts
        w = torch.exp(aligned)
        return w[:seqs.pairs] * w[seqs.pairs:]


def _weighted_losses(pairs, config, pair_weights):
    """``[B]`` per-pair losses ``Σ_i weight_i · loss_i(b)``, each term scaled by the WPO weights if any."""
    losses = None
    for name, weight in zip(config.loss_types, config.weights):
        per_pair = _PAIR_LOSSES[name](pairs, config)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        losses = weight * per_pair if losses is None else losses + weight * per_pair
    return losses


def _loss_metrics(pairs, config) -> dict:
    """The metrics of the CPO/ORPO trainers: ``nll_loss`` with an sft/cpo/orpo term, the log odds with orpo."""
    used = set(config.loss_types)
    metrics = {}
    if pairs.nll is not None:
        # As TRL's CPOTrainer, which skips (and logs 0 for) the NLL when its weight cpo_alpha is 0.
        nll_off = used == {"cpo"} and config.cpo_alpha == 0
        metrics["nll_loss"] = torch.zeros_like(pairs.nll.detach()) if nll_off else pairs.nll.detach()
    if "orpo" in used:
        # Named and defined as TRL's ORPOTrainer logs them: the mean log σ of the log odds ratio, and its mean.
        log_odds = _orpo_log_odds(pairs).detach()
        metrics["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
        metrics["log_odds_chosen"] = log_odds.mean()
    return metrics


def dpo_metrics(stats, mask, config, seqs, pairs, chosen_rewards, rejected_rewards) -> dict:
    """The metrics of :func:`compute_dpo_loss`, named as TRL logs them (see :mod:`fastdpo._metrics`)."""
    if config.extra_metrics and not _metrics.has_extras(stats):
        raise ValueError("extra_metrics=True needs stats['entropy'] and stats['is_top1'] (compute the head with "
                         "extras=True)")
    metrics = _metrics.batch_metrics(
        _metrics.pair_values(chosen_rewards, rejected_rewards, pairs.chosen_logps, pairs.rejected_logps),
        _metrics.logit_sums(stats, mask, seqs))
    metrics.update(_loss_metrics(pairs, config))
    # Reported whenever the head computed them (they cost nothing more then), not only when asked.
    if _metrics.has_extras(stats):
        metrics.update(_metrics.batch_metrics({}, _metrics.extra_sums(stats, mask, seqs)))
    return metrics
