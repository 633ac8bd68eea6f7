"""Checks of a causal-LM batch (``input_ids``, ``labels``, ``attention_mask``) before the backbone sees it, whose own
errors would not name the argument."""

from __future__ import annotations

import torch


def _is_integer_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex
                                                or t.dtype == torch.bool)


def check_inputs(input_ids, labels, attention_mask=None):
    """The batch tensors, checked before the backbone sees them (its own errors would not name the argument)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be a [B, T] tensor, got {got}")
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
