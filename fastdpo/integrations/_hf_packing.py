"""Padding-free batches of a causal LM: a padded batch packed into one row (:func:`pack_batch`), and the checks
that a model computes such a row exactly as its sequences one by one (:func:`check_packable`, with its probe
forward, and :func:`check_packable_config` before loading). See :mod:`fastdpo.integrations.transformers`."""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass

import torch

from .. import _packing
from .._options import IGNORE_INDEX
from ._hf_batch import check_inputs
from ._hf_model import add_hidden_states_forward, backbone_of, text_config, unwrap_causal_lm

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



def completion_layout(device, labels, packed, ignore_index=IGNORE_INDEX):
    """The completion mask on ``device`` in the layout of the per-token statistics (``[B, T-1]`` of the unshifted
    ``labels``, or ``[L]`` of a :class:`PackedBatch`), and the packed offsets (None when padded)."""
    if packed is None:
        return labels[:, 1:].to(device) != ignore_index, None
    return packed.targets.to(device) != ignore_index, packed.cu_seqlens.to(device)

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
    check_inputs(input_ids, labels)
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
    text = text_config(config)
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
    """The largest relative difference (and the dtype of the hidden states) between the backbone's hidden states of
    a few short sequences packed into one row (positions restarting, no attention mask) and of the same sequences run
    one by one.

    Runs ``model(...)`` itself (so that PEFT, DDP, FSDP and DeepSpeed wrappers gather their parameters as for any
    forward) without gradient, in eval mode (no dropout; the modules' modes are restored) and without autocast, on
    the same deterministic tokens on every rank: under FSDP or ZeRO-3 call it on every rank. 0 when the packed
    sequences are isolated and the kernels are exact; about 1 when they attend to each other.
    """
    lm = unwrap_causal_lm(model)
    ids = _probe_tokens(text_config(lm.config).vocab_size, device)
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
    backbone = backbone_of(lm)
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
