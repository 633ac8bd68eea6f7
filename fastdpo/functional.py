"""The functional API: fused per-token log-probs, sequence log-probs and the DPO loss."""

from __future__ import annotations

from typing import Any

import torch

from . import _packing
from . import _validate as check
from . import head as _head
from . import vocab_parallel as _vp
from ._options import IGNORE_INDEX, Backend, HeadOptions, Memory
from .losses import DPOOutput, LossConfig, compute_dpo_loss
from .vocab_parallel import VocabParallel

__all__ = ["fused_logprobs", "sequence_logprobs", "dpo_loss", "token_stats"]


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX, softcap: float | None = None, logit_scale: float = 1.0,
                temperature: float = 1.0, backend: Backend = "auto", extras: bool = False, check_labels: bool = True,
                names: dict[str, str] | None = None, vocab_parallel: VocabParallel | None = None,
                memory: Memory = "lean") -> dict:
    """Per-token statistics of the fused head, each shaped like ``targets`` and 0 where ignored.

    Returns a dict: ``logp`` (differentiable w.r.t. hidden, weight, bias), ``mean_logit`` and, with
    ``extras=True``, ``entropy``, ``log_sum_sq_probs`` (``log Σ_v p_v²``) and ``is_top1``, all over the whole
    vocabulary also for a vocabulary-parallel head. See :func:`fused_logprobs` for the arguments; ``names``
    renames the arguments in error messages.
    """
    names = names or {}
    hn, wn, tn, bn = (names.get(k, k) for k in ("hidden", "weight", "targets", "bias"))
    vp = _vp.resolve(weight, bias, targets, vocab_parallel, weight_name=wn, bias_name=bn,
                                 labels_name=tn)
    weight, bias = vp.weight, vp.bias
    check.head(hidden, weight, targets, bias, hidden_name=hn, weight_name=wn, targets_name=tn, bias_name=bn)
    ignore_index, softcap, scale = check.head_options(ignore_index, softcap, logit_scale, temperature, backend)
    check.flag("extras", extras)
    check.flag("check_labels", check_labels)
    dtype = check.common_dtype(hidden, weight, hn, wn)
    # Under torch.compile the range check would be a data-dependent guard: it is skipped there.
    vocab = vp.total if vp.group is not None else weight.shape[0]
    if check_labels and not torch.compiler.is_compiling():
        check.label_range(tn, targets, vocab, ignore_index)
    memory = _head.resolve_memory(memory)
    if memory > 0 and vp.group is not None:
        raise ValueError("memory='fast' (or a budget) is single-device: with vocab_parallel use memory='lean'")
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        memory = 0.0  # no backward will read what the forward would keep
    opts = HeadOptions(ignore_index=ignore_index, softcap=softcap, scale=scale, extras=bool(extras),
                       vocab_start=vp.start, vocab_total=vp.total, group=vp.group, memory=memory)
    shape = targets.shape
    H = hidden.shape[-1]
    opts = _head.resolve(opts, backend, hidden.device, dtype, targets.numel(), H, weight.shape[0])
    h2 = hidden.reshape(-1, H).to(dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    outs = _head.head(h2, w, b, check.token_ids(targets).reshape(-1), opts)
    result = {"logp": outs[0].view(shape), "mean_logit": outs[1].view(shape)}
    if extras:
        for name, value in zip(_head.EXTRA_OUTPUTS, outs[2:]):
            result[name] = value.view(shape)
    return result


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, softcap: float | None = None,
                   logit_scale: float = 1.0, temperature: float = 1.0, backend: Backend = "auto",
                   vocab_parallel: VocabParallel | None = None, memory: Memory = "lean") -> torch.Tensor:
    """Per-token log-probabilities of the targets, without materializing the logits.

    ``z = hidden·weightᵀ + bias``; if ``softcap``: ``z = softcap·tanh(z/softcap)``;
    ``z = z·logit_scale/temperature``; ``logp_t = z_t[targets_t] − logsumexp(z_t)``.

    Args:
        hidden: ``[..., H]`` hidden states (bf16, fp16, fp32; fp64 on the torch backend).
        weight: ``[V, H]`` lm-head weight, same dtype as ``hidden``. Under ``torch.autocast`` any float dtypes:
            the head computes in the autocast dtype, as ``F.linear`` would (fp64 inputs are left in fp64).
        targets: integer token ids shaped ``hidden.shape[:-1]``, in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` lm-head bias.
        ignore_index: targets with this value are skipped: never projected, log-prob 0.
        softcap: optional tanh soft-capping of the raw logits (Gemma-2), ``None`` for none.
        logit_scale: multiplier of the (capped) logits (Cohere's ``logit_scale``). Default 1.
        temperature: divisor of the logits. Default 1.
        backend: the engine. ``"auto"``: on CUDA the faster of the two at this shape, measured on the first
            call at a shape bucket and cached on disk (see :mod:`fastdpo.head.auto`; ``FASTDPO_BACKEND`` pins
            one), the chunked engine on CPU. ``"triton"``: the fused Triton kernels (CUDA, or CPU with
            ``TRITON_INTERPRET=1``). ``"torch"``: the chunked engine (products over vocabulary chunks; any
            device and dtype).
        vocab_parallel: a :class:`fastdpo.VocabParallel` when ``weight`` (and ``bias``) are this rank's rows
            ``[start, stop)`` of a head split over the ranks of a process group, which all pass the same
            ``hidden`` and ``targets`` (global token ids); the results are those of the whole head on every
            rank, the hidden gradient is summed over the ranks, the weight gradient is this rank's rows. A
            ``DTensor`` weight sharded on dim 0 over a 1-D mesh is split that way by itself. Default None.
        memory: what the forward keeps for the backward. ``"lean"`` (default): nothing beyond ``O(tokens)``
            statistics; the backward recomputes the logits (5 head-sized matmuls per DPO step with a
            reference). ``"fast"``: every logit tile's ``exp(z − tile max)`` (in the inputs' dtype) and the tile
            maxima (fp32), so the backward skips the recompute (4 matmuls), at about ``2·tokens·V`` bytes for
            16-bit inputs (the torch backend keeps the fp32 logits, ``4·tokens·V``). A float: a budget in GiB; as
            many vocabulary chunks (token chunks on the torch backend) as fit are kept, the rest recomputed.
            Ignored when no gradient is needed; single-device (not with ``vocab_parallel``).

    Returns:
        fp32 (fp64 for fp64 inputs) log-probs shaped like ``targets``, 0 at ignored positions,
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` for any upstream gradient (once: a backward
        through these gradients, i.e. double backward, raises a ``RuntimeError``).

    Under ``torch.compile`` the targets are not range-checked (the check would be a data-dependent guard); an
    out-of-range target then yields a log-prob of NaN. Integer targets narrower than int32 are widened.
    """
    return token_stats(hidden, weight, targets, bias=bias, ignore_index=ignore_index, softcap=softcap,
                       logit_scale=logit_scale, temperature=temperature, backend=backend,
                       vocab_parallel=vocab_parallel, memory=memory)["logp"]


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, average: bool = False,
                      bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, softcap: float | None = None,
                      logit_scale: float = 1.0, temperature: float = 1.0, backend: Backend = "auto",
                      vocab_parallel: VocabParallel | None = None, cu_seqlens: torch.Tensor | None = None,
                      memory: Memory = "lean") -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens: ``π_s = Σ_t mask_st·logp_st``.

    Args:
        hidden: ``[S, T, H]`` hidden states, aligned with ``labels`` (label ``t`` is predicted from state ``t``);
            packed: ``[L, H]`` or ``[1, L, H]`` with ``cu_seqlens``.
        weight: ``[V, H]`` lm-head weight.
        labels: ``[S, T]`` token ids, ``ignore_index`` on prompt and padding; packed: ``[L]`` or ``[1, L]``.
        average: the per-token mean instead of the sum (0 for a sequence without labelled tokens).
        cu_seqlens: ``[S+1]`` int32/int64 offsets of the sequences in a packed stream (flash-attn's varlen
            convention: ``0 = cu[0] <= cu[1] <= ... <= cu[S] = L``). Default None: padded rows.
        Other arguments as in :func:`fused_logprobs`.

    Returns:
        ``[S]`` sequence log-probs. Their backward takes one scalar per sequence to the kernel.
    """
    check.flag("average", average)
    check.same_device(hidden=hidden, weight=weight, labels=labels, bias=bias, cu_seqlens=cu_seqlens)
    offsets = None
    if cu_seqlens is None:
        check.tensor("hidden", hidden, ndim=3)
        check.tensor("labels", labels, ndim=2)
    else:
        hidden = _packing.flatten_packed("hidden", hidden, trailing=1)
        labels = _packing.flatten_packed("labels", labels, trailing=0)
        offsets = _packing.check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    logp = token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                       logit_scale=logit_scale, temperature=temperature, backend=backend,
                       names={"targets": "labels"}, vocab_parallel=vocab_parallel, memory=memory)["logp"]
    seqs = _packing.Sequences(labels, offsets)
    total = seqs.sum(logp)
    if average:
        total = total / seqs.sum(labels != ignore_index).clamp(min=1)
    return total


def loss_config(beta, config, loss_options) -> LossConfig:
    """The one :class:`LossConfig` of a call: ``config``, or one built from ``beta`` (default 0.1) and the keywords.
    ``beta`` may come with a config only if it equals ``config.beta``; loss keywords never may."""
    if config is None:
        return LossConfig(beta=0.1 if beta is None else beta, **loss_options)
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fastdpo.LossConfig, got {type(config).__name__}")
    if loss_options:
        raise ValueError(f"give loss options either in config or as keywords, not both: {sorted(loss_options)}")
    if beta is not None and beta != config.beta:
        raise ValueError(f"beta={beta!r} differs from config.beta={config.beta!r}: give beta in one place "
                         f"(LossConfig(beta=...) or the beta keyword without a config)")
    return config


def dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
             ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
             ref_logps: torch.Tensor | None = None, reference_free: bool = False, beta: float | None = None,
             bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
             softcap: float | None = None, logit_scale: float = 1.0, temperature: float = 1.0,
             backend: Backend = "auto", config: LossConfig | None = None, vocab_parallel: VocabParallel | None = None,
             cu_seqlens: torch.Tensor | None = None, memory: Memory = "lean", **loss_options: Any) -> DPOOutput:
    """The DPO loss computed from hidden states, without materializing the logits.

    ``π_s = Σ_t mask_st·logp_st`` for the policy, ``ρ_s`` the same for the reference;
    ``Δ = (π_c − π_r) − (ρ_c − ρ_r)``; ``loss = −mean_b log σ(β·Δ_b)`` (``loss_type="sigmoid"``).

    Args:
        hidden: ``[2B, T, H]`` policy final hidden states: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.
        weight: ``[V, H]`` policy lm-head weight.
        labels: ``[2B, T]`` token ids aligned with ``hidden``, ``ignore_index`` on prompt and padding.
        ref_hidden: ``[2B, T, H_ref]`` reference hidden states; with ``ref_weight [V, H_ref]`` (which may be
            ``weight`` itself) the reference log-probs are computed in this call, without gradient.
        ref_logps: ``[2B]`` precomputed reference sequence log-probs, in row order.
        reference_free: no reference model (``ρ = 0``). Exactly one of the three reference modes is required,
            except that loss types which never read the reference (simpo, cpo, orpo, sft, alone or mixed
            among themselves) accept none (``ρ = 0``); a reference given to them only enters the rewards metrics.
        beta: the DPO temperature β. Default 0.1, or ``config.beta`` with a config; a ``beta`` that differs
            from ``config.beta`` raises a ``ValueError`` (give it in one place).
        bias, ref_bias: optional ``[V]`` lm-head biases.
        ignore_index, softcap, logit_scale, temperature, backend, vocab_parallel: as in
            :func:`fused_logprobs`, applied to both heads (with ``vocab_parallel``, ``weight``, ``bias``,
            ``ref_weight`` and ``ref_bias`` are this rank's rows; every rank gets the same loss and metrics).
        memory: as in :func:`fused_logprobs`, for the policy's head (the reference head needs no backward).
        config: a :class:`LossConfig`; or give its fields (``loss_type``, ``average_log_prob``, ...) as
            keyword arguments.
        cu_seqlens: padding-free input: ``[2B+1]`` int32/int64 offsets (flash-attn's varlen convention,
            ``0 = cu[0] <= ... <= cu[2B] = L``) of ``2B`` sequences packed back to back, chosen 1..B then rejected
            1..B; ``hidden`` is then ``[L, H]`` (or ``[1, L, H]``), ``labels`` ``[L]`` (or ``[1, L]``) with the
            same alignment, ``ref_hidden`` ``[L, H_ref]``. Gives the padded batch's numbers (to rounding). Under
            ``torch.compile`` the offsets' values are not checked (as the labels' range is not).

    Returns:
        :class:`DPOOutput` with ``loss``, ``chosen_logps``/``rejected_logps`` ``[B]``,
        ``chosen_rewards``/``rejected_rewards`` ``β·(π − ρ)`` and ``metrics`` named as TRL logs them.
    """
    config = loss_config(beta, config, loss_options)
    check.same_device(hidden=hidden, weight=weight, labels=labels, bias=bias, ref_hidden=ref_hidden,
                      ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, cu_seqlens=cu_seqlens)
    labels = check.token_ids(labels) if isinstance(labels, torch.Tensor) else labels
    offsets = None
    if cu_seqlens is not None:
        hidden, labels, ref_hidden, offsets = _packing.packed_dpo_inputs(hidden, labels, ref_hidden, cu_seqlens)
    check.dpo_inputs(hidden, weight, labels, ref_hidden, ref_weight, ref_logps, reference_free, ref_bias,
                     needs_reference=config.needs_reference,
                     packed_rows=None if offsets is None else offsets.numel() - 1)
    head = dict(ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale, temperature=temperature,
                backend=backend)
    if vocab_parallel is not None and ref_hidden is not None:
        # Check the split once for both heads (they share it and the labels).
        vocab_parallel = _vp.with_vocab_size(vocab_parallel, labels)
    stats = token_stats(hidden, weight, labels, bias=bias, names={"targets": "labels"},
                        extras=config.needs_token_extras, vocab_parallel=vocab_parallel, memory=memory, **head)
    ref_token_logps = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_token_logps = token_stats(ref_hidden, ref_weight, labels, bias=ref_bias, check_labels=False,
                                          names={"hidden": "ref_hidden", "weight": "ref_weight",
                                                 "targets": "labels", "bias": "ref_bias"},
                                          vocab_parallel=vocab_parallel, **head)["logp"]
    return compute_dpo_loss(stats, labels != ignore_index, config, ref_token_logps=ref_token_logps,
                            ref_logps=ref_logps, reference_free=reference_free, cu_seqlens=offsets)
