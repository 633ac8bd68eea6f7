"""The fused head as two ``torch.library`` custom ops with their autograd and fake (meta) implementations.

``fastdpo::head_forward`` and ``fastdpo::head_backward`` run the Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``) or the chunked PyTorch backend, as the ``backend`` argument says. Being custom ops,
``torch.compile`` captures them as single opaque nodes whose output shapes never depend on the data (the
compaction of the labelled tokens and its ``nonzero`` stay inside), so a compiled training step holds the loss
in one graph. The options travel as primitive arguments; a vocabulary-parallel head's process group by its
name (see :mod:`fastdpo._merge`), its collectives running inside the ops. In fast mode (``memory`` > 0 GiB, see
:mod:`fastdpo._fast`) the forward also returns what it keeps for the backward as two tensors (empty in lean mode).

Double backward is refused: the gradients the head returns are not differentiable again, and a backward
through them (``create_graph=True`` then a gradient penalty, say) raises a ``RuntimeError`` instead of silently
treating them as constants.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _torch_path
from ._options import HeadOptions

EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "is_top1")
RESOLVED_BACKENDS = ("triton", "torch")


def _check_backend(backend):
    """The ops run a resolved backend ("auto" is resolved by the Python API before)."""
    if backend not in RESOLVED_BACKENDS:
        raise ValueError(f"fastdpo head ops: backend must be one of {list(RESOLVED_BACKENDS)}, got {backend!r}")


def _backend_module(opts: HeadOptions):
    if opts.backend == "triton":
        from . import _triton_path

        return _triton_path
    return _torch_path


@torch.library.custom_op("fastdpo::head_forward", mutates_args=())
def head_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
                 softcap: Optional[float], scale: float, backend: str, extras: bool, vocab_start: int = 0,
                 vocab_total: int = -1, group: Optional[str] = None, memory: float = 0.0
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logp, mean_logit, entropy, log_sum_sq_probs, is_top1, lse, kept_a, kept_b)``, each of the first six
    ``[N]`` (the extras ``[0]`` unless ``extras``), 0 where ``targets == ignore_index``. With a ``group``,
    ``weight`` holds the rows from global id ``vocab_start`` of a ``vocab_total``-token head split over the
    group's ranks, and the outputs (``lse`` included) are those of the whole head. ``kept_a``/``kept_b``: what
    fast mode keeps (``[0]`` in lean mode, ``memory == 0``; fast mode is single-device)."""
    _check_backend(backend)
    opts = HeadOptions(ignore_index=ignore_index, softcap=softcap, scale=scale, backend=backend, extras=extras,
                       vocab_start=vocab_start, vocab_total=vocab_total, group=group, memory=memory)
    # The inputs already carry the compute dtype; autocast must not recast the inner matmuls.
    with torch.autocast(hidden.device.type, enabled=False):
        if memory > 0:
            from . import _fast

            out, kept = _fast.forward(hidden, weight, bias, targets, opts)
        else:
            out, _ = _backend_module(opts).forward(hidden, weight, bias, targets, opts)
            kept = (hidden.new_empty(0), hidden.new_empty(0))
    cd = _torch_path._compute_dtype(hidden.dtype)
    empty = hidden.new_empty(0, dtype=cd)
    extra = [out[k] if extras else (empty.bool() if k == "is_top1" else empty.clone()) for k in EXTRA_OUTPUTS]
    return (out["logp"].to(cd), out["mean_logit"].to(cd), *(t.to(cd) if t.dtype.is_floating_point else t
                                                             for t in extra), out["lse"].to(cd), *kept)


@head_forward.register_fake
def _head_forward_fake(hidden, weight, bias, targets, ignore_index, softcap, scale, backend, extras, vocab_start=0,
                       vocab_total=-1, group=None, memory=0.0):
    _check_backend(backend)
    N = hidden.shape[0]
    cd = _torch_path._compute_dtype(hidden.dtype)
    n_extra = N if extras else 0
    if memory > 0:
        from . import _fast

        kept = _fast.kept_like(hidden, weight, HeadOptions(softcap=softcap, scale=scale, backend=backend,
                                                           memory=memory))
    else:
        kept = (hidden.new_empty(0), hidden.new_empty(0))
    return (hidden.new_empty(N, dtype=cd), hidden.new_empty(N, dtype=cd), hidden.new_empty(n_extra, dtype=cd),
            hidden.new_empty(n_extra, dtype=cd), hidden.new_empty(n_extra, dtype=torch.bool),
            hidden.new_empty(N, dtype=cd), *kept)


