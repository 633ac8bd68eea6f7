"""Model surgery on a Hugging Face causal LM: find its lm-head and logit transform under the wrappers (data-parallel,
PEFT, FSDP1 units, activation checkpointing), run its backbone alone, and give its forward (and its lm-head's) the
keywords through which fastdpo's head runs inside the model's own forward. See
:mod:`fastdpo.integrations.transformers`."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

# Data-parallel wrappers that hold the model as `.module` and run it from their own forward. Matched by class name
# so that DeepSpeed is never imported here.
_WRAPPER_CLASSES = ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")
# Module wrappers that hold the wrapped module under these attributes and call it from their forward (FSDP1 units,
# activation-checkpoint wrappers).
_INNER_MODULE_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclass(frozen=True)
class HeadSpec:
    """The lm-head of a causal LM and its logit transform, in fastdpo's order.

    ``logits = logit_scale · softcap·tanh((h·weightᵀ + bias)/softcap)`` (the softcap only when not None).

    Attributes:
        weight: ``[V, H]`` lm-head weight (the input embedding when tied).
        bias: ``[V]`` lm-head bias or None.
        softcap: tanh soft-capping in fastdpo's order (applied before ``logit_scale``), or None.
        logit_scale: multiplier of the (capped) logits.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float

    def options(self) -> dict:
        """Keyword arguments of :func:`fastdpo.token_stats` / :func:`fastdpo.dpo_loss` for this head."""
        return {"softcap": self.softcap, "logit_scale": self.logit_scale}


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_wrappers(model):
    """The module under data-parallel wrappers (DDP, FSDP1's root unit, a DeepSpeed engine), or the model itself.

    FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3 keep the module itself (with hooks), so it is returned as is.
    """
    while type(model).__name__ in _WRAPPER_CLASSES and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def innermost(module):
    """The module under FSDP1 unit and activation-checkpoint wrappers (whose forward calls it)."""
    while True:
        inner = next((getattr(module, a) for a in _INNER_MODULE_ATTRS if isinstance(getattr(module, a, None),
                                                                                   torch.nn.Module)), None)
        if inner is None:
            return module
        module = inner


def unwrap_causal_lm(model):
    """The ``*ForCausalLM`` module under data-parallel and PEFT wrappers (or the model itself).

    Raises:
        TypeError: for prompt-learning PEFT methods (prefix/prompt tuning), whose virtual tokens only exist in
            ``PeftModel.forward`` and so are skipped when the backbone is run directly.
    """
    model = unwrap_wrappers(model)
    if is_peft_model(model):
        if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            raise TypeError("model: prompt-learning PEFT adapters (prefix/prompt/p-tuning) are not supported by "
                            "fastdpo's transformers helpers; use a LoRA-style adapter")
        return model.get_base_model()
    return model


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_transform(config) -> tuple[float | None, float]:
    """``(softcap, scale)`` as the model applies them: ``softcap·tanh(scale·z/softcap)``.

    Reads the same config attributes as TRL's fused head (``trl.trainer.utils.add_fused_lm_head``).
    """
    text = text_config(config)
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return softcap, 1.0 if scale is None else float(scale)


def to_fastdpo_transform(softcap, scale) -> tuple[float | None, float]:
    """Convert a scale-then-softcap transform ``c·tanh(s·z/c)`` into fastdpo's softcap-then-scale form.

    ``c·tanh(s·z/c) = s·(c/|s|)·tanh(z/(c/|s|))`` for any ``s ≠ 0`` (tanh is odd), so the result is
    ``(c/|s|, s)``; with ``s = 0`` every logit is 0 and the softcap is dropped.
    """
    if softcap is None or scale == 0:
        return None, float(scale)
    if not softcap > 0:
        raise ValueError(f"final_logit_softcapping must be > 0, got {softcap!r}")
    return float(softcap) / abs(float(scale)), float(scale)


