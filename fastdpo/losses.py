"""The DPO loss family: functions of the four sequence log-probs.

Everything here runs on ``[2B]`` / ``[2B, T]`` tensors after the fused kernels have produced the
per-token log-probs, so autograd through these few ops yields the one coefficient per token that the
kernel backward consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["LossConfig", "DPOOutput", "compute_dpo_loss", "LOSS_TYPES"]


def _sigmoid(ctx):
    return -F.logsigmoid(ctx["beta"] * ctx["delta"])


# name -> per-pair loss of a context dict holding beta, delta, the four log-probs and the ratios.
_PAIR_LOSSES = {
    "sigmoid": _sigmoid,
}
LOSS_TYPES = tuple(_PAIR_LOSSES)


@dataclass(frozen=True)
class LossConfig:
    """Options of the DPO loss, named as in TRL's ``DPOConfig``.

    Attributes:
        beta: temperature of the implicit reward ``β·(π − ρ)``; must be > 0.
        loss_type: which loss of the family (see ``LOSS_TYPES``).
        average_log_prob: use the per-token mean log-prob of each sequence instead of the sum.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    average_log_prob: bool = False

    def __post_init__(self):
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or not self.beta > 0:
            raise ValueError(f"beta must be a positive number, got {self.beta!r}")
        if self.loss_type not in _PAIR_LOSSES:
            raise ValueError(f"loss_type must be one of {list(_PAIR_LOSSES)}, got {self.loss_type!r}")


@dataclass
class DPOOutput:
    """What :func:`fastdpo.dpo_loss` returns.

    Attributes:
        loss: scalar loss (mean over pairs).
        chosen_logps, rejected_logps: ``[B]`` policy sequence log-probs (differentiable).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs (zeros when reference-free).
        chosen_rewards, rejected_rewards: ``[B]`` detached ``β·(π − ρ)``.
        losses: ``[B]`` per-pair losses.
        metrics: scalar tensors named as TRL's DPOTrainer logs them.
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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values.detach().to(torch.float32)
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), torch.zeros_like(values.sum()))


def compute_dpo_loss(stats: dict, mask: torch.Tensor, config: LossConfig, *, ref_token_logps=None,
                     ref_logps=None, reference_free=False) -> DPOOutput:
    """The loss, rewards and metrics from per-token statistics of the policy (and reference).

    Args:
        stats: per-token tensors ``[2B, T]`` as produced by the fused head: ``logp`` (differentiable),
            ``mean_logit``; optionally ``entropy``, ``log_sum_sq_probs``, ``is_top1``.
        mask: ``[2B, T]`` bool, the completion tokens.
        config: the loss options.
        ref_token_logps: ``[2B, T]`` reference per-token log-probs, or None.
        ref_logps: ``[2B]`` precomputed reference sequence log-probs, or None.
        reference_free: no reference (``ρ = 0``).
    """
    logp = stats["logp"]
    counts = mask.sum(-1)
    pol = logp.sum(-1)
    if config.average_log_prob:
        pol = pol / counts.clamp(min=1)
    if ref_token_logps is not None:
        ref = ref_token_logps.detach().sum(-1)
        if config.average_log_prob:
            ref = ref / counts.clamp(min=1)
    elif ref_logps is not None:
        ref = ref_logps.detach().to(pol.dtype)
    else:
        ref = torch.zeros_like(pol.detach())
    B = pol.shape[0] // 2
    pc, pr = pol[:B], pol[B:]
    rc, rr = ref[:B], ref[B:]
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    ctx = {
        "beta": config.beta, "delta": chosen_ratio - rejected_ratio,
        "chosen_logps": pc, "rejected_logps": pr, "ref_chosen_logps": rc, "ref_rejected_logps": rr,
        "chosen_logratios": chosen_ratio, "rejected_logratios": rejected_ratio,
    }
    losses = _PAIR_LOSSES[config.loss_type](ctx)
    loss = losses.mean()

    chosen_rewards = config.beta * chosen_ratio.detach()
    rejected_rewards = config.beta * rejected_ratio.detach()
    cmask, rmask = mask[:B], mask[B:]
    mean_logit = stats["mean_logit"]
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
        "logits/chosen": _masked_mean(mean_logit[:B], cmask),
        "logits/rejected": _masked_mean(mean_logit[B:], rmask),
    }
    if stats.get("entropy") is not None:
        metrics["entropy"] = _masked_mean(stats["entropy"], mask)
    if stats.get("is_top1") is not None:
        metrics["mean_token_accuracy"] = _masked_mean(stats["is_top1"][:B], cmask)
    return DPOOutput(loss=loss, chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                     chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, losses=losses,
                     metrics=metrics)
