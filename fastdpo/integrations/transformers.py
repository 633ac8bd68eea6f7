"""fastdpo on Hugging Face ``transformers`` causal language models.

A causal LM is a backbone (embeddings, decoder layers, final norm) followed by an lm-head and, on some
architectures, a transform of the logits. The functions here run only the backbone, then hand its hidden
states and the lm-head to fastdpo, so the ``[tokens, vocab]`` logits never exist, and reproduce the model's
own logit transform:

- Gemma-2/3 ``final_logit_softcapping``: ``c·tanh(z/c)``;
- Cohere ``logit_scale`` (and Muse Glimmer ``output_multiplier``, Falcon-H1 ``lm_head_multiplier``): ``z·s``;
- Granite / MiniCPM3 ``logits_scaling``: ``z/s`` (HyperCLOVA X multiplies instead);
- a bias on the lm-head (e.g. Phi).

These models apply their scale *before* the softcap (``c·tanh(s·z/c)``) while fastdpo applies it after
(``s·c'·tanh(z/c')``); the two agree exactly with ``c' = c/|s|``, which :func:`lm_head_spec` returns.

Works with a PEFT-wrapped model (LoRA-style adapters injected into the layers) and, for the reference,
with the same model with its adapter disabled (``ref_model="disable_adapter"``). A model loaded with a
tensor-parallel ``tp_plan`` has a ``DTensor`` lm-head sharded over the vocabulary: the head is then
vocabulary-parallel by itself (see :class:`fastdpo.VocabParallel`), without a gather.

Data-parallel wrappers (DDP, FSDP1, FSDP2 ``fully_shard``, DeepSpeed ZeRO-1/2/3): pass the wrapped model itself.
The head's statistics are computed *inside the lm-head module's own forward*, and that module is called from
inside the model's forward (see :func:`add_hidden_states_forward`), so every wrapper gathers, casts and reduces the
head exactly as for an ordinary forward; fastdpo never gathers a parameter itself. The backward recomputes the
logits from the weight that the wrapper's own pre-backward hooks gathered again.

``padding_free=True`` removes the padding of a batch and runs the backbone once on its sequences packed into one
row (:func:`pack_batch`); the loss then reduces over ``cu_seqlens`` segments. Whether a model computes a packed row
exactly is proven for that model at its first packed forward (:func:`check_packable`: a probe forward of packed
against one-by-one sequences), and a model that does not is refused with a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import types
from dataclasses import dataclass

import torch

from .. import _packing, functional
from .. import _validate as check
from .._options import IGNORE_INDEX
from ..losses import DPOOutput, LossConfig, compute_dpo_loss

__all__ = [
    "HeadSpec",
    "lm_head_spec",
    "unwrap_causal_lm",
    "call_lm_head",
    "call_head_module",
    "backbone_hidden_states",
    "add_hidden_states_forward",
    "HeadOutput",
    "causal_lm_token_stats",
    "causal_lm_logprobs",
    "causal_lm_dpo_loss",
    "PackedBatch",
    "pack_batch",
    "check_packable",
    "check_packable_config",
    "DISABLE_ADAPTER",
]

#: ``ref_model`` value of :func:`causal_lm_dpo_loss`: the reference is the policy with its PEFT adapter disabled.
DISABLE_ADAPTER = "disable_adapter"

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


def _is_peft_model(model) -> bool:
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


def _innermost(module):
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
    if _is_peft_model(model):
        if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            raise TypeError("model: prompt-learning PEFT adapters (prefix/prompt/p-tuning) are not supported by "
                            "fastdpo's transformers helpers; use a LoRA-style adapter")
        return model.get_base_model()
    return model


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_transform(config) -> tuple[float | None, float]:
    """``(softcap, scale)`` as the model applies them: ``softcap·tanh(scale·z/softcap)``.

    Reads the same config attributes as TRL's fused head (``trl.trainer.utils.add_fused_lm_head``).
    """
    text = _text_config(config)
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
    inner = _innermost(head) if isinstance(head, torch.nn.Module) else None
    if inner is None or not isinstance(getattr(inner, "weight", None), torch.Tensor):
        raise TypeError(f"model: {type(lm).__name__} has no output embedding (lm-head) with a weight")
    if inner.__class__.__module__.startswith("peft."):
        raise TypeError("model: a PEFT adapter on the lm-head is not supported: fastdpo reads lm_head.weight "
                        "directly, so the adapter would never be applied or trained; remove 'lm_head' from "
                        "target_modules")
    return head


def _head_transform(lm) -> dict:
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
    head = _innermost(_lm_head_module(lm))
    return HeadSpec(weight=head.weight, bias=getattr(head, "bias", None), **_head_transform(lm))


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
    inner = _innermost(head)
    if inner.__dict__.get("forward") is None or not getattr(inner, "_fastdpo_head_forward", False):
        # An instance attribute (not a closure), so that a deep copy of the model calls its own forward.
        inner._fastdpo_original_forward = inner.forward
        inner.forward = types.MethodType(_head_forward, inner)
        inner._fastdpo_head_forward = True
    return head(hidden, fastdpo_head=fn)


def _backbone(lm):
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
    return _backbone(lm)(*args, **kwargs)


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


def _is_integer_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_inputs(input_ids, labels, attention_mask=None):
    """The batch tensors, checked before the backbone sees them (its own errors would not name the argument)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise TypeError(f"input_ids must be a [B, T] tensor, got "
                        f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if not _is_integer_tensor(input_ids):
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor shaped like input_ids, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)} (unshifted, "
                         f"as for model(labels=...)), got {tuple(labels.shape)}")
    if not _is_integer_tensor(labels):
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must be shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
    for name, t in (("labels", labels), ("attention_mask", attention_mask)):
        if t is not None and t.device != input_ids.device:
            raise ValueError(f"{name} must be on the device of input_ids ({input_ids.device}), got {t.device}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens per row to predict one, got shape "
                         f"{tuple(input_ids.shape)}")


