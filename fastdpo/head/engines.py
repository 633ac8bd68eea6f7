"""The engines behind the head and the one dispatch: a backend name and a memory mode give an :class:`Engine`.

An engine computes, for ``N`` flattened tokens, the per-token statistics of ``z = transform(hidden·weightᵀ + bias)``
(its forward) and the gradients of ``Σ_t grad_logp_t·logp_t`` (its backward). A forward that walks the vocabulary
in pieces writes per-token partial records and combines them with the one merge, :func:`fastdpo._merge.merge`
(the chunked engine's fast mode today reduces whole rows of kept token chunks instead). Two backends, each in two
memory modes:

- ``"triton"``, the fused engine: Triton kernels, the logits never leave registers (CUDA; CPU under
  ``TRITON_INTERPRET=1``); :mod:`fastdpo._triton_backend`, fast mode in :mod:`fastdpo._fast`.
- ``"torch"``, the chunked engine: matrix products over vocabulary chunks of the labelled rows, any device and
  dtype; :mod:`fastdpo._torch_backend` (lean and fast mode).

Lean mode (``memory == 0``) keeps per-token statistics only and the backward recomputes the logits; fast mode
(``memory > 0``: infinite, or a budget in GiB) keeps what fits for the backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _fast, _torch_backend
from .._options import HeadOptions
from .._validate import FLOAT_DTYPES, TRITON_DTYPES, interpreting

AUTO = "auto"


class Saved(NamedTuple):
    """What the forward hands the backward (through the custom op's outputs and autograd's context).

    Attributes:
        lse: ``[N]`` logsumexp of the transformed logits (over the whole head when vocabulary-parallel).
        logp: ``[N]`` log-probs of the targets.
        kept_a, kept_b: what fast mode kept (``[0]`` in lean mode or when nothing fitted).
        order: the forward's compaction of the labelled rows, reused by the backward (``[0]`` if the engine
            keeps none).
    """

    lse: Tensor
    logp: Tensor
    kept_a: Tensor
    kept_b: Tensor
    order: Tensor


class Engine:
    """One way to compute the head. Subclasses implement :meth:`forward`, :meth:`backward` and the shapes of
    what the forward keeps; :func:`dispatch` picks the instance.

    Attributes:
        backend: the backend name users pass (``backend=``, ``FASTDPO_BACKEND``).
        label: the engine's name in benchmarks (``fused``, ``chunked``; ``-fast`` in fast mode).
        keeps: whether the forward keeps logits for the backward (fast mode).
    """

    backend: str = ""
    label: str = ""
    keeps: bool = False

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError/TypeError (naming ``backend``) unless this engine runs tensors of ``dtype`` on
        ``device``."""

    def forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                opts: HeadOptions) -> tuple[dict, tuple[Tensor, Tensor], Tensor]:
        """``(out, kept, order)``: ``out`` maps ``logp``, ``mean_logit``, ``lse`` (and with ``opts.extras``
        ``entropy``, ``log_sum_sq_probs``, ``is_top1``) to ``[N]`` tensors, 0 where ``targets`` is ignored;
        ``kept`` and ``order`` as in :class:`Saved`. ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``
        already carry the compute dtype."""
        raise NotImplementedError

    def backward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, saved: Saved,
                 grad_logp: Tensor, opts: HeadOptions, needs: tuple[bool, bool, bool]) -> tuple:
        """Gradients for ``(hidden, weight, bias)`` of ``Σ_t grad_logp_t·logp_t`` in their dtypes, None where
        ``needs`` says not needed. With a vocabulary-parallel group the hidden gradient is summed over its ranks."""
        raise NotImplementedError

    def kept_like(self, hidden: Tensor, weight: Tensor, opts: HeadOptions) -> tuple[Tensor, Tensor]:
        """Empty tensors shaped like the forward's ``kept`` (for the custom op's fake implementation: shapes
        from ``N``, ``V``, dtype and options, never from the data)."""
        return hidden.new_empty(0), hidden.new_empty(0)

    def order_like(self, targets: Tensor) -> Tensor:
        """An empty tensor shaped like the forward's ``order``."""
        return targets.new_empty(0, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"<fastdpo engine {self.label}>"


class _Chunked(Engine):
    backend, label = "torch", "chunked"

    def check(self, device, dtype):
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"backend='torch' computes floating inputs, got {dtype}")

    def forward(self, hidden, weight, bias, targets, opts):
        out, _ = _torch_backend.forward(hidden, weight, bias, targets, opts)
        return out, (hidden.new_empty(0), hidden.new_empty(0)), self.order_like(targets)

    def backward(self, hidden, weight, bias, targets, saved, grad_logp, opts, needs):
        return _torch_backend.backward(hidden, weight, bias, targets, saved.lse, grad_logp, opts, needs)


