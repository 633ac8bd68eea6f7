"""Options that travel into the head's custom ops as one frozen (hashable) object, encoded as one string."""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch

#: The engine names a user may pass as ``backend`` (``"auto"`` measures and picks; see :mod:`fastdpo.head`).
Backend = Literal["auto", "triton", "torch"]
#: ``memory=``: ``"lean"`` keeps nothing for the backward, ``"fast"`` keeps the logits' exponentials, a number is a
#: budget in GiB for them.
Memory = Literal["lean", "fast"] | float

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's softmax runs in for inputs of ``dtype``: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: The label of a position that is skipped (prompt, padding): PyTorch's and transformers' convention.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class HeadOptions:
    """How the lm-head logits are transformed and which per-token statistics are produced.

    ``z = h·Wᵀ + bias``; if ``softcap``: ``z = softcap·tanh(z/softcap)``; then ``z = z·scale``
    where ``scale = logit_scale / temperature``.

    Attributes:
        ignore_index: label value of positions that are skipped (no projection, log-prob 0).
        softcap: tanh soft-capping of the raw logits (Gemma-2's ``final_logit_softcapping``), or None.
        scale: ``logit_scale / temperature``, applied after the softcap.
        backend: the resolved engine's backend name (see :mod:`fastdpo.head`), never ``"auto"``.
        extras: also compute the entropy, ``log Σ_v p_v²`` and whether the target is the argmax.
        vocab_start: the global id of the weight's first row (vocabulary-parallel head; 0 otherwise).
        vocab_total: the whole vocabulary ``V`` (the weight's rows unless vocabulary-parallel; -1 for that).
        group: the name of the vocabulary-parallel process group (see :mod:`fastdpo.vocab_parallel`), or None.
        memory: what the forward may keep for the backward, in GiB (see :mod:`fastdpo._fast`): 0 nothing (lean:
            the backward recomputes the logits), ``inf`` everything it needs (fast), else a budget.
    """

    ignore_index: int = IGNORE_INDEX
    softcap: float | None = None
    scale: float = 1.0
    backend: str = "torch"
    extras: bool = False
    vocab_start: int = 0
    vocab_total: int = -1
    group: str | None = None
    memory: float = 0.0

    def encode(self) -> str:
        """The options as one canonical string (``name=value;...``), which a custom op takes as a primitive
        argument and :meth:`decode` turns back into the equal object. Plain string formatting, so that
        ``torch.compile`` traces it into a constant; ``group`` (a free-form name) comes last."""
        return ";".join(f"{f.name}={_encode_value(getattr(self, f.name))}" for f in _FIELDS)

    @staticmethod
    def decode(text: str) -> HeadOptions:
        """The options :meth:`encode` wrote (cached: a step decodes the same few strings again and again)."""
        return _decode(text)

    def op_args(self) -> tuple:
        """The options as the head ops take them: the string of the fields that fix the engine and the graph
        (:meth:`encode` without the numbers), then ``ignore_index, softcap, scale, memory`` as
        numbers of their own. Under ``torch.compile`` those numbers may be symbolic (a value that changed between
        calls, ``dynamic=True``), and a symbolic number cannot be written into a string."""
        static = ";".join(f"{f.name}={_encode_value(getattr(self, f.name))}" for f in _STATIC_FIELDS)
        return (static, *(getattr(self, name) for name in _NUMBERS))

    @staticmethod
    def from_op_args(text: str, *numbers) -> HeadOptions:
        """The options :meth:`op_args` gave."""
        return HeadOptions(**_decode_fields(text, _STATIC_FIELDS), **dict(zip(_NUMBERS, numbers, strict=True)))


def _encode_value(value) -> str:
    # float() also fixes a traced (symbolic) float to its value, so that the string is a constant.
    if isinstance(value, float):
        return repr(float(value))
    return repr(value)


_PARSERS = {"int": int, "float": float, "bool": lambda v: {"True": True, "False": False}[v],
            "str": ast.literal_eval}


def _parse(annotation: str, value: str):
    kind, _, optional = annotation.partition(" | ")
    if optional == "None" and value == "None":
        return None
    return _PARSERS[kind](value)


_NUMBERS = ("ignore_index", "softcap", "scale", "memory")
_FIELDS = tuple(sorted(dataclasses.fields(HeadOptions), key=lambda f: f.name == "group"))
_STATIC_FIELDS = tuple(f for f in _FIELDS if f.name not in _NUMBERS)


@functools.lru_cache(maxsize=256)
def _decode_fields(text: str, fields: tuple) -> dict:
    parts = text.split(";", len(fields) - 1)
    values = {}
    try:
        for f, part in zip(fields, parts, strict=True):
            name, _, value = part.partition("=")
            if name != f.name:
                raise ValueError(f"expected field {f.name!r}, got {name!r}")
            values[name] = _parse(f.type, value)
    except (ValueError, KeyError, SyntaxError) as err:
        raise ValueError(f"options: not an encoding of HeadOptions: {text!r} ({err})") from None
    return values


def _decode(text: str) -> HeadOptions:
    return HeadOptions(**_decode_fields(text, _FIELDS))