class _TokenStatsHead:
    """``fn`` of :func:`call_lm_head`: fastdpo's per-token statistics of the shifted labels.

    ``layout``: ``"shift"`` (the backbone's ``[B, T, H]``: drop the last position), ``"shifted"`` (hidden states
    already aligned with ``targets``) or ``"packed"`` (a ``[1, L, H]`` packed row, ``targets`` ``[L]``). A plain
    callable (not a dataclass or container), so that wrappers that walk a forward's arguments leave it and its label
    tensor alone.
    """

    def __init__(self, targets, layout, options):
        self.targets, self.layout, self.options = targets, layout, options

    def __call__(self, hidden, weight, bias):
        if self.layout == "shift":
            hidden = hidden[:, :-1]
        elif self.layout == "packed":
            hidden = hidden.reshape(-1, hidden.shape[-1])
        stats = functional.token_stats(hidden, weight, self.targets.to(hidden.device), bias=bias,
                                       names={"targets": "labels"}, **self.options)
        # FSDP2 warns about views returned by a unit's forward (an in-place op on one would skip its backward hook);
        # these are per-token ([B, T-1] or [L]), so owning copies cost nothing.
        return {name: value.clone() if value._base is not None else value for name, value in stats.items()}


def model_head_output(model, labels, *, packed=None, hidden_states=None, temperature=1.0, extras=False,
                      ignore_index=IGNORE_INDEX, backend="auto", memory="lean", **model_kwargs) -> HeadOutput:
    """:func:`causal_lm_token_stats` without the input checks, as the :class:`HeadOutput` of one forward.

    ``model_kwargs`` go to the model's forward; with ``output_router_logits=True`` the MoE router logits come back
    in ``router_logits``, from the same forward that computed the statistics (``head``). With ``packed`` (a
    :class:`PackedBatch`; ``labels`` unused) the backbone runs on the packed row and ``head`` holds ``[L]`` stats
    of ``packed.targets``.
    """
    lm = unwrap_causal_lm(model)
    options = dict(ignore_index=ignore_index, temperature=temperature, backend=backend, extras=extras, memory=memory,
                   **_head_transform(lm))
    if packed is not None:
        check_packable(model, device=packed.input_ids.device)
        model_kwargs = {**model_kwargs, **packed.backbone_kwargs()}
        fn = _TokenStatsHead(packed.targets, "packed", options)
    elif hidden_states is not None:
        return HeadOutput(head=call_lm_head(lm, hidden_states[:, :-1],
                                            _TokenStatsHead(labels[:, 1:], "shifted", options)))
    else:
        fn = _TokenStatsHead(labels[:, 1:], "shift", options)
    add_hidden_states_forward(lm)
    # Through `model(...)`, so that every wrapper (DDP, FSDP, DeepSpeed, PEFT, accelerate) sees one ordinary forward.
    return model(**model_kwargs, fastdpo_head=fn)


