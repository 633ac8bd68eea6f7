"""The patch of :func:`fastdpo.integrations.trl.patch_trl`: TRL's per-token fused head
(``ChunkedLogProbFunction``) replaced by :class:`FastChunkedLogProbFunction`, an autograd Function on fastdpo's
head, and TRL's ``add_fused_lm_head`` wrapped so that the head runs as a module inside the model's forward.
Imported by :mod:`fastdpo.integrations.trl` once it has checked TRL's version."""

from __future__ import annotations

import contextvars
import functools
import sys
import types
from contextlib import nullcontext

import torch
import trl.trainer.utils as _trl_utils

from .. import _validate
from .. import head as _head
from .._options import IGNORE_INDEX, Backend, Memory
from ._hf_model import call_head_module, innermost, to_fastdpo_transform
from ._trl_compat import PATCH_INTERNALS, optional_module, require_trl_internals

_trl_kernels = optional_module("trl.kernels")
_trl_chunked = optional_module("trl.kernels.chunked_logprob")

# The original class, kept so that unpatching restores it whatever was patched in between.
_TRL_FUNCTION = getattr(_trl_chunked, "ChunkedLogProbFunction", None)
# Every name under which TRL reaches its head: `add_fused_lm_head` looks up `_ChunkedLogProbFunction` in
# `trl.trainer.utils` at call time, and code importing `trl.kernels` after the patch gets fastdpo's as well.
_PATCH_SITES = ((_trl_utils, "_ChunkedLogProbFunction"), (_trl_kernels, "ChunkedLogProbFunction"),
                (_trl_chunked, "ChunkedLogProbFunction"))
_TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_FASTDPO_EXTRAS = ("entropy", "log_sum_sq_probs", "is_top1")


class _PatchState:
    patched = False
    backend = "auto"
    memory = 0.0  # GiB, see fastdpo._fast.resolve_memory
    # The TRL modules whose `add_fused_lm_head` the patch replaced.
    replaced = []


# TRL's functions that the patch wraps (kept so that unpatching restores them).
_TRL_ADD_FUSED_LM_HEAD = getattr(_trl_utils, "add_fused_lm_head", None)
_TRL_GATHER_CTX = getattr(_trl_utils, "maybe_gather_lm_head_ctx", None)


class _RoutedHead:
    """Stands in for the lm-head inside TRL's fused forward while the patch is on.

    TRL's forward reads ``lm_head.weight``/``lm_head.bias`` outside the head's forward (an FSDP2 ``DTensor`` it then
    ``full_tensor()``-s, whose backward nobody reduces when the head is its own unit; a shard under FSDP1; an empty
    partition under ZeRO-3) and hands them to ``_ChunkedLogProbFunction.apply``. Here they are empty placeholders:
    the patched function recognizes them and calls the real head module instead, so the wrapper gathers, casts and
    reduces it as for an ordinary forward.
    """

    def __init__(self, module):
        self.module = module
        inner = innermost(module)
        w, b = inner.weight, getattr(inner, "bias", None)
        self.weight = torch.empty(0, dtype=w.dtype, device=w.device)
        self.bias = None if b is None else torch.empty(0, dtype=b.dtype, device=b.device)

    def __call__(self):
        return self


_ROUTE: contextvars.ContextVar = contextvars.ContextVar("fastdpo_trl_route", default=None)


def _routed_fused_forward(self, *args, fused_lm_head=False, **kwargs):
    if not (fused_lm_head and _PatchState.patched):
        return self._fastdpo_trl_forward(*args, fused_lm_head=fused_lm_head, **kwargs)
    route = _RoutedHead(self.get_output_embeddings())
    token = _ROUTE.set(route)
    # TRL's forward looks the head up through `get_output_embeddings()` on each call.
    self.get_output_embeddings = route
    try:
        return self._fastdpo_trl_forward(*args, fused_lm_head=True, **kwargs)
    finally:
        del self.get_output_embeddings
        _ROUTE.reset(token)


