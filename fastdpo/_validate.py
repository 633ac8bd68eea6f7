"""Argument checks: bad input gets a ValueError/TypeError naming the argument, never a device assert."""

from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(name, t, *, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def flag(name, value):
    """A bool option: a string like ``"False"`` is truthy, so only a real bool is accepted."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def token_ids(labels):
    """Labels of any integer dtype as the int32/int64 the backends index with (int8/int16/uint8 are widened);
    other dtypes pass unchanged, for :func:`head` to reject with a named error."""
    d = labels.dtype
    if d in INDEX_DTYPES or d.is_floating_point or d.is_complex or d == torch.bool:
        return labels
    return labels.to(torch.int64)


def is_real(value) -> bool:
    """A real number (Python or NumPy scalar), not a bool: ``True`` is an int to Python but never meant as one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite(value) -> bool:
    """``math.isfinite`` of a real number as two comparisons, which ``torch.compile`` turns into guards on a
    symbolic float (``math.isfinite`` of one ends the graph)."""
    return -math.inf < value < math.inf


def integer(name, value) -> int:
    """An integer option (Python or NumPy scalar, not a bool) as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def number(name, value, *, positive=False, allow_none=False, low=None, high=None, low_open=False,
           high_open=False):
    """A finite real option (Python or NumPy scalar, not a bool) as a Python float, within ``[low, high]`` (an
    open end with ``low_open``/``high_open``; ``positive`` is ``low=0, low_open=True``); None passes with
    ``allow_none``. TypeError for a non-number, ValueError naming the bound it breaks."""
    if value is None and allow_none:
        return None
    if not is_real(value) or not finite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if positive:
        low, low_open = 0, True
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return float(value)


def head_options(ignore_index, softcap, logit_scale, temperature, backend_name):
    """The head's scalar options as ``(ignore_index, softcap, scale)`` Python numbers, ``scale`` =
    ``logit_scale / temperature``; checked where they are given (a module checks them when built)."""
    ignore_index = integer("ignore_index", ignore_index)
    softcap = number("softcap", softcap, positive=True, allow_none=True)
    scale = number("logit_scale", logit_scale) / number("temperature", temperature, positive=True)
    if not finite(scale):
        raise ValueError(f"logit_scale / temperature must be finite, got {logit_scale!r} / {temperature!r} = {scale}")
    from .head import check_backend  # the head imports this module

    check_backend(backend_name)
    return ignore_index, softcap, scale


def one_device(*named):
    """``(name, tensor or None)`` pairs must share one device; else a ValueError that names the tensors off the
    device most of them are on (all of them when no device has a majority)."""
    given = [(name, t) for name, t in named if t is not None]
    devices = [t.device for _, t in given]
    if len(set(devices)) <= 1:
        return
    counts = {d: devices.count(d) for d in devices}
    top = max(counts.values())
    majority = [d for d, k in counts.items() if k == top]
    if len(majority) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in given)
        raise ValueError(f"{', '.join(name for name, _ in given)} must be on one device, got {listing}")
    odd = [(name, t) for name, t in given if t.device != majority[0]]
    rest = [name for name, t in given if t.device == majority[0]]
    raise ValueError(f"{', '.join(name for name, _ in odd)} must be on one device with {', '.join(rest)} "
                     f"({majority[0]}), got {', '.join(f'{name} on {t.device}' for name, t in odd)}")



def same_device(**tensors):
    """First of all checks, so that the message names the tensors off the device most of them share (arguments
    that are not tensors get their own error later)."""
    one_device(*((name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor)))

def head(hidden, weight, targets, bias, *, hidden_name="hidden", weight_name="weight", targets_name="targets",
         bias_name="bias"):
    """Check one head's tensors; ``targets`` must be shaped like ``hidden.shape[:-1]``."""
    tensor(hidden_name, hidden)
    tensor(weight_name, weight, ndim=2)
    tensor(targets_name, targets)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{hidden_name} must be a floating tensor (bf16, fp16, fp32, fp64), got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{weight_name} must be a floating tensor (bf16, fp16, fp32, fp64), got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{weight_name} must be [V, H] with V >= 1 tokens and H >= 1 features, got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: {hidden_name} has shape {tuple(hidden.shape)} but "
                         f"{weight_name} has shape {tuple(weight.shape)}; expected {hidden_name}[..., H] with "
                         f"{weight_name} [V, H]")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{targets_name} must be an integer tensor of token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{targets_name} must have shape {tuple(hidden.shape[:-1])} (that of {hidden_name} "
                         f"without its last dimension), got {tuple(targets.shape)}")
    if bias is not None:
        tensor(bias_name, bias, ndim=1)
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{bias_name} must be a floating tensor (bf16, fp16, fp32, fp64), got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have shape [{weight.shape[0]}] (the vocabulary of {weight_name}), "
                             f"got {tuple(bias.shape)}")
    one_device((hidden_name, hidden), (weight_name, weight), (targets_name, targets), (bias_name, bias))