def model_token_stats(model, labels, **kwargs) -> dict:
    """:func:`causal_lm_token_stats` without the input checks; see :func:`model_head_output`."""
    return model_head_output(model, labels, **kwargs).head


# --- padding-free (packed) batches ----------------------------------------------------------------------------

# Attention implementations that keep packed sequences apart when given restarting `position_ids` (and no
# attention mask): transformers' masking_utils turns them into a block-diagonal causal mask for eager, sdpa
# and flex attention, and flash-attn's varlen kernels read the sequence starts from them.
_PACKABLE_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


@dataclass
class PackedBatch:
    """A padded ``[S, T]`` batch with its padding removed: the ``L`` real tokens back to back in one row.

    Attributes:
        input_ids: ``[1, L]`` the tokens of every sequence (row order), without padding.
        position_ids: ``[1, L]`` each token's position inside its own sequence (restarts at 0).
        targets: ``[L]`` the next-token labels of the packed tokens, ``ignore_index`` on the last token of every
            sequence (its "next token" belongs to the following sequence) — the padded ``labels[:, 1:]``.
        cu_seqlens: ``[S+1]`` int32 offsets of the sequences (flash-attn's varlen convention).
        index: ``[L]`` where each packed token sits in the flattened ``[S·T]`` padded batch.
        shape: ``(S, T)`` of the padded batch.
        model_kwargs: other per-token model inputs (e.g. ``token_type_ids``), packed as ``[1, L]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    shape: tuple
    model_kwargs: dict

    def backbone_kwargs(self) -> dict:
        """Keyword arguments of the backbone's forward: no attention mask and no cache, so that transformers
        builds the block-causal mask from the restarting ``position_ids`` (with a cache it would not)."""
        return dict(self.model_kwargs, input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=None,
                    use_cache=False)

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        """``[L]`` per-token values of the packed stream as the padded ``[S, T-1]`` layout of
        :func:`causal_lm_token_stats` (0 elsewhere); differentiable."""
        S, T = self.shape
        flat = values.new_zeros(S * T).index_copy(0, self.index, values)
        return flat.view(S, T)[:, :-1]


def _check_one_run_per_row(keep: torch.Tensor) -> None:
    """Refuse a mask whose 1s in a row are not one contiguous run: a padded row with a hole keeps counting
    positions across it, which the packed row (positions restarting, masked tokens dropped) cannot reproduce."""
    starts = keep[:, :1].long().sum(1) + (keep[:, 1:] & ~keep[:, :-1]).sum(1)
    if bool((starts > 1).any()):
        row = int((starts > 1).nonzero()[0, 0])
        raise ValueError(f"attention_mask: padding_free=True needs each row's tokens to be one contiguous run (right "
                         f"or left padding only), but row {row} has a 0 between 1s: "
                         f"{keep[row].long().tolist()}; use padding_free=False for such masks")


def pack_batch(input_ids, labels, attention_mask=None, *, ignore_index=IGNORE_INDEX, **model_kwargs) -> PackedBatch:
    """Remove the padding of a ``[S, T]`` batch (right or left padded); see :class:`PackedBatch`.

    ``labels`` are unshifted (as for ``model(labels=...)``). Positions restart at 0 with every sequence, as in the
    padded batch when it is right-padded (TRL's collators pad on the right). Labels under ``attention_mask == 0``
    are dropped with their tokens. Other ``[S, T]`` tensors in ``model_kwargs`` are packed alike; the rest is
    passed on unchanged. On a GPU, the packed length is read on the host (one synchronisation), and the mask check
    below another one, which ``FASTDPO_CHECK_LABELS=0`` skips as it skips the label range check.

    Raises:
        ValueError: for a mask with a hole (a 0 between 1s in a row: the padded batch keeps counting positions
            across it, the packed one cannot), or one that masks every token (no token to run the backbone on).
    """
    _check_inputs(input_ids, labels)
    if model_kwargs.get("position_ids") is not None:
        raise ValueError("position_ids: padding_free=True computes its own position ids (restarting at every "
                         "sequence); do not pass any")
    model_kwargs.pop("position_ids", None)
    S, T = input_ids.shape
    keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(input_ids.device) != 0)
    if tuple(keep.shape) != (S, T):
        raise ValueError(f"attention_mask must be shaped like input_ids {(S, T)}, got {tuple(keep.shape)}")
    if keep.device.type == "cpu" or os.environ.get("FASTDPO_CHECK_LABELS", "1") != "0":
        _check_one_run_per_row(keep)
    index = keep.flatten().nonzero().squeeze(1)
    if index.numel() == 0:
        raise ValueError("attention_mask: padding_free=True found no token to run the backbone on (the mask is 0 "
                         "everywhere); give at least one unmasked token")
    positions = (keep.long().cumsum(1) - 1).flatten()[index]
    row = index // T
    packed_labels = labels.to(input_ids.device).flatten()[index]
    # Token i predicts token i+1 only inside its own sequence.
    same = torch.zeros_like(keep.flatten()[index])
    same[:-1] = row[1:] == row[:-1]
    following = torch.cat([packed_labels[1:], packed_labels.new_full((1,), ignore_index)])
    targets = torch.where(same, following, torch.full_like(following, ignore_index))
    packed_kwargs = {k: (v.flatten()[index].unsqueeze(0) if isinstance(v, torch.Tensor) and tuple(v.shape) == (S, T)
                         else v) for k, v in model_kwargs.items()}
    return PackedBatch(input_ids=input_ids.flatten()[index].unsqueeze(0), position_ids=positions.unsqueeze(0),
                       targets=targets, cu_seqlens=_packing.cu_seqlens_from_lengths(keep.sum(1)), index=index,
                       shape=(S, T), model_kwargs=packed_kwargs)


def _packing_refusal(name, config, backbone_cls, impl, *, loaded=True) -> str | None:
    """Why a model of class ``name`` (config ``config``, backbone class ``backbone_cls``, attention ``impl``) cannot
    keep packed sequences apart, read from its classes and config alone; None when nothing there refuses it.
    Before loading (``loaded=False``) no ``impl`` means transformers' default, which is packable."""
    if (impl is not None or loaded) and impl not in _PACKABLE_ATTENTION:
        return (f"{name} uses attn_implementation={impl!r}, which cannot keep packed sequences apart; use one of "
                f"{list(_PACKABLE_ATTENTION)} (flash_attention_2 on GPU)")
    if backbone_cls is not None:
        if "position_ids" not in inspect.signature(backbone_cls.forward).parameters:
            return f"the backbone of {name} takes no position_ids, so packed sequences cannot restart their positions"
        module = sys.modules.get(backbone_cls.__module__)
        if not any(hasattr(module, builder) for builder in _MASK_BUILDERS):
            return (f"{name} does not build its attention mask with transformers' masking_utils, so packed "
                    f"sequences would attend to each other")
    text = _text_config(config)
    layer_types = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None) or ()
    stateful = sorted({t for t in layer_types if not isinstance(t, str) or "attention" not in t or "linear" in t})
    if stateful:
        return (f"{name} has layers of type {stateful}, which carry state along the sequence across packed "
                f"sequence boundaries")
    return None