class _ChunkedKeep(_Chunked):
    label, keeps = "chunked-fast", True

    def forward(self, hidden, weight, bias, targets, opts):
        out, kept = _torch_backend.forward_kept(hidden, weight, bias, targets, opts)
        return out, kept, self.order_like(targets)

    def backward(self, hidden, weight, bias, targets, saved, grad_logp, opts, needs):
        return _torch_backend.backward(hidden, weight, bias, targets, saved.lse, grad_logp, opts, needs,
                                    kept=(saved.kept_a, saved.kept_b))

    def kept_like(self, hidden, weight, opts):
        return _torch_backend.kept_like(hidden, weight, opts)


class _Fused(Engine):
    backend, label = "triton", "fused"

    def check(self, device, dtype):
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("backend='triton' needs the triton package, which is not installed") from err
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                             f"got tensors on {device}: use backend='torch' or 'auto'")
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' computes bf16, fp16 and fp32 inputs, got {dtype}; "
                            f"use backend='torch' for {dtype}")

    @staticmethod
    def _backend():
        from .. import _triton_backend  # imports the kernels: only when the fused engine runs

        return _triton_backend

    def forward(self, hidden, weight, bias, targets, opts):
        backend = self._backend()
        order = backend.compaction_order(targets, opts.ignore_index)
        out, _ = backend.forward(hidden, weight, bias, targets, opts, rows=order)
        return out, (hidden.new_empty(0), hidden.new_empty(0)), order

    def backward(self, hidden, weight, bias, targets, saved, grad_logp, opts, needs):
        return self._backend().backward(hidden, weight, bias, targets, saved.lse, grad_logp, opts, needs,
                                     rows=saved.order)

    def order_like(self, targets):
        return targets.new_empty(targets.shape[0], dtype=torch.int64)


class _FusedKeep(_Fused):
    label, keeps = "fused-fast", True

    def forward(self, hidden, weight, bias, targets, opts):
        order = self._backend().compaction_order(targets, opts.ignore_index)
        out, kept = _fast._triton_forward(hidden, weight, bias, targets, opts, rows=order)
        return out, kept, order

    def backward(self, hidden, weight, bias, targets, saved, grad_logp, opts, needs):
        return _fast._triton_backward(hidden, weight, bias, targets, saved.lse, grad_logp, opts, needs, saved.logp,
                                      saved.kept_a, saved.kept_b, rows=saved.order)

    def kept_like(self, hidden, weight, opts):
        return _fast._triton_kept_like(hidden, weight, opts)


# backend name -> (lean engine, fast engine). The one list of backends: names are checked against it.
ENGINES = {e[0].backend: e for e in ((_Fused(), _FusedKeep()), (_Chunked(), _ChunkedKeep()))}
BACKENDS = (AUTO, *ENGINES)


def check_backend(name, argument: str = "backend") -> str:
    """``name`` if it is a backend name (``"auto"`` or an engine's), else ValueError naming ``argument`` and the
    choices."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {list(BACKENDS)}, got {name!r}")
    return name


def dispatch(backend: str, memory: float) -> Engine:
    """The engine of a resolved backend name (not ``"auto"``, see :func:`fastdpo.head.resolve`) in the memory mode
    of ``memory`` (0: lean; > 0: fast, infinite or a budget in GiB)."""
    try:
        lean, fast = ENGINES[backend]
    except KeyError:
        raise ValueError(f"backend must be one of {list(ENGINES)} here (resolve 'auto' first), got "
                         f"{backend!r}") from None
    return fast if memory > 0 else lean
