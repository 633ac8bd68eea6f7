"""Every implementation of the DPO loss step that the benchmarks compare, behind one small interface.

Shared by ``fastdpo bench``, the pytest-benchmark suites and ``benchmarks/gpu_compare.py``. Each adapter turns
the same :class:`DPOInputs` into a scalar sigmoid-DPO loss that is differentiable w.r.t. the policy's hidden
states and lm-head weight, computing the reference log-probs from ``ref_hidden``/``ref_weight`` without gradient
(or none: reference-free). Competitors are imported only when used, so a missing package costs nothing but a row
that says why it was skipped.

Like with like: ``extras=True`` asks an implementation for the per-token statistics TRL's DPOTrainer logs besides
the log-probs (entropy, mean logit, whether the target is the top-1 token): fastdpo through
``extra_metrics=True``, TRL through the outputs its trainer requests. Implementations that cannot produce them
(``supports_extras = False``: naive, Liger, CCE) are compared only without.

Rows:
- ``fastdpo``: :func:`fastdpo.dpo_loss` (Triton kernels on CUDA, the chunked torch path on CPU, or ``backend``),
  ``memory="lean"`` (the backward recomputes the logits).
- ``fastdpo-fast``: the same with ``memory="fast"`` (the forward keeps what the backward needs).
- ``naive``: :func:`fastdpo.reference.reference_dpo_loss`, which materializes the logits.
- ``trl``: TRL's ``ChunkedLogProbFunction`` called as its DPOTrainer calls it (valid tokens only, vocabulary
  tiles of 32768).
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``torch.compile``d on CUDA, eager elsewhere).
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(reduction="none")`` summed per sequence, then DPO (CUDA).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._options import IGNORE_INDEX

__all__ = ["DPOInputs", "Implementation", "IMPLEMENTATIONS", "get_implementations", "dpo_sigmoid", "make_inputs"]

# TRL 1.16's DPOTrainer passes this vocabulary tile width (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE);
# importing that module would pull in the whole trainer stack just to read a constant.
TRL_VOCAB_CHUNK = 32768
# What TRL 1.16's DPOTrainer asks ChunkedLogProbFunction for on the policy (besides the log-probs).
TRL_POLICY_OUTPUTS = ("entropy", "mean_logits", "is_top1")


@dataclass
class DPOInputs:
    """One DPO batch: ``hidden [2B, T, H]`` and ``weight [V, H]`` are leaves that require grad.

    ``ref_hidden``/``ref_weight`` are None for the reference-free case.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None
    beta: float = 0.1
    ignore_index: int = IGNORE_INDEX

    @property
    def has_ref(self) -> bool:
        return self.ref_hidden is not None

    @property
    def valid_tokens(self) -> int:
        return int((self.labels != self.ignore_index).sum())

    def zero_grad(self):
        """Drop the gradients so that the next step allocates (and is charged for) them again."""
        self.hidden.grad = None
        self.weight.grad = None

    def input_bytes(self) -> int:
        ts = [self.hidden, self.weight, self.labels, self.ref_hidden, self.ref_weight]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def work_flops(self) -> int:
        """Useful FLOPs of one step: policy forward 2·Nv·H·V, its backward 4·Nv·H·V, reference forward 2·Nv·H·V.

        Recomputation inside an implementation is not counted: this is the work, not what a design spends on it.
        """
        V, H = self.weight.shape
        per = 2 * self.valid_tokens * H * V
        return per * (3 + (1 if self.has_ref else 0))

    def min_bytes(self) -> int:
        """Bytes any implementation must move once: read the inputs, write grad hidden and grad weight."""
        grads = self.hidden.numel() * self.hidden.element_size() + self.weight.numel() * self.weight.element_size()
        return self.input_bytes() + grads