def _refuse(reason: str):
    raise ValueError(f"padding_free=True: {reason}; use padding_free=False")


def check_packable_config(config, *, attn_implementation=None) -> None:
    """Refuse ``padding_free=True`` for a model known only by its config, before the model is loaded.

    Runs the static part of :func:`check_packable` on the architecture's classes (no weights): attention
    implementation (``attn_implementation``, else the config's), ``position_ids`` and transformers' mask builders
    in the backbone, stateful layers. A model that passes must still pass :func:`check_packable` once loaded.

    Raises:
        ValueError: naming the architecture and why it cannot run packed.
    """
    import transformers

    try:
        backbone_cls = transformers.MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        backbone_cls = None  # an architecture transformers does not map: its class is checked once loaded
    name = type(config).__name__.removesuffix("Config") or type(config).__name__
    reason = _packing_refusal(name, config, backbone_cls,
                              attn_implementation or getattr(config, "_attn_implementation", None), loaded=False)
    if reason is not None:
        _refuse(reason)


# The probe of check_packable: lengths of its sequences (packed into one row, and run one by one), and the
# largest relative difference of their hidden states that counts as rounding, per dtype. float64 models round
# like float32 ones (eager attention computes its softmax in float32); 16-bit ones get about the square root of
# their epsilon. One sequence attending to another changes hidden states by the order of 1 (0.5 to 1.6 measured
# on tiny OPT, GptOss and Afmoe models, whatever the dtype).
_PROBE_LENGTHS = (5, 3, 4)
_PROBE_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 3e-2}
# Where check_packable keeps its verdict on a model instance: None (packs exactly) or the reason it does not.
_VERDICT_ATTR = "_fastdpo_packing_verdict"


