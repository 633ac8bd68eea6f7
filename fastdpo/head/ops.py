"""The head as two ``torch.library`` custom ops with their autograd and fake (meta) implementations.

``fastdpo::head_forward`` and ``fastdpo::head_backward`` run the engine that :func:`fastdpo.head.dispatch` gives
for the options' backend and memory mode. The options cross the op boundary as one string and four numbers
(:meth:`HeadOptions.op_args`; the string decoded once and cached inside the op), since custom ops take primitive
arguments only. Being custom ops, ``torch.compile`` captures them as single opaque nodes whose output shapes never
depend on the data (the compaction of the labelled tokens and its ``nonzero`` stay inside), so a compiled training step
holds the loss in one graph. A vocabulary-parallel head's process group travels by its name (see
:mod:`fastdpo._merge`), its collectives running inside the ops.

The forward also returns what the backward reuses (:class:`fastdpo.head.engines.Saved`): the logsumexp, what
fast mode keeps, and the fused engine's compaction order, so that the backward does not sort again.

Double backward is refused: the gradients the head returns are not differentiable again, and a backward
through them (``create_graph=True`` then a gradient penalty, say) raises a ``RuntimeError`` instead of silently
treating them as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import HeadOptions, compute_dtype
from .engines import Saved, dispatch

EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "is_top1")
# Outputs of head_forward: logp, mean_logit, the extras, then what the backward reads.
_LSE, _KEPT_A, _KEPT_B, _ORDER = 5, 6, 7, 8


@torch.library.custom_op("fastdpo::head_forward", mutates_args=())
def head_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, options: str,
                 ignore_index: int, softcap: float | None, scale: float, memory: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logp, mean_logit, entropy, log_sum_sq_probs, is_top1, lse, kept_a, kept_b, order)``, each of the first
    six ``[N]`` (the extras ``[0]`` unless ``extras``), 0 where ``targets == ignore_index``; ``options`` and the
    four numbers after it are :meth:`HeadOptions.op_args`. With a ``group``, ``weight`` holds the rows from global id
    ``vocab_start`` of a ``vocab_total``-token head split over the group's ranks, and the outputs (``lse`` included)
    are those of the whole head. ``kept_a``, ``kept_b``, ``order``: see :class:`~fastdpo.head.engines.Saved`."""
    opts = HeadOptions.from_op_args(options, ignore_index, softcap, scale, memory)
    # The inputs already carry the compute dtype; autocast must not recast the inner matmuls.
    with torch.autocast(hidden.device.type, enabled=False):
        out, kept, order = dispatch(opts.backend, opts.memory).forward(hidden, weight, bias, targets, opts)
    cd = compute_dtype(hidden.dtype)
    empty = hidden.new_empty(0, dtype=cd)
    extra = [out[k] if opts.extras else (empty.bool() if k == "is_top1" else empty.clone()) for k in EXTRA_OUTPUTS]
    return (out["logp"].to(cd), out["mean_logit"].to(cd), *(t.to(cd) if t.dtype.is_floating_point else t
                                                             for t in extra), out["lse"].to(cd), *kept, order)


@head_forward.register_fake
def _head_forward_fake(hidden, weight, bias, targets, options, ignore_index, softcap, scale, memory):
    opts = HeadOptions.from_op_args(options, ignore_index, softcap, scale, memory)
    engine = dispatch(opts.backend, opts.memory)
    N = hidden.shape[0]
    cd = compute_dtype(hidden.dtype)
    n_extra = N if opts.extras else 0
    return (hidden.new_empty(N, dtype=cd), hidden.new_empty(N, dtype=cd), hidden.new_empty(n_extra, dtype=cd),
            hidden.new_empty(n_extra, dtype=cd), hidden.new_empty(n_extra, dtype=torch.bool),
            hidden.new_empty(N, dtype=cd), *engine.kept_like(hidden, weight, opts), engine.order_like(targets))


