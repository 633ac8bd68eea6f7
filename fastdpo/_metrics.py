"""The metrics of a DPO step, named as TRL's DPOTrainer logs them, as the values they average.

:func:`fastdpo.losses.compute_dpo_loss` averages them over its batch; the TRL trainer gathers the same values
across processes first, then averages (:class:`fastdpo.integrations.trl.FastDPOTrainer`).
"""

from __future__ import annotations

import torch


def pair_values(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """``[B]`` per-pair values whose means are the reward and log-prob metrics."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple:
    """``(Σ values over mask, number of masked tokens)``, without gradient, in fp32."""
    return (values.detach().to(torch.float32) * mask).sum(), mask.sum()


def logit_sums(stats: dict, mask: torch.Tensor, seqs) -> dict:
    """``(sum, count)`` of the mean logit over the chosen and over the rejected completion tokens."""
    mean_logit = stats["mean_logit"]
    return {"logits/chosen": _masked_sum(seqs.chosen(mean_logit), seqs.chosen(mask)),
            "logits/rejected": _masked_sum(seqs.rejected(mean_logit), seqs.rejected(mask))}


def has_extras(stats: dict) -> bool:
    """Whether the head computed the per-token extras the entropy and accuracy metrics read."""
    return stats.get("entropy") is not None and stats.get("is_top1") is not None


def extra_sums(stats: dict, mask: torch.Tensor, seqs) -> dict:
    """``(sum, count)`` of the entropy over all completion tokens and of the top-1 hits over the chosen ones."""
    return {"entropy": _masked_sum(stats["entropy"], mask),
            "mean_token_accuracy": _masked_sum(seqs.chosen(stats["is_top1"]), seqs.chosen(mask))}


def mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count``, 0 without any token."""
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def batch_metrics(pairs: dict, sums: dict) -> dict:
    """The metrics of one batch: the means of :func:`pair_values` and of the ``(sum, count)`` pairs."""
    return {**{name: values.mean() for name, values in pairs.items()},
            **{name: mean(*total_count) for name, total_count in sums.items()}}
