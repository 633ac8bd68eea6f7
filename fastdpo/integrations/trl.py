"""fastdpo inside TRL (``pip install fastdpo[trl]``; tested with TRL 1.15 and 1.16, see :data:`TRL_TESTED`).

Two ways in:

- :class:`FastDPOTrainer` — a drop-in subclass of ``trl.DPOTrainer`` that computes the whole DPO loss
  with fastdpo (backbone hidden states → fused lm-head → loss) and logs the same metrics::

      from fastdpo.integrations.trl import FastDPOTrainer as DPOTrainer

- :func:`patch_trl` — replaces TRL's own per-token fused head (``ChunkedLogProbFunction``, used by
  ``add_fused_lm_head`` in the DPO, KTO, SFT, GRPO and RLOO trainers) with fastdpo's kernels, so the stock
  trainers run on fastdpo. A plain call (undone by :func:`unpatch_trl`) or a context manager::

      with patch_trl():
          DPOTrainer(...).train()

TRL multiplies the logits by ``logit_scale`` *before* the softcap and fastdpo after it; the patch maps
one onto the other exactly (see :func:`fastdpo.integrations.transformers.to_fastdpo_transform`).
TRL's head can differentiate the per-token entropy (GRPO-style entropy terms); fastdpo's kernels produce
the entropy without a gradient, so when a loss does backpropagate through the patched head's entropy,
that part of the gradient is computed by an exact chunked PyTorch fallback (the log-prob part stays on
fastdpo's kernels).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import sys
import types
import warnings
from contextlib import nullcontext

import torch

from ._trl_compat import (PATCH_INTERNALS, TRAINER_CONFIG_FIELDS, TRAINER_INTERNALS, TRL_TESTED, check_trl_version,
                          optional_module, require_trl_internals)

#: The TRL versions CI tests (older ones are refused, newer ones run with a warning); kept under its former name.
TRL_SPECIFIER = TRL_TESTED

check_trl_version()

# TRL's internals are looked up leniently here: whether a newer TRL still has them is checked (and a missing one
# named) when FastDPOTrainer is built or patch_trl() applied, not at import.
import trl.models.utils as _trl_model_utils  # noqa: E402
import trl.trainer.utils as _trl_utils  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

_trl_kernels = optional_module("trl.kernels")
_trl_chunked = optional_module("trl.kernels.chunked_logprob")
disable_gradient_checkpointing = getattr(_trl_model_utils, "disable_gradient_checkpointing", None)

from .. import _validate  # noqa: E402
from .. import head as _head  # noqa: E402
from .._options import IGNORE_INDEX  # noqa: E402
from ..losses import LossConfig, compute_dpo_loss  # noqa: E402
from .transformers import (  # noqa: E402
    _innermost,
    call_head_module,
    check_packable,
    check_packable_config,
    model_head_output,
    pack_batch,
    to_fastdpo_transform,
    unwrap_causal_lm,
)

__all__ = [
    "FastDPOTrainer",
    "FastChunkedLogProbFunction",
    "patch_trl",
    "unpatch_trl",
    "is_patched",
    "loss_config_from_dpo_config",
    "check_trl_version",
    "TRL_SPECIFIER",
    "TRL_TESTED",
]

# --------------------------------------------------------------------------------------------------------------
# The patch: TRL's per-token fused head on fastdpo's kernels
# --------------------------------------------------------------------------------------------------------------

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
        inner = _innermost(module)
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
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
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


def patch_trl(backend: str = "auto", memory="lean") -> _Patch:
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


# --------------------------------------------------------------------------------------------------------------
# DPOConfig -> LossConfig
# --------------------------------------------------------------------------------------------------------------

# DPOConfig fields that define the loss; the trainer maps each onto the LossConfig field of the same name.
DPO_LOSS_FIELDS = ("beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type",
                   "f_alpha_divergence_coef", "ld_alpha", "use_weighting", "discopop_tau")


def _dpo_config_defaults() -> dict:
    defaults = {}
    for f in dataclasses.fields(DPOConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _normalize(name, value):
    if name == "loss_type":
        if isinstance(value, str):
            value = [value]
        value = list(value)
    if name == "loss_weights" and value is not None:
        value = [float(v) for v in value]
    return value


def loss_config_from_dpo_config(args: DPOConfig | None) -> LossConfig:
    """The :class:`fastdpo.LossConfig` that computes the loss a ``DPOConfig`` asks for.

    Raises:
        ValueError: naming the DPOConfig field, when an option is set that fastdpo's loss does not support.
    """
    defaults = _dpo_config_defaults()
    supported = {f.name for f in dataclasses.fields(LossConfig)}
    kwargs = {}
    for name in DPO_LOSS_FIELDS:
        value = _normalize(name, getattr(args, name) if args is not None else defaults[name])
        default = _normalize(name, defaults[name])
        if name in supported:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        elif value != default:
            raise ValueError(f"DPOConfig.{name}={value!r} is not supported by fastdpo's loss (fastdpo.LossConfig has "
                             f"no {name!r}); leave it at its default {default!r} or use trl's DPOTrainer")
    try:
        return LossConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"DPOConfig: fastdpo cannot compute this loss: {err}") from err


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# fastdpo's loss types that TRL's DPOTrainer does not have; their metrics are those of TRL's CPO/ORPO trainers.
_LOSS_TYPES_BEYOND_TRL = {"cpo", "orpo"}


def _materialized(model) -> bool:
    """Whether every parameter of ``model`` holds its values here (not on the meta device, not partitioned by
    DeepSpeed ZeRO-3, whose parameters only hold values inside the engine's forward)."""
    return all(p.device.type != "meta" and not hasattr(p, "ds_id") for p in model.parameters())


def _check_packable_before_setup(model, ref_model, args) -> None:
    """The packing checks that can run before DPOTrainer's set-up: a model instance (and a reference instance) is
    probed when its parameters are materialized; a model id is checked from its config and architecture alone."""
    for m in (model, ref_model):
        if isinstance(m, str):
            from transformers import AutoConfig

            init = dict(getattr(args, "model_init_kwargs", None) or {})
            config = AutoConfig.from_pretrained(m, revision=init.get("revision"),
                                                trust_remote_code=init.get("trust_remote_code",
                                                                           getattr(args, "trust_remote_code", False)))
            check_packable_config(config, attn_implementation=init.get("attn_implementation"))
        elif m is not None:
            check_packable(m, probe=_materialized(m))


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with the whole DPO loss computed by fastdpo.

    Takes the same arguments as ``DPOTrainer`` plus ``fastdpo_backend`` (``"auto"``, ``"triton"`` or
    ``"torch"``) and ``fastdpo_memory`` (``"lean"``, ``"fast"`` or a budget in GiB; see
    :func:`fastdpo.fused_logprobs`). The policy's backbone runs once per step; its final hidden states and the
    lm-head (with the model's softcap / logit scale / bias) go to fastdpo, which projects only completion tokens
    and never builds the logits. The reference is the ``ref_model``, the PEFT policy with its adapter disabled (or its
    ``"ref"`` adapter), or the reference log-probs precomputed with ``precompute_ref_log_probs=True`` (also
    computed by fastdpo). Logs TRL's metrics under TRL's names.

    MoE models train with the router's load-balancing loss as in TRL (``router_aux_loss_coef``, by default the
    model's own coefficient; logged as ``aux_loss``), and ``bf16``/``fp16`` run the backbone and the head under
    the trainer's autocast as TRL's forward does. Works under DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-1/2/3 as set up
    by accelerate: the lm-head runs as a module inside the model's forward, so each wrapper gathers and reduces it
    as usual.

    ``DPOConfig(padding_free=True)`` trains padding-free, which TRL 1.16's own DPOTrainer no longer does (it warns
    and pads): TRL's collator still pads the batch, then each step removes the padding and runs the policy's and
    the reference's backbones (and the precompute pass) once on all sequences packed into one row, positions
    restarting at each sequence (see :func:`fastdpo.integrations.transformers.pack_batch`); the loss sums over the
    packed segments. Same losses and logged metrics as padded training (``num_tokens`` counts the real tokens in
    both). The model must be proven to run packed exactly
    (:func:`~fastdpo.integrations.transformers.check_packable`: static checks, then a probe forward of packed
    against one-by-one sequences); ``flash_attention_2`` is the intended GPU attention. Unlike TRL's former
    padding-free mode, no ``flash_attention_2`` is required: on CPU, eager and sdpa attention get a block-diagonal
    mask from transformers.

    Options of ``DPOConfig`` that fastdpo does not support raise ``ValueError`` at construction, before any of the
    parent's set-up: loss options missing from :class:`fastdpo.LossConfig`, vision datasets, prompt-learning PEFT,
    ``router_aux_loss_coef`` on a model without router logits; a non-bool ``padding_free`` raises ``TypeError``.
    ``padding_free=True`` on a model that cannot run packed raises ``ValueError``, and never after training has
    started: a model (or ``ref_model``) instance is checked and probed before the parent's set-up; a model id is
    checked from its config and architecture before the parent's set-up (no weights loaded, no data tokenized),
    then probed once TRL has loaded it — at the first packed forward of the reference precompute pass, else at the
    end of construction. A model whose parameters ZeRO-3 has partitioned is probed at the first packed forward
    (the precompute pass or the first training step), before any optimizer step.

    Logs exactly the metrics stock ``DPOTrainer`` logs for TRL's loss types (``sft`` included); the loss types only
    fastdpo has (``cpo``, ``orpo``) also log ``nll_loss`` (and ``log_odds_ratio``, ``log_odds_chosen``) as TRL's
    CPO/ORPO trainers do.
    """

    _tag_names = [*DPOTrainer._tag_names, "fastdpo"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *pos, fastdpo_backend: str = "auto",
                 fastdpo_memory="lean", **kwargs):
        # Every refusal comes before DPOTrainer.__init__, which is expensive: it tokenizes the datasets, builds the
        # reference model and, when precomputing, already runs the reference pass through fastdpo's loss.
        require_trl_internals("FastDPOTrainer", TRAINER_INTERNALS, (*DPO_LOSS_FIELDS, *TRAINER_CONFIG_FIELDS))
        self.fastdpo_backend = _head.check_backend(fastdpo_backend, "fastdpo_backend")
        try:
            _head.resolve_memory(fastdpo_memory)
            self.fastdpo_memory = fastdpo_memory
        except ValueError as err:
            raise ValueError(f"fastdpo_{err}") from None
        self.fastdpo_config = loss_config_from_dpo_config(args)
        train_dataset = kwargs.get("train_dataset", pos[1] if len(pos) > 1 else None)
        if train_dataset is not None:
            try:
                sample = next(iter(train_dataset))
            except (StopIteration, TypeError):
                sample = {}
            if "image" in sample or "images" in sample:
                raise ValueError("train_dataset: vision datasets are not supported by FastDPOTrainer; use "
                                 "trl.DPOTrainer (or patch_trl()) for vision-language models")
        peft_config = kwargs.get("peft_config", pos[8] if len(pos) > 8 else None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise ValueError("peft_config: prompt-learning PEFT (prefix/prompt/p-tuning) is not supported by "
                             "FastDPOTrainer; use a LoRA-style adapter")
        if not isinstance(model, str):
            lm = unwrap_causal_lm(model)  # raises TypeError for prompt-learning PeftModels
            coef = getattr(args, "router_aux_loss_coef", None)
            config = getattr(lm, "config", None)
            # TRL refuses this too, but only after Trainer.__init__.
            if coef and config is not None and not hasattr(config.get_text_config(), "output_router_logits"):
                raise ValueError(f"router_aux_loss_coef={coef} is set but {type(lm).__name__} is not a "
                                 f"Mixture-of-Experts model that returns router logits: there is no auxiliary loss "
                                 f"to weight")
        # TRL 1.16 warns that it cannot train padding-free and pads; fastdpo packs, so TRL must not see the flag.
        # Set before DPOTrainer.__init__, whose precompute pass already packs.
        self.fastdpo_padding_free = padding_free = _validate.flag("DPOConfig.padding_free",
                                                                  getattr(args, "padding_free", False))
        if padding_free:
            _check_packable_before_setup(model, ref_model, args)
            args.padding_free = False
        try:
            super().__init__(model, ref_model, args, *pos, **kwargs)
        finally:
            if padding_free:
                args.padding_free = True
        if padding_free:
            # A model TRL loaded from an id is probed here, on every rank (one a precompute pass used is probed
            # already); one partitioned by ZeRO-3 is probed at its first packed forward, inside the engine.
            for m in (self.model, self.ref_model):
                if m is not None:
                    check_packable(m, probe=_materialized(m))

    # -- the fused head ------------------------------------------------------------------------------------------

    def _token_stats(self, model, model_kwargs, labels, *, extras, aux_loss=False, packed=None):
        """fastdpo's per-token stats of the shifted labels from one forward of ``model``, with ``aux_loss`` the MoE
        router's load-balancing loss (else None), and the packed batch.

        Padded: stats ``[2B, T-1]`` and None. ``padding_free``: stats ``[L]`` of the packed stream and its
        :class:`~fastdpo.integrations.transformers.PackedBatch` (``packed``, when the batch was packed already).
        ``model`` is called itself (DDP, FSDP, DeepSpeed, PEFT wrappers included), and the lm-head runs as a module
        inside that forward, so every wrapper gathers and reduces it as for an ordinary forward. The router logits
        come out of that same forward.
        """
        kwargs = {**model_kwargs, "use_cache": False}
        if self.fastdpo_padding_free and packed is None:
            packed = pack_batch(kwargs.pop("input_ids"), labels, kwargs.pop("attention_mask", None), **kwargs)
        if packed is not None:
            kwargs = {}  # the packed row's own inputs (its backbone_kwargs) go to the forward
        if aux_loss:
            kwargs["output_router_logits"] = True
        # Stock TRL runs backbone, head and router loss inside `model.forward`, which accelerate wraps in the
        # trainer's autocast (bf16=True / fp16=True); fastdpo's forward replaces that wrapped one, so enter it here.
        with self.accelerator.autocast():
            out = model_head_output(model, labels, packed=packed, extras=extras, backend=self.fastdpo_backend,
                                    memory=self.fastdpo_memory, **kwargs)
            # Packed, every token is real: no attention mask, and the router loss averages over the same tokens.
            aux = (self._router_aux_loss(model, out.router_logits, kwargs.get("attention_mask")) if aux_loss
                   else None)
        return out.head, aux, packed

    @staticmethod
    def _loss_layout(stats, labels, packed):
        """The completion mask in the stats' layout, and the packed offsets (None when padded)."""
        device = stats["logp"].device
        if packed is None:
            return labels[:, 1:].to(device) != IGNORE_INDEX, None
        return packed.targets.to(device) != IGNORE_INDEX, packed.cu_seqlens.to(device)

    @staticmethod
    def _router_aux_loss(model, router_logits, attention_mask):
        """The MoE load-balancing loss exactly as TRL 1.16's fused forward computes it (Mixtral's formula, which
        every MoE family in ``transformers`` shares, with the config's expert counts)."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        lm = unwrap_causal_lm(model)
        if router_logits is None:
            raise ValueError(f"router_aux_loss_coef: {type(lm).__name__}'s backbone returned no router logits for "
                             f"output_router_logits=True; set DPOConfig(router_aux_loss_coef=0.0) to train without the "
                             f"MoE auxiliary loss")
        text_config = lm.config.get_text_config()
        num_experts = getattr(text_config, "num_experts", None)
        if num_experts is None:
            num_experts = lm.num_experts
        return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)

    def _adapter_context(self):
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return _trl_utils.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return nullcontext()

    def _reference_sequence_logps(self, token_logps, mask, cu_seqlens=None):
        """Reduce reference per-token log-probs exactly as :func:`compute_dpo_loss` reduces the policy's."""
        # WPO weights only scale the loss, and need head extras the reference pass does not compute.
        config = dataclasses.replace(self.fastdpo_config, use_weighting=False)
        stats = {"logp": token_logps, "mean_logit": torch.zeros_like(token_logps)}
        out = compute_dpo_loss(stats, mask, config, reference_free=True, cu_seqlens=cu_seqlens)
        return out.chosen_logps.detach(), out.rejected_logps.detach()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL caches precomputed reference log-probs on disk under a key of (dataset, model). fastdpo's values
        # differ from TRL's in the last bits, so tag the key: neither trainer must pick up the other's cache.
        if not str(self._precompute_model_hash).startswith("fastdpo-"):
            self._precompute_model_hash = f"fastdpo-{self._precompute_model_hash}"
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (``precompute_ref_log_probs=True``), computed by fastdpo."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._adapter_context(), self.accelerator.autocast()):
            stats, _, packed = self._token_stats(model, model_kwargs, labels, extras=False)
        return self._reference_sequence_logps(stats["logp"], *self._loss_layout(stats, labels, packed))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        # As TRL: no KV cache on any forward (also the one that recomputes the logits for `return_outputs`).
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        stats, aux_loss, packed = self._token_stats(model, model_kwargs, labels, extras=True,
                                                    aux_loss=self.aux_loss_enabled)
        mask, cu_seqlens = self._loss_layout(stats, labels, packed)

        ref_token_logps = ref_logps = None
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(stats["logp"].device)
        else:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                if self.ref_model is None:
                    with self._adapter_context():
                        ref_token_logps = self._token_stats(self.model, model_kwargs, labels, extras=False,
                                                            packed=packed)[0]["logp"]
                else:
                    ref_token_logps = self._token_stats(self.ref_model, model_kwargs, labels, extras=False,
                                                        packed=packed)[0]["logp"]
        out = compute_dpo_loss(stats, mask, self.fastdpo_config, ref_token_logps=ref_token_logps, ref_logps=ref_logps,
                               cu_seqlens=cu_seqlens)
        loss = out.loss
        if aux_loss is not None:
            # As TRL: the router loss weighted by `router_aux_loss_coef`, logged unweighted as `aux_loss`.
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        if packed is not None:
            # The metrics are logged from the padded layout, as TRL's; only their per-token inputs are unpacked.
            stats = {k: packed.to_padded(stats[k].detach()) for k in ("entropy", "mean_logit", "is_top1")}
            mask = packed.to_padded(mask)
        self._log_fastdpo_metrics(mode, out, stats, mask, inputs)

        if return_outputs:
            # As TRL: `compute_metrics` wants logits, which the fused head never builds; recompute them, with TRL's
            # deprecation warning.
            warnings.warn("return_outputs=True (the logits it hands to compute_metrics) is deprecated in TRL 1.16 "
                          "and will be removed in TRL 2.0: the fused head never builds the logits, so they are "
                          "recomputed by an extra forward pass", FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_fastdpo_metrics(self, mode, out, stats, mask, inputs):
        """TRL's metrics, gathered across processes the way DPOTrainer gathers them."""
        acc = self.accelerator

        def log(name, value):
            self._metrics[mode][name].append(value)

        B = out.chosen_logps.shape[0]
        maskf = mask.to(torch.float32)
        cmask, rmask = maskf[:B], maskf[B:]

        total = acc.gather_for_metrics(maskf.sum()).sum()
        ent = acc.gather_for_metrics((stats["entropy"].detach().float() * maskf).sum()).sum()
        log("entropy", (ent / total).item() if total > 0 else 0.0)

        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        mean_logit = stats["mean_logit"].detach().float()
        for name, m, rows in (("chosen", cmask, slice(0, B)), ("rejected", rmask, slice(B, 2 * B))):
            logit_sum = acc.gather_for_metrics((mean_logit[rows] * m).sum()).sum().item()
            count = acc.gather_for_metrics(m.sum()).sum().item()
            log(f"logits/{name}", logit_sum / count if count > 0 else 0.0)

        correct = acc.gather_for_metrics((stats["is_top1"][:B] & mask[:B]).sum()).sum()
        chosen_tokens = acc.gather_for_metrics(mask[:B].sum()).sum()
        log("mean_token_accuracy", (correct / chosen_tokens).item() if chosen_tokens > 0 else 0.0)

        chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
        log("rewards/chosen", acc.gather(chosen_rewards).mean().item())
        log("rewards/rejected", acc.gather(rejected_rewards).mean().item())
        log("rewards/accuracies",
                                acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        log("rewards/margins", acc.gather(chosen_rewards - rejected_rewards).mean().item())
        log("logps/chosen", acc.gather(out.chosen_logps.detach()).mean().item())
        log("logps/rejected", acc.gather(out.rejected_logps.detach()).mean().item())
        # Stock DPOTrainer logs none of these, whatever its loss types (sft included); the loss types only fastdpo
        # has (cpo, orpo) log them as TRL's CPO/ORPO trainers do, averaged across processes.
        if not set(self.fastdpo_config.loss_type) & _LOSS_TYPES_BEYOND_TRL:
            return
        for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
            if name in out.metrics:
                log(name, acc.gather_for_metrics(out.metrics[name].detach().reshape(1)).mean().item())