def _probe_tokens(vocab: int, device) -> torch.Tensor:
    # Deterministic, so that every rank of a sharded model runs the very same forwards (their collectives match).
    n = sum(_PROBE_LENGTHS)
    return ((torch.arange(n, dtype=torch.int64) * 7919 + 11) % vocab).to(device)


def _probe_device(lm) -> torch.device:
    weight = lm.get_input_embeddings().weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _packing_probe(model, device) -> tuple[float, torch.dtype]:
    """The largest relative difference (and the dtype of the hidden states) between the backbone's hidden states of a few short sequences packed into
    one row (positions restarting, no attention mask) and of the same sequences run one by one.

    Runs ``model(...)`` itself (so that PEFT, DDP, FSDP and DeepSpeed wrappers gather their parameters as for any
    forward) without gradient, in eval mode (no dropout; the modules' modes are restored) and without autocast, on
    the same deterministic tokens on every rank: under FSDP or ZeRO-3 call it on every rank. 0 when the packed
    sequences are isolated and the kernels are exact; about 1 when they attend to each other.
    """
    lm = unwrap_causal_lm(model)
    ids = _probe_tokens(_text_config(lm.config).vocab_size, device)
    positions = torch.cat([torch.arange(n, device=device) for n in _PROBE_LENGTHS])
    add_hidden_states_forward(lm)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()

    def hidden(tokens, pos):
        out = model(input_ids=tokens.unsqueeze(0), position_ids=pos.unsqueeze(0), attention_mask=None,
                    use_cache=False, fastdpo_hidden_states=True)
        return out.last_hidden_state[0]

    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            packed = hidden(ids, positions)
            alone = torch.cat([hidden(seq, pos) for seq, pos in zip(ids.split(_PROBE_LENGTHS),
                                                                     positions.split(_PROBE_LENGTHS))])
    finally:
        for module, training in modes:
            module.training = training
    dtype = alone.dtype
    packed, alone = packed.double(), alone.double()
    # Per token, relative to that token's own hidden state: a leak into any sequence shows whatever its scale.
    scale = alone.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return ((packed - alone).norm(dim=-1) / scale).max().item(), dtype