def _add_fused_lm_head(model, *args, **kwargs):
    """TRL's ``add_fused_lm_head``, whose forward then runs the head as a module while :func:`patch_trl` is on."""
    _TRL_ADD_FUSED_LM_HEAD(model, *args, **kwargs)
    # An instance attribute (not a closure), so that a deep copy of the model calls its own forward.
    model._fastdpo_trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *a, **kw):
        return _routed_fused_forward(self, *a, **kw)

    model.forward = types.MethodType(forward, model)


def _gather_ctx(*params):
    # The placeholders of a routed head are no parameters: the head module's own hooks gather the real ones.
    route = _ROUTE.get()
    if route is not None and any(p is route.weight for p in params):
        return nullcontext()
    return _TRL_GATHER_CTX(*params)


def _module_call(args, dtype, hidden, weight, bias):
    # A mixed-precision wrapper casts the head's input to its parameter dtype; TRL's `cast_lm_head_to_fp32` asked
    # for the dtype the hidden states had when TRL handed them over.
    return FastChunkedLogProbFunction.apply(hidden.to(dtype), weight, bias, *args)


class FastChunkedLogProbFunction(torch.autograd.Function):
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction`` computed by fastdpo's kernels.

    Same arguments (``hidden [N, H], weight [V, H], bias, targets [N], temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs``) and outputs (``log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1``, ``None`` where not requested). ``chunk_size`` is TRL's tiling and is ignored:
    fastdpo picks its own. TRL's transform ``softcap·tanh(logit_scale·z/softcap)/temperature`` is mapped
    exactly onto fastdpo's softcap-then-scale order. The head runs through fastdpo's head interface
    (:mod:`fastdpo.head`) with the backend and memory mode given to :func:`patch_trl`; an entropy gradient (which
    TRL supports, fastdpo's engines do not) comes from :func:`fastdpo.head.entropy_backward`.
    """

    @classmethod
    def apply(cls, hidden, weight, bias, *args):
        route = _ROUTE.get()
        if route is not None and weight is route.weight:
            # Inside TRL's forward under the patch: compute inside the head module's forward instead.
            return call_head_module(route.module, hidden, functools.partial(_module_call, args, hidden.dtype))
        if type(weight.grad_fn).__name__ == "_ToTorchTensorBackward":
            raise RuntimeError("the lm-head weight reached the patched TRL head through DTensor.full_tensor(), whose "
                               "backward is a local slice that FSDP2 never reduces: call patch_trl() before "
                               "building the trainer, so that the head runs as a module")
        return super().apply(hidden, weight, bias, *args)

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=_TRL_OPTIONAL_OUTPUTS):
        ctx.set_materialize_grads(False)
        device = hidden.device
        # As TRL: under autocast the head computes in the autocast dtype.
        dtype = _validate.autocast_dtype(device.type) or hidden.dtype
        temperature = _validate.number("temperature", temperature, positive=True)
        softcap, scale = to_fastdpo_transform(final_logit_softcapping, _validate.number("logit_scale", logit_scale))
        unknown = set(outputs) - set(_TRL_OPTIONAL_OUTPUTS) - {"log_probs"}
        if unknown:
            raise ValueError(f"outputs: unknown per-token fields {sorted(unknown)}; TRL's head computes "
                             f"{['log_probs', *_TRL_OPTIONAL_OUTPUTS]}")
        # What the forward keeps is only worth keeping for a backward.
        memory = _PatchState.memory if any(ctx.needs_input_grad[:3]) else 0.0
        # TRL hands its head only valid targets (compacted, or clamped to >= 0), so no target is ever ignored.
        opts = _head.HeadOptions(ignore_index=IGNORE_INDEX, softcap=softcap, scale=scale / temperature,
                                 extras=any(name in outputs for name in _FASTDPO_EXTRAS), memory=memory)
        opts = _head.resolve(opts, _PatchState.backend, device, dtype, targets.numel(), hidden.shape[-1],
                             weight.shape[0])
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        outs = _head.forward(h, w, b, targets, opts)
        ctx.opts, ctx.dtype = opts, dtype
        ctx.save_for_backward(hidden, weight, bias, targets, *_head.saved(outs))
        out = dict(zip(("logp", "mean_logit", *_head.EXTRA_OUTPUTS), outs))
        entropy = out["entropy"].float() if "entropy" in outputs else None
        lssp = out["log_sum_sq_probs"].float() if "log_sum_sq_probs" in outputs else None
        mean_logits = out["mean_logit"].float() if "mean_logits" in outputs else None
        is_top1 = out["is_top1"] if "is_top1" in outputs else None
        ctx.mark_non_differentiable(*(x for x in (lssp, mean_logits, is_top1) if x is not None))
        return out["logp"].float(), entropy, lssp, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, targets, *saved = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        none = (None,) * 9
        if not any(needs) or (grad_logp is None and grad_entropy is None):
            return none
        grads = [None, None, None]
        # A head routed through its module was fetched again by ZeRO-3's pre-backward hook (this is then a no-op);
        # one that TRL read directly (a fused head added before patch_trl()) is gathered here, as TRL's backward does.
        with _TRL_GATHER_CTX(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
            b = bias.to(ctx.dtype) if bias is not None else None
            if grad_logp is not None:
                grads = list(_head.backward(grad_logp, h, w, b, targets, _head.Saved(*saved), ctx.opts.op_args(),
                                            needs))
            if grad_entropy is not None:
                extra = _head.entropy_backward(h, w, b, grad_entropy, ctx.opts, needs)
                grads = [e if g is None else (g if e is None else g + e.to(g.dtype)) for g, e in zip(grads, extra)]
        originals = (hidden, weight, bias)
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, originals)]
        return (*grads, *none[3:])


class _Patch:
    """What :func:`patch_trl` returns: already applied; as a context manager it restores the prior state."""

    def __init__(self, was_patched, previous_backend, previous_memory):
        self._was_patched = was_patched
        self._previous = (previous_backend, previous_memory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._was_patched:
            _PatchState.backend, _PatchState.memory = self._previous
        else:
            unpatch_trl()
        return False


def patch_trl(backend: Backend = "auto", memory: Memory = "lean") -> _Patch:
    """Run TRL's per-token fused head on fastdpo's kernels, in every TRL trainer that uses it.

    Applied at once; :func:`unpatch_trl` undoes it, or use it as a context manager (``with patch_trl():``),
    which restores the state it found. Patching twice only updates ``backend`` and ``memory``.

    Args:
        backend: fastdpo backend for the head, as in :func:`fastdpo.fused_logprobs`: ``"auto"``, ``"triton"``
            or ``"torch"``.
        memory: what the head's forward keeps for its backward, as in :func:`fastdpo.fused_logprobs`:
            ``"lean"`` (default), ``"fast"`` or a budget in GiB.
    """
    _head.check_backend(backend)
    memory = _head.resolve_memory(memory)
    require_trl_internals("patch_trl()", PATCH_INTERNALS)
    handle = _Patch(_PatchState.patched, _PatchState.backend, _PatchState.memory)
    _PatchState.backend, _PatchState.memory = backend, memory
    for module, name in _PATCH_SITES:
        setattr(module, name, FastChunkedLogProbFunction)
    _trl_utils.maybe_gather_lm_head_ctx = _gather_ctx
    # Every TRL module that imported `add_fused_lm_head` (modules imported later take it from `trl.trainer.utils`).
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("trl")
                and module.__dict__.get("add_fused_lm_head") is _TRL_ADD_FUSED_LM_HEAD):
            module.add_fused_lm_head = _add_fused_lm_head
            _PatchState.replaced.append(module)
    _PatchState.patched = True
    return handle


def unpatch_trl() -> bool:
    """Restore TRL's own fused head. Returns whether a patch was in place."""
    was = _PatchState.patched
    for module, name in _PATCH_SITES:
        setattr(module, name, _TRL_FUNCTION)
    _trl_utils.maybe_gather_lm_head_ctx = _TRL_GATHER_CTX
    for module in _PatchState.replaced:
        if module.__dict__.get("add_fused_lm_head") is _add_fused_lm_head:
            module.add_fused_lm_head = _TRL_ADD_FUSED_LM_HEAD
    _PatchState.replaced = []
    _PatchState.patched = False
    _PatchState.backend, _PatchState.memory = "auto", 0.0
    return was


def is_patched() -> bool:
    """Whether TRL's fused head currently runs on fastdpo."""
    return _PatchState.patched and _trl_utils._ChunkedLogProbFunction is FastChunkedLogProbFunction