@torch.library.custom_op("fastdpo::head_backward", mutates_args=())
def head_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                  lse: Tensor, ignore_index: int, softcap: Optional[float], scale: float, backend: str,
                  need_hidden: bool, need_weight: bool, need_bias: bool, vocab_start: int = 0,
                  group: Optional[str] = None, memory: float = 0.0, logp: Optional[Tensor] = None,
                  kept_a: Optional[Tensor] = None, kept_b: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``(hidden, weight, bias)`` of ``Σ_t grad_logp_t·logp_t`` in their dtypes (``[0]`` where not
    needed). With a ``group`` (vocabulary-parallel, ``lse`` over the whole head) the hidden gradient is summed
    over its ranks; the weight and bias gradients are this rank's rows. In fast mode (``memory`` > 0) from what
    the forward kept (``logp``, ``kept_a``, ``kept_b``)."""
    _check_backend(backend)
    opts = HeadOptions(ignore_index=ignore_index, softcap=softcap, scale=scale, backend=backend,
                       vocab_start=vocab_start, group=group, memory=memory)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    with torch.autocast(hidden.device.type, enabled=False):
        if memory > 0:
            from . import _fast

            grads = _fast.backward(hidden, weight, bias, targets, lse, grad_logp.contiguous(), opts, needs,
                                   logp, kept_a, kept_b)
        else:
            grads = _backend_module(opts).backward(hidden, weight, bias, targets, lse, grad_logp.contiguous(), opts,
                                                   needs)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, (hidden, weight, weight)))


@head_backward.register_fake
def _head_backward_fake(grad_logp, hidden, weight, bias, targets, lse, ignore_index, softcap, scale, backend,
                        need_hidden, need_weight, need_bias, vocab_start=0, group=None, memory=0.0, logp=None,
                        kept_a=None, kept_b=None):
    _check_backend(backend)
    # Both backends return contiguous gradients, whatever the inputs' strides.
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_bias and bias is not None else weight.new_empty(0))


def _forward_setup(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, softcap, scale, backend, extras, vocab_start, _, group, memory = inputs
    ctx.options = (ignore_index, softcap, scale, backend)
    ctx.parallel = (vocab_start, group)
    ctx.memory = memory
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, targets, output[5], output[0], output[6], output[7])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_logp, *_):
    hidden, weight, bias, targets, lse, logp, kept_a, kept_b = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    n_inputs = 13
    if grad_logp is None or not (need_h or need_w or need_b):
        return (None,) * n_inputs
    gh, gw, gb = torch.ops.fastdpo.head_backward(grad_logp, hidden, weight, bias, targets, lse, *ctx.options,
                                                 need_h, need_w, need_b and ctx.has_bias, *ctx.parallel,
                                                 ctx.memory, logp, kept_a, kept_b)
    return (gh if need_h else None, gw if need_w else None, gb if need_b and ctx.has_bias else None,
            *(None,) * (n_inputs - 3))


torch.library.register_autograd("fastdpo::head_forward", _forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("fastdpo: the fused head's gradients are not differentiable a second time (double "
                       "backward, e.g. torch.autograd.grad(..., create_graph=True) followed by a gradient "
                       "penalty); compute such terms from materialized logits instead")


torch.library.register_autograd("fastdpo::head_backward", _refuse_double_backward, setup_context=_backward_setup)


def head(hidden, weight, bias, targets, opts: HeadOptions):
    """Per-token log-probs of ``hidden @ weight.T (+ bias)`` without the ``[N, V]`` logits.

    ``hidden [N, H], weight [V, H], bias [V] | None, targets [N]``; returns
    ``(logp, mean_logit, entropy, log_sum_sq_probs, is_top1)``, each ``[N]`` and 0 where the target is
    ``opts.ignore_index``; the last three are empty unless ``opts.extras``. Only ``logp`` is differentiable:
    its backward takes one coefficient per token straight to the kernel.
    """
    outs = torch.ops.fastdpo.head_forward(hidden, weight, bias, targets, opts.ignore_index, opts.softcap,
                                          opts.scale, opts.backend, opts.extras, opts.vocab_start,
                                          opts.vocab_total, opts.group, float(opts.memory))
    return outs[:5]
