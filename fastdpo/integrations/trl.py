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

import dataclasses
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .._options import Backend, Memory
from ._trl_compat import TRAINER_CONFIG_FIELDS, TRAINER_INTERNALS, TRL_TESTED, check_trl_version, require_trl_internals

#: Alias of ``TRL_TESTED``: the TRL versions CI tests (older ones are refused, newer ones run with a warning).
TRL_SPECIFIER = TRL_TESTED

check_trl_version()

# TRL's internals are looked up leniently here: whether a newer TRL still has them is checked (and a missing one
# named) when FastDPOTrainer is built or patch_trl() applied, not at import.
import trl.models.utils as _trl_model_utils  # noqa: E402
import trl.trainer.utils as _trl_utils  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

disable_gradient_checkpointing = getattr(_trl_model_utils, "disable_gradient_checkpointing", None)

from .. import _metrics, _validate  # noqa: E402
from .. import head as _head  # noqa: E402
from .._options import IGNORE_INDEX  # noqa: E402
from .._packing import Sequences  # noqa: E402
from ..losses import compute_dpo_loss  # noqa: E402
from ._hf_head import model_head_output  # noqa: E402
from ._hf_model import unwrap_causal_lm  # noqa: E402
from ._hf_packing import check_packable, check_packable_config, completion_layout, pack_batch  # noqa: E402
from ._trl_config import DPO_LOSS_FIELDS, loss_config_from_dpo_config  # noqa: E402
from ._trl_patch import (  # noqa: E402
    _TRL_FUNCTION,  # noqa: F401 (patch point: tests replace it here)
    FastChunkedLogProbFunction,
    _PatchState,  # noqa: F401 (patch point: tests replace it here)
    is_patched,
    patch_trl,
    unpatch_trl,
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


def _refuse_unsupported_inputs(model, args, train_dataset, peft_config) -> None:
    """The trainer's inputs that fastdpo does not support, refused before DPOTrainer's set-up: a vision dataset,
    prompt-learning PEFT, ``router_aux_loss_coef`` on a model without router logits."""
    if train_dataset is not None:
        try:
            sample = next(iter(train_dataset))
        except (StopIteration, TypeError):
            sample = {}
        if "image" in sample or "images" in sample:
            raise ValueError("train_dataset: vision datasets are not supported by FastDPOTrainer; use "
                             "trl.DPOTrainer (or patch_trl()) for vision-language models")
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

    def __init__(self, model: nn.Module, ref_model: nn.Module | str | None = None, args: DPOConfig | None = None, *pos,
                 fastdpo_backend: Backend = "auto", fastdpo_memory: Memory = "lean", **kwargs: Any) -> None:
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
        _refuse_unsupported_inputs(model, args, kwargs.get("train_dataset", pos[1] if len(pos) > 1 else None),
                                   kwargs.get("peft_config", pos[8] if len(pos) > 8 else None))
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
        return self._reference_sequence_logps(stats["logp"], *completion_layout(stats["logp"].device, labels, packed))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        # As TRL: no KV cache on any forward (also the one that recomputes the logits for `return_outputs`).
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        stats, aux_loss, packed = self._token_stats(model, model_kwargs, labels, extras=True,
                                                    aux_loss=self.aux_loss_enabled)
        mask, cu_seqlens = completion_layout(stats["logp"].device, labels, packed)

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
        """TRL's metrics (:mod:`fastdpo._metrics`, in the padded layout), gathered across processes the way
        DPOTrainer gathers them: token metrics as gathered sums over gathered counts, pair metrics as the mean of the
        gathered pairs."""
        acc = self.accelerator

        def log(name, value):
            self._metrics[mode][name].append(value)

        seqs = Sequences(mask)
        sums = {**_metrics.extra_sums(stats, mask, seqs), **_metrics.logit_sums(stats, mask, seqs)}

        def gathered_mean(name):
            total, count = (acc.gather_for_metrics(t).sum() for t in sums[name])
            return (total / count).item() if count > 0 else 0.0

        log("entropy", gathered_mean("entropy"))
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for name in ("logits/chosen", "logits/rejected", "mean_token_accuracy"):
            log(name, gathered_mean(name))
        pairs = _metrics.pair_values(out.chosen_rewards, out.rejected_rewards, out.chosen_logps, out.rejected_logps)
        for name, values in pairs.items():
            log(name, acc.gather(values).mean().item())
        # Stock DPOTrainer logs none of these, whatever its loss types (sft included); the loss types only fastdpo
        # has (cpo, orpo) log them as TRL's CPO/ORPO trainers do, averaged across processes.
        if not set(self.fastdpo_config.loss_type) & _LOSS_TYPES_BEYOND_TRL:
            return
        for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
            if name in out.metrics:
                log(name, acc.gather_for_metrics(out.metrics[name].detach().reshape(1)).mean().item())