def check_packable(model, *, probe: bool = True, device=None) -> None:
    """Raise ``ValueError`` unless ``model`` computes packed sequences exactly as it computes them one by one.

    Static refusals first (from the model's classes and config, no forward): attention implementations other than
    eager/sdpa/flex/flash-attention, backbones without ``position_ids`` or without transformers' mask builders
    (``masking_utils``), layers that carry state along the sequence (Mamba, convolution, linear attention). Then,
    unless ``probe=False``, the property itself is proven for this model: a probe runs ``model(...)`` (through its
    wrappers, without gradient, in eval mode, without autocast) on a few short sequences packed into one row and
    one by one, and refuses when their final hidden states differ by more than rounding in the model's dtype (as
    GptOss's do: its mask ignores ``position_ids``). The probe runs once per model instance (its verdict is kept on
    the unwrapped model, a refusal included); every rank feeds it the same tokens, so under FSDP/ZeRO-3 call this
    on every rank, as the training step does. ``device``: where the probe's tokens go (default: the input
    embedding's device).

    Raises:
        ValueError: naming the model class and why it cannot run packed.
    """
    lm = unwrap_causal_lm(model)
    name = type(lm).__name__
    backbone = _backbone(lm)
    reason = _packing_refusal(name, lm.config, type(backbone), getattr(lm.config, "_attn_implementation", None))
    if reason is None and probe:
        if _VERDICT_ATTR not in lm.__dict__:
            error, dtype = _packing_probe(model, _probe_device(lm) if device is None else torch.device(device))
            tol = _PROBE_TOLERANCE.get(dtype, max(_PROBE_TOLERANCE.values()))
            lm.__dict__[_VERDICT_ATTR] = None if error <= tol else (
                f"{name} does not keep packed sequences apart: its hidden states for sequences packed into one row "
                f"differ from the same sequences run one by one by {error:.3g} (relative; rounding in {dtype} "
                f"stays under {tol:g}), so they would attend to each other")
        reason = lm.__dict__[_VERDICT_ATTR]
    if reason is not None:
        _refuse(reason)


def _packed_token_stats(model, packed: PackedBatch, *, temperature, extras, ignore_index, backend,
                        memory="lean") -> dict:
    """Per-token statistics ``[L]`` of ``packed.targets`` from one forward of ``model`` over the packed row."""
    return model_head_output(model, None, packed=packed, temperature=temperature, extras=extras,
                             ignore_index=ignore_index, backend=backend, memory=memory).head