@torch.library.custom_op("fastdpo::head_backward", mutates_args=())
def head_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  lse: Tensor, logp: Tensor, kept_a: Tensor, kept_b: Tensor, order: Tensor, options: str,
                  ignore_index: int, softcap: float | None, scale: float, memory: float,
                  need_hidden: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``(hidden, weight, bias)`` of ``Σ_t grad_logp_t·logp_t`` in their dtypes (``[0]`` where not
    needed), from what :func:`head_forward` returned. With a ``group`` (vocabulary-parallel, ``lse`` over the whole
    head) the hidden gradient is summed over its ranks; the weight and bias gradients are this rank's rows."""
    opts = HeadOptions.from_op_args(options, ignore_index, softcap, scale, memory)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    with torch.autocast(hidden.device.type, enabled=False):
        grads = dispatch(opts.backend, opts.memory).backward(hidden, weight, bias, targets,
                                                             Saved(lse, logp, kept_a, kept_b, order),
                                                             grad_logp.contiguous(), opts, needs)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, (hidden, weight, weight)))


@head_backward.register_fake
def _head_backward_fake(grad_logp, hidden, weight, bias, targets, lse, logp, kept_a, kept_b, order, options,
                        ignore_index, softcap, scale, memory, need_hidden, need_weight, need_bias):
    dispatch(HeadOptions.from_op_args(options, ignore_index, softcap, scale, memory).backend, memory)  # refuses
    # Every engine returns contiguous gradients, whatever the inputs' strides.
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_bias and bias is not None else weight.new_empty(0))


def saved(outputs) -> Saved:
    """What the backward reads, from :func:`head_forward`'s outputs."""
    return Saved(outputs[_LSE], outputs[0], outputs[_KEPT_A], outputs[_KEPT_B], outputs[_ORDER])


def backward(grad_logp, hidden, weight, bias, targets, saved: Saved, op_args: tuple, needs):
    """:func:`head_backward` on what the forward saved, with the options as :meth:`HeadOptions.op_args` gives
    them; ``(grad_hidden, grad_weight, grad_bias)``, None where ``needs`` says not needed."""
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    grads = torch.ops.fastdpo.head_backward(grad_logp, hidden, weight, bias, targets, *saved, *op_args, need_h,
                                            need_w, need_b)
    return tuple(g if need else None for g, need in zip(grads, (need_h, need_w, need_b)))


def _forward_setup(ctx, inputs, output):
    hidden, weight, bias, targets, *op_args = inputs
    ctx.op_args = tuple(op_args)
    ctx.save_for_backward(hidden, weight, bias, targets, *saved(output))
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_logp, *_):
    hidden, weight, bias, targets, *kept = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if grad_logp is None or not any(needs):
        return (None,) * 9
    return (*backward(grad_logp, hidden, weight, bias, targets, Saved(*kept), ctx.op_args, needs), *(None,) * 6)


torch.library.register_autograd("fastdpo::head_forward", _forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("fastdpo: the fused head's gradients are not differentiable a second time (double "
                       "backward, e.g. torch.autograd.grad(..., create_graph=True) followed by a gradient "
                       "penalty); compute such terms from materialized logits instead")


torch.library.register_autograd("fastdpo::head_backward", _refuse_double_backward, setup_context=_backward_setup)


def forward(hidden, weight, bias, targets, opts: HeadOptions):
    """All nine outputs of :func:`head_forward` (``logp`` differentiable w.r.t. ``hidden``, ``weight``, ``bias``)."""
    return torch.ops.fastdpo.head_forward(hidden, weight, bias, targets, *opts.op_args())


def head(hidden, weight, bias, targets, opts: HeadOptions):
    """Per-token log-probs of ``hidden @ weight.T (+ bias)`` without the ``[N, V]`` logits.

    ``hidden [N, H], weight [V, H], bias [V] | None, targets [N]``; returns
    ``(logp, mean_logit, entropy, log_sum_sq_probs, is_top1)``, each ``[N]`` and 0 where the target is
    ``opts.ignore_index``; the last three are empty unless ``opts.extras``. Only ``logp`` is differentiable:
    its backward takes one coefficient per token straight to the engine.
    """
    return forward(hidden, weight, bias, targets, opts)[:5]
