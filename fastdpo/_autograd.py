"""The autograd Function around the fused head: one forward, one backward, two backends."""

from __future__ import annotations

import torch

from . import _torch_path
from ._options import HeadOptions

EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "is_top1")


def _backend_module(opts: HeadOptions):
    if opts.memory != "lean":
        from . import _fast

        return _fast.backend_for(opts)
    if opts.backend == "triton":
        from . import _triton_path

        return _triton_path
    return _torch_path


class FusedLogprobFunction(torch.autograd.Function):
    """Per-token log-probs of ``hidden @ weight.T (+ bias)`` without the ``[N, V]`` logits.

    ``forward(hidden [N, H], weight [V, H], bias [V] | None, targets [N], opts)`` returns
    ``(logp, mean_logit, entropy, log_sum_sq_probs, is_top1)``, each ``[N]`` and 0 where the target is
    ``opts.ignore_index``; the last three are empty unless ``opts.extras``. Only ``logp`` is
    differentiable: its backward takes one coefficient per token straight to the kernel.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: HeadOptions):
        backend = _backend_module(opts)
        # The inputs already carry the compute dtype; autocast must not recast the inner matmuls.
        with torch.autocast(hidden.device.type, enabled=False):
            out, saved = backend.forward(hidden, weight, bias, targets, opts)
        ctx.opts = opts
        ctx.saved = saved
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.set_materialize_grads(False)
        empty = hidden.new_empty(0, dtype=torch.float32)
        extras = [out.get(k, empty) for k in EXTRA_OUTPUTS]
        ctx.mark_non_differentiable(out["mean_logit"], *extras)
        return (out["logp"], out["mean_logit"], *extras)

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, targets = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_logp is None or not any(needs):
            return None, None, None, None, None
        backend = _backend_module(ctx.opts)
        with torch.autocast(hidden.device.type, enabled=False):
            gh, gw, gb = backend.backward(hidden, weight, bias, targets, ctx.saved, grad_logp.contiguous(),
                                          ctx.opts, needs)
        return gh, gw, gb, None, None
