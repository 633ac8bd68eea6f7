"""The ``nn.Module`` form of the fused DPO loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _validate as check
from . import vocab_parallel as _vp
from ._options import IGNORE_INDEX, Backend, Memory
from .functional import dpo_loss, loss_config
from .losses import DPOOutput, LossConfig
from .vocab_parallel import VocabParallel


class FusedLinearDPOLoss(nn.Module):
    """Holds the options of :func:`fastdpo.dpo_loss`; called with the tensors.

    Example::

        loss_fn = FusedLinearDPOLoss(beta=0.1)
        out = loss_fn(hidden, model.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_head.weight)
        out.loss.backward()

    Args:
        beta: the DPO temperature. Default 0.1 (``config.beta`` with a config; a different ``beta`` raises).
        config: a :class:`fastdpo.LossConfig`, instead of its fields as keywords.
        ignore_index, softcap, logit_scale, temperature, backend, memory: head options, see
            :func:`fastdpo.fused_logprobs`.
        vocab_parallel: a :class:`fastdpo.VocabParallel` when the weights passed to ``forward`` are this rank's
            rows of a vocabulary-parallel head (see :func:`fastdpo.dpo_loss`). Default None.
        **loss_options: other fields of :class:`fastdpo.LossConfig` (``loss_type``, ...), checked here.
    """

    def __init__(self, beta: float | None = None, *, config: LossConfig | None = None, ignore_index: int = IGNORE_INDEX,
                 softcap: float | None = None, logit_scale: float = 1.0, temperature: float = 1.0,
                 backend: Backend = "auto", vocab_parallel: VocabParallel | None = None, memory: Memory = "lean",
                 **loss_options: Any) -> None:
        super().__init__()
        self.config = loss_config(beta, config, loss_options)
        check.head_options(ignore_index, softcap, logit_scale, temperature, backend)  # refused here, not at the call
        _vp.check_type(vocab_parallel)
        self.head_options = dict(ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
                                 temperature=temperature, backend=backend, vocab_parallel=vocab_parallel,
                                 memory=memory)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                ref_logps: torch.Tensor | None = None, reference_free: bool = False, bias: torch.Tensor | None = None,
                ref_bias: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> DPOOutput:
        """See :func:`fastdpo.dpo_loss`; ``cu_seqlens`` [2B+1] for packed (padding-free) ``hidden [L, H]``."""
        return dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_logps=ref_logps,
                        reference_free=reference_free, bias=bias, ref_bias=ref_bias, config=self.config,
                        cu_seqlens=cu_seqlens, **self.head_options)

    def extra_repr(self) -> str:
        return f"config={self.config}, head={self.head_options}"
