"""The head: per-token log-probs (and statistics) of an lm-head from hidden states, behind one interface.

Layering, from the user down:

1. The public API (:mod:`fastdpo.functional`, :class:`fastdpo.FusedLinearDPOLoss`) and the integrations
   (:mod:`fastdpo.integrations`) check their arguments and call :func:`resolve`, then :func:`head` (or
   :func:`forward`/:func:`backward` where a caller needs its own autograd), never an engine directly.
2. :func:`resolve` turns ``backend`` (``"auto"`` or a name in :data:`BACKENDS`) and the memory budget into one
   engine's name and budget (``"auto"``: :mod:`fastdpo.head.auto`); the options then travel as one
   :class:`~fastdpo._options.HeadOptions`, encoded as one string across the custom ops (:mod:`.ops`).
3. Inside the ops, :func:`dispatch` (backend name + memory mode → :class:`Engine`) is the only place that picks an
   engine (:mod:`.engines`): the fused Triton kernels or the chunked products, each lean or keeping logits.
4. The engines' forwards produce per-token partial records (max, Σexp, target logit, ...) that the one merge,
   :mod:`fastdpo._merge`, combines across vocabulary chunks, splits and the ranks of a vocabulary-parallel head.
"""

from __future__ import annotations

import dataclasses

import torch

from .._fast import resolve_memory
from .._options import HeadOptions, compute_dtype
from .engines import AUTO, BACKENDS, ENGINES, Engine, Saved, check_backend, dispatch
from .ops import EXTRA_OUTPUTS, backward, forward, head, saved

__all__ = ["AUTO", "BACKENDS", "ENGINES", "EXTRA_OUTPUTS", "Engine", "HeadOptions", "Saved", "backward",
           "check_backend", "dispatch", "entropy_backward", "forward", "head", "resolve", "resolve_memory", "saved"]


def resolve(opts: HeadOptions, backend: str, device: torch.device, dtype: torch.dtype, tokens: int,
            hidden_size: int, vocab: int) -> HeadOptions:
    """``opts`` with ``backend`` (checked) resolved to one engine's name and, for ``"auto"``, the memory mode it
    measured fastest (see :mod:`fastdpo.head.auto`: a budget may run lean where that was faster), for
    ``tokens`` rows of ``dtype`` on ``device`` through a ``[vocab, hidden_size]`` head (``vocab``: this rank's
    rows). Raises ValueError/TypeError naming ``backend`` if that engine cannot run these tensors."""
    from . import auto

    check_backend(backend)
    memory = opts.memory
    if backend == AUTO:
        backend, memory = auto.choose(device, dtype, tokens, hidden_size, vocab, opts)
    dispatch(backend, memory).check(device, dtype)
    return dataclasses.replace(opts, backend=backend, memory=memory)


def entropy_backward(hidden, weight, bias, grad_entropy, opts: HeadOptions, needs):
    """Exact gradients for ``(hidden, weight, bias)`` of ``Σ_t g_t·entropy_t`` (compute dtype, None where not
    needed), chunked over the tokens (no ``[N, V]`` tensor); only rows with ``g_t ≠ 0`` are projected.
    ``∂H/∂z_j = −p_j·(log p_j + H)``. No engine computes it in its kernels; TRL's head can ask for it."""
    from .. import _torch_backend

    g_all = grad_entropy.to(compute_dtype(hidden.dtype))

    def dentropy(z, start, rows):
        logsm = z - torch.logsumexp(z, dim=1, keepdim=True)
        p = logsm.exp()
        entropy = -(p * logsm).sum(1, keepdim=True)
        return p.mul_(logsm.add_(entropy)).mul_(-g_all[rows].unsqueeze(1))

    return _torch_backend.chunked_backward(hidden, weight, bias, (g_all != 0).nonzero().squeeze(1), dentropy, opts,
                                        needs)