def label_range(name, labels, vocab, ignore_index):
    """Labels must be in [0, vocab) or ``ignore_index``.

    On GPU tensors this is the one host synchronisation of a call; ``FASTDPO_CHECK_LABELS=0`` skips
    it there (an out-of-range label then yields a log-prob of NaN).
    """
    if labels.device.type == "meta":
        return  # no values to check: shapes only (the fake implementation runs there)
    if labels.device.type != "cpu" and os.environ.get("FASTDPO_CHECK_LABELS", "1") == "0":
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.numel() and bool(bad.any()):
        example = int(labels[bad].flatten()[0])
        raise ValueError(f"{name} must hold token ids in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"found {example}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device_type`` where it is on there, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): never under autocast
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def common_dtype(hidden, weight, hidden_name="hidden", weight_name="weight"):
    """The dtype the head computes in: under ``torch.autocast`` the autocast dtype, as ``F.linear`` (the lm-head
    stock TRL and transformers run) would cast to (fp64 inputs excepted, which autocast leaves alone); otherwise
    the inputs' own, which must then agree."""
    autocast = autocast_dtype(hidden.device.type)
    if autocast is not None and torch.float64 not in (hidden.dtype, weight.dtype):
        return autocast
    if hidden.dtype == weight.dtype:
        return hidden.dtype
    raise TypeError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have one dtype "
                    f"(or run under torch.autocast)")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --- the DPO loss's inputs ------------------------------------------------------------------------------------

def dpo_inputs(hidden, weight, labels, ref_hidden, ref_weight, ref_logps, reference_free, ref_bias,
               needs_reference=True, packed_rows=None):
    """The tensors of :func:`fastdpo.dpo_loss` and its one reference. ``packed_rows``: the number of sequences of a
    packed batch, whose layout :func:`fastdpo._packing.packed_dpo_inputs` has checked; None for the padded
    ``[2B, T, H]`` layout checked here."""
    tensor("hidden", hidden)
    tensor("weight", weight, ndim=2)
    tensor("labels", labels)
    flag("reference_free", reference_free)
    if packed_rows is None:
        _padded_dpo_layout(hidden, labels)
    rows = hidden.shape[0] if packed_rows is None else packed_rows
    _one_reference(ref_hidden, ref_weight, ref_logps, reference_free, ref_bias, needs_reference)
    if ref_hidden is not None:
        _reference_head(hidden, weight, ref_hidden, ref_weight, packed=packed_rows is not None)
    if ref_logps is not None:
        reference_logps(ref_logps, rows)


def _padded_dpo_layout(hidden, labels):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [2B, T, H] (chosen rows then rejected rows), got shape {tuple(hidden.shape)}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels must be [2B, T] = {tuple(hidden.shape[:2])} to match hidden, got "
                         f"{tuple(labels.shape)}")
    rows = hidden.shape[0]
    if rows == 0 or hidden.shape[1] == 0:
        raise ValueError(f"empty batch: hidden has shape {tuple(hidden.shape)}; need at least one pair and one token")
    if rows % 2:
        raise ValueError(f"hidden must hold an even number of rows (B chosen then B rejected), got {rows}")


def _one_reference(ref_hidden, ref_weight, ref_logps, reference_free, ref_bias, needs_reference):
    """Exactly one of the three reference modes (or none, for loss types that never read the reference)."""
    given = [name for name, v in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps)) if v is not None]
    if reference_free:
        given.append("reference_free=True")
    if ref_weight is not None and ref_hidden is None:
        raise ValueError("ref_weight was given without ref_hidden: pass both, or neither")
    if ref_bias is not None and ref_hidden is None:
        raise ValueError("ref_bias was given without ref_hidden: pass it with ref_hidden and ref_weight")
    if ref_hidden is not None and ref_weight is None:
        raise ValueError("ref_hidden was given without ref_weight: pass the reference lm-head weight [V, H] "
                         "(it may be the policy's weight tensor itself)")
    one_reference(given, needs_reference, "ref_hidden with ref_weight, or precomputed ref_logps [2B], or "
                  "reference_free=True (only the loss types simpo, cpo, orpo, sft need none)")


def one_reference(given: list[str], needed: bool, modes: str) -> None:
    """At most one reference mode among ``given`` (the names of those passed), and one if ``needed``; ``modes``
    says what may be passed."""
    if len(given) > 1:
        raise ValueError(f"give exactly one reference, got {' and '.join(given)}; pass {modes}")
    if not given and needed:
        raise ValueError(f"no reference: give exactly one reference: pass {modes}")


def _reference_head(hidden, weight, ref_hidden, ref_weight, packed):
    tensor("ref_hidden", ref_hidden)
    tensor("ref_weight", ref_weight, ndim=2)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must cover the policy's vocabulary of {weight.shape[0]} tokens: "
                         f"expected [{weight.shape[0]}, H_ref], got {tuple(ref_weight.shape)}")
    if not packed and (ref_hidden.dim() != 3 or tuple(ref_hidden.shape[:2]) != tuple(hidden.shape[:2])):
        raise ValueError(f"ref_hidden must be [2B, T, H_ref] with 2B, T = {tuple(hidden.shape[:2])}, got "
                         f"{tuple(ref_hidden.shape)}")


def reference_logps(ref_logps, rows: int) -> None:
    """``ref_logps`` is a floating ``[rows]`` tensor (chosen then rejected); a named error otherwise."""
    tensor("ref_logps", ref_logps)
    if tuple(ref_logps.shape) != (rows,):
        raise ValueError(f"ref_logps must be [2B] = [{rows}] (chosen then rejected), got {tuple(ref_logps.shape)}")
    if not ref_logps.dtype.is_floating_point:
        raise TypeError(f"ref_logps must be a floating tensor, got {ref_logps.dtype}")