def causal_lm_token_stats(model, input_ids, labels, attention_mask=None, *, temperature=1.0, extras=False,
                          ignore_index=IGNORE_INDEX, backend="auto", hidden_states=None, padding_free=False,
                          memory="lean", **model_kwargs) -> dict:
    """Per-token statistics of the next-token labels, as ``model(...).logits`` would give them.

    Args:
        model: a ``transformers`` causal LM, optionally PEFT-wrapped, and optionally wrapped for data-parallel
            training (DDP, FSDP1, FSDP2, a DeepSpeed engine): pass the wrapper itself. The backbone and the lm-head
            run inside one call of ``model(...)``, the head as a module (see :func:`call_lm_head`).
        input_ids: ``[B, T]`` token ids.
        labels: ``[B, T]`` *unshifted* labels as for ``model(labels=...)``: position ``t+1``'s label is
            predicted from position ``t``; ``ignore_index`` on prompt and padding. Only labelled tokens are
            projected through the lm-head.
        attention_mask: ``[B, T]`` or None.
        temperature: divisor of the logits after the model's own transform.
        extras: also return ``entropy``, ``log_sum_sq_probs`` and ``is_top1``.
        hidden_states: the backbone's ``[B, T, H]`` output when already computed (the backbone is then not run and
            the lm-head module is called directly: fine in one process, under FSDP and under ZeRO-3, not under DDP).
        padding_free: remove the padding and run the backbone once on all sequences packed into one row, positions
            restarting at each sequence (see :func:`pack_batch`); the results are those of the right-padded batch,
            to rounding. The model is checked first (:func:`check_packable`, a ``ValueError`` if it cannot run
            packed exactly; its probe forward runs once per model), and so is the mask (a ``ValueError`` for a hole
            or for no token at all). Default False; a bool (``TypeError`` otherwise). Eager and sdpa attention compute the packed row as
            one ``L × L`` product under a block-diagonal mask (work in ``L²``, not ``Σ T_s²``);
            ``flash_attention_2``'s varlen kernels compute only the diagonal blocks.
        memory: what the head keeps for its backward, as in :func:`fastdpo.fused_logprobs` (``"lean"``,
            ``"fast"`` or a budget in GiB).
        **model_kwargs: passed to the backbone (e.g. ``position_ids``).

    Returns:
        dict of ``[B, T-1]`` tensors (see :func:`fastdpo.token_stats`): ``logp`` (differentiable), ``mean_logit``,
        and the extras; 0 where the shifted label is ignored.
    """
    _check_inputs(input_ids, labels, attention_mask)
    check.flag("extras", extras)
    if check.flag("padding_free", padding_free):
        if hidden_states is not None:
            raise ValueError("hidden_states: with padding_free=True the backbone runs on the packed batch; do not "
                             "pass padded hidden states")
        packed = pack_batch(input_ids, labels, attention_mask, ignore_index=ignore_index, **model_kwargs)
        stats = _packed_token_stats(model, packed, temperature=temperature, extras=extras,
                                    ignore_index=ignore_index, backend=backend, memory=memory)
        return {name: packed.to_padded(value) for name, value in stats.items()}
    if hidden_states is not None and type(model).__name__ == "DistributedDataParallel":
        raise ValueError("hidden_states: with a DDP-wrapped model the lm-head would run outside DDP's forward (its "
                         "gradient would arrive unannounced); leave hidden_states out so that model(...) runs the "
                         "backbone and the head in one forward")
    return model_token_stats(model, labels, hidden_states=hidden_states, temperature=temperature, extras=extras,
                             ignore_index=ignore_index, backend=backend, memory=memory, input_ids=input_ids,
                             attention_mask=attention_mask, **model_kwargs)


def causal_lm_logprobs(model, input_ids, labels, attention_mask=None, **kwargs) -> torch.Tensor:
    """``[B, T-1]`` log-probs of the next-token labels (0 where ignored); see :func:`causal_lm_token_stats`
    (``padding_free=True`` runs the backbone on the packed batch)."""
    return causal_lm_token_stats(model, input_ids, labels, attention_mask, **kwargs)["logp"]


def _adapter_disabled(model):
    model = unwrap_wrappers(model)
    if not _is_peft_model(model):
        raise TypeError(f"ref_model={DISABLE_ADAPTER!r} needs a PEFT model (the reference is the policy without "
                        f"its adapter), got {type(model).__name__}")
    return model.disable_adapter()


