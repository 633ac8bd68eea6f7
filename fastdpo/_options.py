"""Options that travel into the autograd Functions as one frozen (hashable) object."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class HeadOptions:
    """How the lm-head logits are transformed and which per-token statistics are produced.

    ``z = h·Wᵀ + bias``; if ``softcap``: ``z = softcap·tanh(z/softcap)``; then ``z = z·scale``
    where ``scale = logit_scale / temperature``.

    Attributes:
        ignore_index: label value of positions that are skipped (no projection, log-prob 0).
        softcap: tanh soft-capping of the raw logits (Gemma-2's ``final_logit_softcapping``), or None.
        scale: ``logit_scale / temperature``, applied after the softcap.
        backend: the resolved backend, ``"triton"`` or ``"torch"``.
        extras: also compute the entropy, ``log Σ_v p_v²`` and whether the target is the argmax.
        memory: what the forward may keep for the backward, in GiB (see :mod:`fastdpo._fast`): 0 nothing (lean:
            the backward recomputes the logits), ``inf`` everything it needs (fast), else a budget.
    """

    ignore_index: int = -100
    softcap: float | None = None
    scale: float = 1.0
    backend: str = "torch"
    extras: bool = False
    memory: float = 0.0
