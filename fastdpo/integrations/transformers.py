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
from typing import Any

import torch
from torch import nn

from .. import _validate as check
from .. import functional
from .._options import IGNORE_INDEX, Backend, Memory
from ..losses import DPOOutput, LossConfig, compute_dpo_loss
from ._hf_batch import check_inputs
from ._hf_head import model_head_output, model_token_stats
from ._hf_model import (
    HeadOutput,
    HeadSpec,
    add_hidden_states_forward,
    backbone_hidden_states,
    call_head_module,
    call_lm_head,
    is_peft_model,
    lm_head_spec,
    to_fastdpo_transform,  # noqa: F401 (public: the docs point at it here)
    unwrap_causal_lm,
    unwrap_wrappers,
)
from ._hf_packing import PackedBatch, check_packable, check_packable_config, completion_layout, pack_batch

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


def _packed_token_stats(model, packed: PackedBatch, *, temperature, extras, ignore_index, backend,
                        memory="lean") -> dict:
    """Per-token statistics ``[L]`` of ``packed.targets`` from one forward of ``model`` over the packed row."""
    return model_head_output(model, None, packed=packed, temperature=temperature, extras=extras,
                             ignore_index=ignore_index, backend=backend, memory=memory).head


def causal_lm_token_stats(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *, temperature: float = 1.0, extras: bool = False,
                          ignore_index: int = IGNORE_INDEX, backend: Backend = "auto",
                          hidden_states: torch.Tensor | None = None, padding_free: bool = False,
                          memory: Memory = "lean", **model_kwargs: Any) -> dict:
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
            or for no token at all). Default False; a bool (``TypeError`` otherwise). Eager and sdpa attention compute
            the packed row as one ``L × L`` product under a block-diagonal mask (work in ``L²``, not ``Σ T_s²``);
            ``flash_attention_2``'s varlen kernels compute only the diagonal blocks.
        memory: what the head keeps for its backward, as in :func:`fastdpo.fused_logprobs` (``"lean"``,
            ``"fast"`` or a budget in GiB).
        **model_kwargs: passed to the backbone (e.g. ``position_ids``).

    Returns:
        dict of ``[B, T-1]`` tensors (see :func:`fastdpo.token_stats`): ``logp`` (differentiable), ``mean_logit``,
        and the extras; 0 where the shifted label is ignored.
    """
    check_inputs(input_ids, labels, attention_mask)
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


def causal_lm_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """``[B, T-1]`` log-probs of the next-token labels (0 where ignored); see :func:`causal_lm_token_stats`
    (``padding_free=True`` runs the backbone on the packed batch)."""
    return causal_lm_token_stats(model, input_ids, labels, attention_mask, **kwargs)["logp"]


def _adapter_disabled(model):
    model = unwrap_wrappers(model)
    if not is_peft_model(model):
        raise TypeError(f"ref_model={DISABLE_ADAPTER!r} needs a PEFT model (the reference is the policy without "
                        f"its adapter), got {type(model).__name__}")
    return model.disable_adapter()


def causal_lm_dpo_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, *, ref_model: nn.Module | str | None = None,
                       ref_logps: torch.Tensor | None = None, reference_free: bool = False, beta: float | None = None,
                       temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, backend: Backend = "auto",
                       config: LossConfig | None = None, padding_free: bool = False, memory: Memory = "lean",
                       **loss_options: Any) -> DPOOutput:
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
    _check_dpo_batch(input_ids, labels, attention_mask, ref_model, ref_logps, reference_free, padding_free)
    if config is None:
        # TRL logs the entropy and token accuracy too; they come from the same kernel pass.
        loss_options.setdefault("extra_metrics", True)
    # One rule with dpo_loss: beta defaults to 0.1 (config.beta with a config), a different beta raises.
    config = functional.loss_config(beta, config, loss_options)
    common = dict(temperature=temperature, ignore_index=ignore_index, backend=backend)
    packed = pack_batch(input_ids, labels, attention_mask, ignore_index=ignore_index) if padding_free else None
    batch = (input_ids, labels, attention_mask, packed)
    stats = _stats_of(model, batch, extras=config.needs_token_extras, memory=memory, **common)
    ref_token_logps = None if ref_model is None else _reference_token_logps(model, ref_model, batch, common)
    device = stats["logp"].device
    mask, cu_seqlens = completion_layout(device, labels, packed, ignore_index)
    return compute_dpo_loss(stats, mask, config, ref_token_logps=ref_token_logps,
                            ref_logps=None if ref_logps is None else ref_logps.to(device),
                            reference_free=reference_free, cu_seqlens=cu_seqlens)


def _check_dpo_batch(input_ids, labels, attention_mask, ref_model, ref_logps, reference_free, padding_free):
    """The batch of :func:`causal_lm_dpo_loss` (``2B`` rows) and its one reference."""
    check_inputs(input_ids, labels, attention_mask)
    check.flag("reference_free", reference_free)
    check.flag("padding_free", padding_free)
    if input_ids.shape[0] % 2:
        raise ValueError(f"input_ids must hold an even number of rows (B chosen then B rejected), got "
                         f"{input_ids.shape[0]}")
    given = [n for n, v in (("ref_model", ref_model), ("ref_logps", ref_logps)) if v is not None]
    if reference_free:
        given.append("reference_free=True")
    check.one_reference(given, True, "ref_model, ref_logps or reference_free=True")
    if ref_logps is not None:
        check.reference_logps(ref_logps, input_ids.shape[0])


def _stats_of(model, batch, *, extras, memory="lean", **common) -> dict:
    """Per-token statistics of one model on the batch ``(input_ids, labels, attention_mask, packed)``: ``[L]`` of
    the packed stream when ``packed`` is given, else ``[2B, T-1]``."""
    input_ids, labels, attention_mask, packed = batch
    if packed is not None:
        return _packed_token_stats(model, packed, extras=extras, memory=memory, **common)
    return causal_lm_token_stats(model, input_ids, labels, attention_mask, extras=extras, memory=memory, **common)


def _reference_token_logps(model, ref_model, batch, common):
    """The reference's per-token log-probs, without gradient: ``ref_model`` or the PEFT policy without adapter."""
    if isinstance(ref_model, str):
        if ref_model != DISABLE_ADAPTER:
            raise ValueError(f"ref_model must be a model or {DISABLE_ADAPTER!r}, got {ref_model!r}")
        ctx, ref = _adapter_disabled(model), model
    else:
        ctx, ref = contextlib.nullcontext(), ref_model
    with torch.no_grad(), ctx:
        return _stats_of(ref, batch, extras=False, **common)["logp"]
