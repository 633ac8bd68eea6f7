"""Options that travel into the head's custom ops as one frozen (hashable) object, encoded as one string."""

from __future__ import annotations

import ast
import dataclasses
import functools
import numbers
from dataclasses import dataclass


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
        group: the name of the vocabulary-parallel process group (see :mod:`fastdpo._merge`), or None.
        memory: what the forward may keep for the backward, in GiB (see :mod:`fastdpo._fast`): 0 nothing (lean:
            the backward recomputes the logits), ``inf`` everything it needs (fast), else a budget.
    """

    ignore_index: int = -100
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
    def decode(text: str) -> "HeadOptions":
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
    def from_op_args(text: str, *numbers) -> "HeadOptions":
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


@dataclass(frozen=True)
class VocabParallel:
    """This rank's rows ``[start, stop)`` of a vocabulary-parallel (Megatron-style, transformers ``colwise``)
    lm-head.

    Every rank of ``group`` passes the same ``hidden`` and ``labels`` (global token ids) and its own rows of the
    weight (and bias, reference weight and bias); the ranks' ranges must tile the vocabulary ``[0, V)``, in any
    order and with any (uneven) sizes. Every rank gets the same per-token statistics, loss and metrics, the full
    hidden gradient and the gradient of its own rows.

    Collectives per head call: in the forward one all-reduce (max) of the ``[N]`` per-token maxima and one
    all-reduce (sum) of the rescaled per-token statistics (``3`` values per token, ``5 + world size`` with the
    extra metrics, which carry each rank's first argmax in its own slot); in the backward one all-reduce (sum)
    of the fp32 hidden gradient. With ``vocab_size=None`` one more tiny collective per call gathers every
    rank's ``(start, stop)`` and a digest of its labels, checks that the ranges tile ``[0, V)`` and that the
    labels agree, and finds ``V`` (for the label range check and the mean logit); give ``vocab_size`` to skip
    it (and the labels' comparison, which reads them on the host).

    Attributes:
        start: first vocabulary row held by this rank (``>= 0``).
        stop: one past the last row held (``> start``); ``weight.shape[0]`` must be ``stop - start``.
        group: the ``torch.distributed`` process group over which the vocabulary is split; None for the world.
        vocab_size: the whole vocabulary ``V`` (``>= stop``), or None to find it with a collective.
    """

    start: int
    stop: int
    group: object = None
    vocab_size: int | None = None

    def __post_init__(self):
        # NumPy integers are ints too (stored as Python ints, so that the options compare and hash alike).
        for name in ("start", "stop", "vocab_size"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"VocabParallel.{name} must be an int{' or None' if name == 'vocab_size' else ''}, "
                                f"got {value!r}")
            object.__setattr__(self, name, int(value))
        if not 0 <= self.start < self.stop:
            raise ValueError(f"VocabParallel needs 0 <= start < stop, got start={self.start}, stop={self.stop}")
        if self.vocab_size is not None:
            if self.vocab_size < self.stop:
                raise ValueError(f"VocabParallel.vocab_size must be >= stop={self.stop}, got {self.vocab_size}")
        if self.group is not None:
            import torch.distributed as dist

            if not isinstance(self.group, dist.ProcessGroup):
                raise TypeError(f"VocabParallel.group must be a torch.distributed.ProcessGroup or None (the "
                                f"world), got {type(self.group).__name__}")

    @property
    def rows(self) -> int:
        """The number of vocabulary rows held by this rank."""
        return self.stop - self.start