def _lm_head_module(lm):
    """The output-embedding module of the causal LM ``lm`` (possibly an FSDP1 unit), checked."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    inner = innermost(head) if isinstance(head, torch.nn.Module) else None
    if inner is None or not isinstance(getattr(inner, "weight", None), torch.Tensor):
        raise TypeError(f"model: {type(lm).__name__} has no output embedding (lm-head) with a weight")
    if inner.__class__.__module__.startswith("peft."):
        raise TypeError("model: a PEFT adapter on the lm-head is not supported: fastdpo reads lm_head.weight "
                        "directly, so the adapter would never be applied or trained; remove 'lm_head' from "
                        "target_modules")
    return head


def head_transform(lm) -> dict:
    softcap, scale = to_fastdpo_transform(*_model_transform(lm.config))
    return {"softcap": softcap, "logit_scale": scale}


def lm_head_spec(model) -> HeadSpec:
    """The lm-head (tied or not) of a causal LM and its logit transform in fastdpo's order.

    The weight is read as the module holds it *outside* a forward: under FSDP and ZeRO-3 that is a shard (or a
    ``DTensor``); the loss helpers below never read it this way but call the head as a module
    (:func:`call_lm_head`).

    Args:
        model: a ``transformers`` causal LM, optionally PEFT- or data-parallel-wrapped.

    Raises:
        TypeError: when the model has no linear output embedding, or a PEFT adapter wraps the lm-head
            (fastdpo reads ``lm_head.weight`` directly, so the adapter would be silently ignored).
    """
    lm = unwrap_causal_lm(model)
    head = innermost(_lm_head_module(lm))
    return HeadSpec(weight=head.weight, bias=getattr(head, "bias", None), **head_transform(lm))


def _head_forward(self, *args, fastdpo_head=None, **kwargs):
    # Inside the module's own forward the data-parallel wrappers have gathered (and cast) its parameters.
    if fastdpo_head is None:
        return self._fastdpo_original_forward(*args, **kwargs)
    return fastdpo_head(*args, self.weight, getattr(self, "bias", None), **kwargs)


def call_lm_head(model, hidden, fn):
    """Call the lm-head module of ``model`` so that its forward returns ``fn(hidden, weight, bias)``.

    ``weight`` and ``bias`` are the head's parameters as its own forward sees them: gathered by FSDP1/FSDP2/ZeRO-3,
    cast by a mixed-precision policy, and tracked by DDP and by the wrappers' backward hooks (which gather them
    again for a backward that recomputes from them, and reduce their gradients). Call it from inside the model's
    forward (as :func:`add_hidden_states_forward` does) under DDP; FSDP and ZeRO-3 also accept a direct call.
    ``fn`` should return tensors in a tuple, list, dict or dataclass, so that the wrappers find them.
    """
    return call_head_module(_lm_head_module(unwrap_causal_lm(model)), hidden, fn)


def call_head_module(head, hidden, fn):
    """:func:`call_lm_head` given the lm-head module itself (an FSDP1 unit or the module under it)."""
    inner = innermost(head)
    if inner.__dict__.get("forward") is None or not getattr(inner, "_fastdpo_head_forward", False):
        # An instance attribute (not a closure), so that a deep copy of the model calls its own forward.
        inner._fastdpo_original_forward = inner.forward
        inner.forward = types.MethodType(_head_forward, inner)
        inner._fastdpo_head_forward = True
    return head(hidden, fastdpo_head=fn)


def backbone_of(lm):
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        raise TypeError(f"model: {type(lm).__name__} does not expose its backbone as `base_model`; fastdpo needs "
                        f"a transformers *ForCausalLM model")
    return backbone


def _backbone_outputs(lm, *args, **kwargs):
    # The lm-head (and with it the labels and loss arguments) is fastdpo's job: the backbone must not see them.
    for key in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict"):
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    return backbone_of(lm)(*args, **kwargs)


def _last_hidden_state(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _run_backbone(lm, *args, **kwargs) -> torch.Tensor:
    return _last_hidden_state(_backbone_outputs(lm, *args, **kwargs))


def backbone_hidden_states(model, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """The final hidden states ``[B, T, H]`` of a causal LM: its backbone only, no lm-head.

    For a PEFT model the adapters take part (they live inside the backbone's layers); run it under
    ``model.disable_adapter()`` for the base model. This calls the backbone module directly; under a
    data-parallel wrapper use ``model(..., fastdpo_head=fn)`` (:func:`add_hidden_states_forward`) instead, so that
    the wrapper sees one ordinary forward.
    """
    return _run_backbone(unwrap_causal_lm(model), input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _hidden_states_forward(self, *args, fastdpo_hidden_states=False, fastdpo_head=None, **kwargs):
    if fastdpo_head is None and not fastdpo_hidden_states:
        return self._fastdpo_original_forward(*args, **kwargs)
    out = _backbone_outputs(self, *args, **kwargs)
    hidden, router_logits = _last_hidden_state(out), getattr(out, "router_logits", None)
    if fastdpo_head is not None:
        # The router logits leave through the same forward as the head's result, so that a wrapper sees both.
        return HeadOutput(head=call_lm_head(self, hidden, fastdpo_head), router_logits=router_logits)
    return _HiddenStates(last_hidden_state=hidden, router_logits=router_logits)


def add_hidden_states_forward(model) -> None:
    """Add two keywords to the forward of a causal LM (``model`` may be PEFT- or data-parallel-wrapped).

    - ``model(..., fastdpo_hidden_states=True)`` returns an object whose ``last_hidden_state`` is the backbone's
      ``[B, T, H]`` output;
    - ``model(..., fastdpo_head=fn)`` runs the backbone, then the lm-head module on its output, and returns a
      :class:`HeadOutput` whose ``head`` is ``fn(hidden [B, T, H], weight, bias)`` computed inside the lm-head's
      own forward (see :func:`call_lm_head`): the way to run a fused head under DDP, FSDP and ZeRO.

    Both also carry ``router_logits``: the backbone's MoE router logits when ``output_router_logits=True`` is
    passed, else None. Without the keywords the model's forward is unchanged. Going through ``model(...)`` keeps
    wrappers (PEFT, DDP, FSDP, DeepSpeed, accelerate hooks) in the loop. Idempotent.
    """
    lm = unwrap_causal_lm(model)
    if lm.__dict__.get("forward") is not None and getattr(lm, "_fastdpo_hidden_states_forward", False):
        return
    # The forward it replaces is kept as an instance attribute, not in a closure, so that a deep copy of the model
    # (a reference model) runs its own forward.
    lm._fastdpo_original_forward = lm.forward

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(lm).forward)
    def forward(self, *args, **kwargs):
        return _hidden_states_forward(self, *args, **kwargs)

    lm.forward = types.MethodType(forward, lm)
    lm._fastdpo_hidden_states_forward = True


@dataclass
class _HiddenStates:
    last_hidden_state: torch.Tensor
    router_logits: tuple | None = None


@dataclass
class HeadOutput:
    """What ``model(..., fastdpo_head=fn)`` returns: ``head`` is ``fn``'s result, ``router_logits`` the backbone's
    MoE router logits (a tuple of ``[N, num_experts]`` tensors) when ``output_router_logits=True`` was passed, else
    None."""

    head: object
    router_logits: tuple | None = None