def make_inputs(pairs: int, seq_len: int, hidden: int, vocab: int, *, dtype=torch.bfloat16, device="cpu",
                with_ref: bool = True, prompt_frac: float = 0.25, logit_std: float = 4.0, beta: float = 0.1,
                seed: int = 0) -> DPOInputs:
    """Random inputs as the benchmark method asks (docs/benchmarks.md, "Method"): logits with a std of about
    ``logit_std``; the first ``prompt_frac`` of every row ignored (a prompt). The reference is a slightly perturbed
    copy of the policy, so the margins are not all zero."""
    for name, v in (("pairs", pairs), ("seq_len", seq_len), ("hidden", hidden), ("vocab", vocab)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 <= prompt_frac < 1:
        raise ValueError(f"prompt_frac must be in [0, 1), got {prompt_frac!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = 2 * pairs
    # Generated on CPU in fp32 for reproducibility across devices, then moved; hidden ~ N(0, 1) and
    # weight ~ N(0, logit_std²/H) give logits of std ≈ logit_std.
    h = torch.randn(rows, seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (logit_std / hidden ** 0.5)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=g)
    labels[:, : int(seq_len * prompt_frac)] = IGNORE_INDEX
    ref_h = ref_w = None
    if with_ref:
        ref_h = (h + 0.1 * torch.randn(h.shape, generator=g)).to(device, dtype)
        ref_w = (w + (0.1 * logit_std / hidden ** 0.5) * torch.randn(w.shape, generator=g)).to(device, dtype)
    return DPOInputs(hidden=h.to(device, dtype).requires_grad_(), weight=w.to(device, dtype).requires_grad_(),
                     labels=labels.to(device), ref_hidden=ref_h, ref_weight=ref_w, beta=beta)


def dpo_sigmoid(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, beta: float) -> torch.Tensor:
    """``−mean log σ(β·((π_c − π_r) − (ρ_c − ρ_r)))`` from ``[2B]`` sequence log-probs (chosen rows first)."""
    B = policy_logps.shape[0] // 2
    delta = policy_logps[:B] - policy_logps[B:]
    if ref_logps is not None:
        delta = delta - (ref_logps[:B] - ref_logps[B:]).to(delta.dtype)
    return -F.logsigmoid(beta * delta).mean()


# fp32 [tokens, V] tensors alive at the naive step's peak: policy logits and log-softmax kept for the backward,
# their two gradients, and the reference's logits and log-softmax (measured: 5.9 copies on a 2-core CPU).
_NAIVE_LOGIT_COPIES = 6


def _grad_bytes(tokens, hidden, vocab, itemsize):
    """The gradients every implementation writes: ``hidden.grad`` and ``weight.grad``."""
    return (tokens + vocab) * hidden * itemsize


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Implementation:
    """One row of the comparison. Subclasses set ``key``, ``label``, ``dist`` and implement :meth:`loss`."""

    key = ""
    label = ""
    dist: str | None = None  # the PyPI distribution whose version is reported
    module: str | None = None  # imported to check availability
    supports_extras = False  # can compute TRL's logged per-token extras (entropy, mean logit, top-1)
    extras = False  # asked for them in this comparison

    @property
    def version(self) -> str | None:
        return _version(self.dist) if self.dist else None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this implementation can run on ``device``/``dtype`` here, else why not (one line)."""
        if self.module is not None:
            try:
                importlib.import_module(self.module)
            except Exception as err:  # an installed but broken package is skipped the same way
                return f"not installed ({self.dist}): {type(err).__name__}: {err}".splitlines()[0][:200]
        return None

    def step_bytes(self, tokens: int, hidden: int, vocab: int, itemsize: int, with_ref: bool) -> int:
        """About how many bytes above the inputs one :meth:`step` peaks at (for the size check made before a run).

        ``tokens`` rows of ``hidden`` features in ``itemsize``-byte floats. The default is the naive head's: an
        implementation whose memory is not modelled is assumed to materialize the logits.
        """
        return _grad_bytes(tokens, hidden, vocab, itemsize) + _NAIVE_LOGIT_COPIES * tokens * vocab * 4

    def loss(self, inp: DPOInputs) -> torch.Tensor:
        raise NotImplementedError

    def step(self, inp: DPOInputs) -> torch.Tensor:
        """Policy forward + backward (and reference forward): the loss step of one training step."""
        loss = self.loss(inp)
        loss.backward()
        return loss.detach()


class FastDPO(Implementation):
    dist = "fastdpo"
    supports_extras = True

    def __init__(self, backend: str = "auto", memory="lean", extras: bool = False):
        self.backend = backend
        self.memory = memory
        self.extras = bool(extras)
        self.key = "fastdpo" if memory == "lean" else "fastdpo-fast" if memory == "fast" else f"fastdpo-{memory}GiB"
        self.label = self.key if backend == "auto" else f"{self.key}[{backend}]"

    def unavailable_reason(self, device, dtype):
        from .. import head

        try:
            if head.check_backend(self.backend) != head.AUTO:  # auto runs everywhere
                head.dispatch(self.backend, 0.0).check(torch.device(device), dtype)
        except (ValueError, TypeError) as err:
            return str(err)
        return None

    def choice(self, inp) -> str:
        """The engine ``backend="auto"`` runs the policy's head on at this shape ("" for a named backend)."""
        from .. import head

        if self.backend != head.AUTO:
            return ""
        opts = head.resolve(head.HeadOptions(memory=head.resolve_memory(self.memory), extras=self.extras), "auto",
                            inp.hidden.device, inp.hidden.dtype, inp.labels.numel(), inp.hidden.shape[-1],
                            inp.weight.shape[0])
        return f"auto: {head.dispatch(opts.backend, opts.memory).label}"

    def step_bytes(self, tokens, hidden, vocab, itemsize, with_ref):
        from .._torch_backend import CHUNK_ELEMENTS

        # fp32 copies/accumulators the size of the weight, and a few logits chunks of the torch path
        # (the Triton path's vocabulary tiles are smaller).
        return (_grad_bytes(tokens, hidden, vocab, itemsize) + 2 * vocab * hidden * 4
                + 6 * min(tokens * vocab, CHUNK_ELEMENTS) * 4)

    def loss(self, inp):
        from ..functional import dpo_loss

        ref = dict(ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight) if inp.has_ref else dict(reference_free=True)
        return dpo_loss(inp.hidden, inp.weight, inp.labels, beta=inp.beta, ignore_index=inp.ignore_index,
                        backend=self.backend, memory=self.memory, extra_metrics=self.extras, **ref).loss


class Naive(Implementation):
    key = "naive"
    label = "naive (logits materialized)"
    dist = "fastdpo"

    def loss(self, inp):
        from ..reference import reference_dpo_loss

        ref = dict(ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight) if inp.has_ref else dict(reference_free=True)
        return reference_dpo_loss(inp.hidden, inp.weight, inp.labels, beta=inp.beta, ignore_index=inp.ignore_index,
                                  **ref).loss


class TRLChunked(Implementation):
    key = "trl"
    label = "TRL ChunkedLogProbFunction"
    dist = "trl"
    module = "trl.kernels.chunked_logprob"
    supports_extras = True

    def __init__(self, extras: bool = False):
        self.extras = bool(extras)

    @staticmethod
    def _seq_logps(hidden, weight, labels, ignore_index, outputs):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        # As TRL's fused head does on Triton devices: project only the valid tokens, scatter back.
        mask = labels != ignore_index
        per_token = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, TRL_VOCAB_CHUNK,
                                                 None, 1.0, outputs)[0]
        return per_token.new_zeros(mask.shape).masked_scatter(mask, per_token).sum(-1)

    def step_bytes(self, tokens, hidden, vocab, itemsize, with_ref):
        # A vocabulary tile of every token at a time, and its outputs' workspaces (measured: 6.3 tiles).
        return _grad_bytes(tokens, hidden, vocab, itemsize) + vocab * hidden * 4 + 7 * tokens * min(
            vocab, TRL_VOCAB_CHUNK) * 4

    def loss(self, inp):
        outputs = TRL_POLICY_OUTPUTS if self.extras else ()
        pol = self._seq_logps(inp.hidden, inp.weight, inp.labels, inp.ignore_index, outputs)
        ref = None
        if inp.has_ref:
            with torch.no_grad():
                ref = self._seq_logps(inp.ref_hidden, inp.ref_weight, inp.labels, inp.ignore_index, ())
        return dpo_sigmoid(pol, ref, inp.beta)


class Liger(Implementation):
    key = "liger"
    label = "Liger LigerFusedLinearDPOLoss"
    dist = "liger-kernel"
    module = "liger_kernel.chunked_loss"

    def __init__(self):
        self._modules = {}

    def loss(self, inp):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # torch.compile is Liger's default and its fast path on GPU; on CPU it would need a C++ toolchain and
        # minutes of compilation, so the CPU rows run Liger eagerly.
        compiled = inp.hidden.device.type == "cuda"
        key = (compiled, inp.has_ref, inp.beta, inp.ignore_index)
        if key not in self._modules:
            self._modules[key] = LigerFusedLinearDPOLoss(ignore_index=inp.ignore_index, beta=inp.beta,
                                                         compiled=compiled, use_ref_model=inp.has_ref)
        out = self._modules[key](inp.weight, inp.hidden, inp.labels, ref_input=inp.ref_hidden,
                                 ref_weight=inp.ref_weight)
        return out[0]


class CCE(Implementation):
    key = "cce"
    label = 'CCE linear_cross_entropy(reduction="none") + DPO'
    dist = "cut-cross-entropy"
    module = "cut_cross_entropy"

    def unavailable_reason(self, device, dtype):
        if torch.device(device).type != "cuda":
            return "CCE's kernels run on CUDA only"
        if dtype not in (torch.bfloat16, torch.float16):
            # CCE 25.1.1 computes its logits in the inputs' dtype with tensor-core kernels meant for 16-bit.
            return f"CCE is benchmarked in bf16/fp16 only, got {dtype}"
        return super().unavailable_reason(device, dtype)

    def step_bytes(self, tokens, hidden, vocab, itemsize, with_ref):
        return _grad_bytes(tokens, hidden, vocab, itemsize) + 2 * vocab * hidden * 4

    @staticmethod
    def _seq_logps(hidden, weight, labels, ignore_index):
        from cut_cross_entropy import linear_cross_entropy

        nll = linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none")
        return -nll.float().sum(-1)

    def loss(self, inp):
        pol = self._seq_logps(inp.hidden, inp.weight, inp.labels, inp.ignore_index)
        ref = None
        if inp.has_ref:
            with torch.no_grad():
                ref = self._seq_logps(inp.ref_hidden, inp.ref_weight, inp.labels, inp.ignore_index)
        return dpo_sigmoid(pol, ref, inp.beta)


IMPLEMENTATIONS = ("fastdpo", "fastdpo-fast", "naive", "trl", "liger", "cce")
_CLASSES = {"naive": Naive, "trl": TRLChunked, "liger": Liger, "cce": CCE}
_FASTDPO_MEMORY = {"fastdpo": "lean", "fastdpo-fast": "fast"}


def get_implementations(keys=IMPLEMENTATIONS, extras: bool = False) -> list[Implementation]:
    """Fresh adapters for ``keys`` (a subset of :data:`IMPLEMENTATIONS`, or ``fastdpo[torch]``- and
    ``fastdpo-fast[triton]``-style names). With ``extras`` every adapter that can is asked for TRL's per-token
    extras; the others are returned as they are (callers comparing like with like leave them out)."""
    out = []
    for key in keys:
        base, _, backend = key.partition("[")
        if base in _FASTDPO_MEMORY and (not backend or backend.endswith("]")):
            out.append(FastDPO(backend[:-1] or "auto", memory=_FASTDPO_MEMORY[base], extras=extras))
        elif key in _CLASSES:
            impl = _CLASSES[key]()
            if extras and impl.supports_extras:
                impl.extras = True
            out.append(impl)
        else:
            raise ValueError(f"unknown implementation {key!r}: choose from {list(IMPLEMENTATIONS)} "
                             f"or fastdpo[auto|torch|triton], fastdpo-fast[auto|torch|triton]")
    return out