def causal_lm_dpo_loss(model, input_ids, labels, attention_mask=None, *, ref_model=None, ref_logps=None,
                       reference_free=False, beta=None, temperature=1.0, ignore_index=IGNORE_INDEX, backend="auto",
                       config: LossConfig | None = None, padding_free=False, memory="lean",
                       **loss_options) -> DPOOutput:
    """The DPO loss of a causal LM on a batch of ``2B`` rows (``B`` chosen, then ``B`` rejected).

    Args:
        model: the policy, a ``transformers`` causal LM, optionally PEFT-wrapped; under DDP, FSDP or DeepSpeed
            the wrapped model itself (see :func:`causal_lm_token_stats`).
        input_ids, labels, attention_mask: ``[2B, T]``; ``labels`` unshifted (as for ``model(labels=...)``)
            with ``ignore_index`` on prompt and padding.
        ref_model: the reference causal LM (run without gradient; wrapped or not), or ``"disable_adapter"`` for the PEFT
            policy with its adapter disabled. Exactly one of ``ref_model``, ``ref_logps`` and
            ``reference_free`` is required.
        ref_logps: ``[2B]`` precomputed reference sequence log-probs.
        reference_free: no reference model.
        beta, config, **loss_options: the loss, as in :func:`fastdpo.dpo_loss` (``beta`` 0.1 by default, or
            ``config.beta``; a ``beta`` that differs from ``config.beta`` raises a ``ValueError``).
        temperature, ignore_index, backend: as in :func:`fastdpo.token_stats`.
        memory: what the policy's head keeps for its backward, as in :func:`fastdpo.fused_logprobs`.
        padding_free: remove the padding and run the policy's (and the reference model's) backbone once on the
            ``2B`` sequences packed into one row (see :func:`causal_lm_token_stats`); the loss then sums over the
            packed stream's segments. Gives the right-padded batch's results, to rounding, with fewer tokens through
            the backbone. Default False.

    Returns:
        :class:`fastdpo.DPOOutput`; ``metrics`` include ``entropy`` and ``mean_token_accuracy`` like TRL's
        (``extra_metrics`` defaults to True here when the options are given as keywords).
    """
    _check_inputs(input_ids, labels, attention_mask)
    check.flag("reference_free", reference_free)
    check.flag("padding_free", padding_free)
    if input_ids.shape[0] % 2:
        raise ValueError(f"input_ids must hold an even number of rows (B chosen then B rejected), got "
                         f"{input_ids.shape[0]}")
    given = [n for n, v in (("ref_model", ref_model), ("ref_logps", ref_logps)) if v is not None]
    if reference_free:
        given.append("reference_free=True")
    if len(given) != 1:
        raise ValueError(f"give exactly one reference: ref_model, ref_logps or reference_free=True; got "
                         f"{given or 'none'}")
    if config is None:
        # TRL logs the entropy and token accuracy too; they come from the same kernel pass.
        loss_options.setdefault("extra_metrics", True)
    # One rule with dpo_loss: beta defaults to 0.1 (config.beta with a config), a different beta raises.
    config = functional.loss_config(beta, config, loss_options)
    common = dict(temperature=temperature, ignore_index=ignore_index, backend=backend)
    packed = None
    if padding_free:
        packed = pack_batch(input_ids, labels, attention_mask, ignore_index=ignore_index)
        stats = _packed_token_stats(model, packed, extras=config.needs_token_extras, memory=memory, **common)
    else:
        stats = causal_lm_token_stats(model, input_ids, labels, attention_mask, extras=config.needs_token_extras,
                                      memory=memory, **common)
    ref_token_logps = None
    if ref_model is not None:
        if isinstance(ref_model, str):
            if ref_model != DISABLE_ADAPTER:
                raise ValueError(f"ref_model must be a model or {DISABLE_ADAPTER!r}, got {ref_model!r}")
            ctx, ref = _adapter_disabled(model), model
        else:
            ctx, ref = contextlib.nullcontext(), ref_model
        with torch.no_grad(), ctx:
            if packed is not None:
                ref_token_logps = _packed_token_stats(ref, packed, extras=False, **common)["logp"]
            else:
                ref_token_logps = causal_lm_token_stats(ref, input_ids, labels, attention_mask, **common)["logp"]
    if ref_logps is not None and (not isinstance(ref_logps, torch.Tensor) or tuple(ref_logps.shape) !=
                                  (input_ids.shape[0],)):
        raise ValueError(f"ref_logps must be a [2B] = [{input_ids.shape[0]}] tensor, got "
                         f"{getattr(ref_logps, 'shape', type(ref_logps).__name__)}")
    if packed is None:
        mask, cu_seqlens = labels[:, 1:].to(stats["logp"].device) != ignore_index, None
    else:
        mask = packed.targets.to(stats["logp"].device) != ignore_index
        cu_seqlens = packed.cu_seqlens.to(stats["logp"].device)
    return compute_dpo_loss(stats, mask, config, ref_token_logps=ref_token_logps,
                            ref_logps=None if ref_logps is None else ref_logps.to(stats["logp"].device),
                            reference_free=reference_free, cu_seqlens=cu_seqlens)
