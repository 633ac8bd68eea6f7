"""The Triton backend: compaction of the labelled tokens, kernel launches, merge of the split stats.

No host synchronisation: the labelled tokens are moved to the front by a stable sort and their count
stays on the device, where the kernels read it.
"""

from __future__ import annotations

import torch

from . import _merge
from ._options import IGNORE_INDEX, HeadOptions
from .kernels import autotune, logprob_bwd, logprob_fwd
from .kernels.config import default_config, overridden
from .vocab_parallel import resolve_group


def _config(hidden: torch.Tensor, weight=None, bias=None, opts: HeadOptions | None = None, compacted=None,
            force: bool = False):
    """The kernels' launch config for this call: :mod:`.kernels.config`'s default for the dtype and GPU, or on
    CUDA the one tuned for this call's key (:mod:`.kernels.autotune`).

    With ``compacted`` (``_compact``'s result) a key not tuned yet is tuned now on these tensors; without it (no
    tensors to time: shapes only, tracing) the cached choice or the default is returned. ``force`` tunes again.
    """
    if not hidden.is_cuda:
        return default_config(hidden.dtype, None)
    props = torch.cuda.get_device_properties(hidden.device)
    base = default_config(hidden.dtype, (props.major, props.minor), props.multi_processor_count)
    if weight is None or opts is None or overridden():
        return base
    key = tune_key(props.name, hidden, weight, bias, opts)
    timeable = compacted is not None and not torch.cuda.is_current_stream_capturing() and not _is_fake(hidden)
    measure = _measure(hidden, weight, bias, opts, compacted) if timeable else None
    return autotune.tuned_config(key, base, measure, props.multi_processor_count, force=force,
                                 shared_limit=getattr(props, "shared_memory_per_block_optin", None),
                                 itemsize=hidden.element_size())


def tune_ahead(tokens: int, hidden: int, vocab: int, dtype=torch.bfloat16, *, bias: bool = False, softcap=None,
               extras: bool = False, memory: float = 0.0, device="cuda", force: bool = False):
    """Tune the fused kernels for heads of this shape on ``device`` now (on random inputs with a quarter of the
    tokens ignored, like a prompt) and cache the choice; returns ``(config, cache file)``. ``force`` tunes even
    where a choice is cached. What ``fastdpo tune`` runs."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device (tuning times the kernels on it), got {device}")
    for name, value in (("tokens", tokens), ("hidden", hidden), ("vocab", vocab)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 4.0 / hidden ** 0.5).to(device, dtype)
    b = torch.zeros(vocab, device=device, dtype=dtype) if bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[: tokens // 4] = IGNORE_INDEX
    opts = HeadOptions(backend="triton", softcap=softcap, extras=extras, memory=float(memory))
    config = _config(x, w, b, opts, _compact(targets.to(device), opts.ignore_index), force=force)
    return config, autotune.cache_path(torch.cuda.get_device_properties(device).name)


def tune_key(device_name: str, hidden, weight, bias, opts: HeadOptions) -> autotune.TuneKey:
    """The autotuning key of a call: host-known values only (shapes, dtype, the flags that pick kernels)."""
    return autotune.TuneKey(device_name, str(hidden.dtype).removeprefix("torch."),
                            autotune.token_bucket(hidden.shape[0]), hidden.shape[1], weight.shape[0],
                            bias=bias is not None, softcap=opts.softcap is not None, extras=bool(opts.extras),
                            partial_keep=0 < opts.memory < float("inf"))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _measure(hidden, weight, bias, opts: HeadOptions, compacted):
    """``measure(phase, config) -> ms`` for the autotuner: the forward or the whole lean backward of this call's
    tensors under ``config``. Every trial allocates its own outputs and accumulator (nothing to restore)."""
    rows, tgt, nv, valid = compacted
    bias = _unit_stride(bias)
    tgt = tgt - opts.vocab_start
    time_ms = autotune.timer(hidden.device)
    kw = dict(softcap=opts.softcap, scale=opts.scale)
    upstream = {}

    def forward(cfg):
        return logprob_fwd.logprob_forward(hidden, weight, bias, rows, tgt, nv, extras=opts.extras, config=cfg, **kw)

    def backward_inputs(cfg):
        # A plausible lse and upstream gradient (their values do not change the kernels' work).
        if not upstream:
            stats = forward(cfg).nan_to_num(nan=0.0)
            m = stats[_merge.MAX].amax(0)
            lse = m + torch.log((stats[_merge.SUMEXP] * torch.exp(stats[_merge.MAX] - m)).sum(0))
            ok = valid & lse.isfinite()
            upstream["lse"] = torch.where(ok, lse, torch.zeros_like(lse)).contiguous()
            upstream["g"] = torch.where(ok, torch.full_like(lse, 1.0 / max(1, hidden.shape[0])),
                                        torch.zeros_like(lse)).contiguous()
        return upstream["lse"], upstream["g"]

    def measure(phase, cfg):
        with torch.no_grad():
            if phase == "forward":
                return time_ms(lambda: forward(cfg))
            lse, g = backward_inputs(cfg)
            return time_ms(lambda: logprob_bwd.logprob_backward(hidden, weight, bias, rows, tgt, nv, lse, g,
                                                               needs=(True, True, bias is not None), config=cfg, **kw))
    return measure


def compaction_order(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A permutation of ``0..N-1`` with the labelled rows first, in order (a stable sort, no host sync); the
    forward computes it once and the backward reuses it."""
    return torch.argsort((targets == ignore_index).to(torch.int8), stable=True)


def _compact(targets: torch.Tensor, ignore_index: int, rows=None):
    """``rows``: :func:`compaction_order` (computed unless given); ``tgt`` the targets in that order; ``nv``: the
    labelled count; ``valid``: which of ``rows`` are labelled."""
    mask = targets != ignore_index
    if rows is None:
        rows = compaction_order(targets, ignore_index)
    nv = mask.sum().to(torch.int32).reshape(1)
    tgt = targets.gather(0, rows).to(torch.int64)
    valid = torch.arange(targets.numel(), device=targets.device) < nv
    return rows, tgt, nv, valid


def _unit_stride(bias):
    """The kernels index the bias as ``b_ptr + v`` (no stride argument): an expanded or strided ``[V]`` bias is
    copied (``[V]`` is small); hidden states and weight go with their strides."""
    return bias if bias is None or bias.stride(0) == 1 else bias.contiguous()


def forward(hidden, weight, bias, targets, opts: HeadOptions, launch=None, rows=None):
    """As :func:`fastdpo._torch_backend.forward`: ``(out, saved)`` with ``saved`` the ``[N]`` fp32 logsumexp.

    ``launch`` replaces the forward kernel's launcher (same arguments and record; fast mode's also keeps tiles);
    ``rows`` is :func:`compaction_order` when the caller already has it.
    """
    N = hidden.shape[0]
    bias = _unit_stride(bias)
    rows, tgt, nv, valid = _compact(targets, opts.ignore_index, rows)
    config = _config(hidden, weight, bias, opts, (rows, tgt, nv, valid))
    # A vocabulary-parallel head's rows start at global id vocab_start: the kernels see local ids (a target
    # outside this rank's rows matches no column).
    stats = (launch or logprob_fwd.logprob_forward)(hidden, weight, bias, rows, tgt - opts.vocab_start, nv,
                                                    softcap=opts.softcap, scale=opts.scale, extras=opts.extras,
                                                    config=config)
    if opts.extras and opts.vocab_start:
        stats[_merge.ARGMAX] += opts.vocab_start
    # Columns past nv were never written: where() keeps them (NaN or not) out of the outputs; across ranks
    # their garbage is reduced alike and dropped alike.
    merged = _merge.merge(stats, opts.vocab_total if opts.vocab_total >= 0 else weight.shape[0], opts.extras, tgt,
                          resolve_group(opts.group))

    def scatter(values):
        out = torch.zeros(N, dtype=values.dtype, device=hidden.device)
        return out.index_copy_(0, rows, torch.where(valid, values, torch.zeros_like(values)))

    top1 = valid & (merged["argmax"] == tgt.to(torch.float32)) if opts.extras else None
    out = _merge.token_outputs(merged, opts.extras, scatter, top1)
    return out, out["lse"]


def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs, rows=None):
    """As :func:`fastdpo._torch_backend.backward`; ``rows``: the forward's :func:`compaction_order`, if kept."""
    bias = _unit_stride(bias)
    rows, tgt, nv, valid = _compact(targets, opts.ignore_index, rows)
    config = _config(hidden, weight, bias, opts, (rows, tgt, nv, valid))
    zero = torch.zeros((), device=hidden.device)
    lse = torch.where(valid, saved.to(torch.float32).gather(0, rows), zero)
    g = torch.where(valid, grad_logp.to(torch.float32).gather(0, rows), zero)
    group = resolve_group(opts.group)
    # Across ranks the hidden gradient is summed in fp32, then cast once.
    gh, gw, gb = logprob_bwd.logprob_backward(hidden, weight, bias, rows, tgt - opts.vocab_start, nv,
                                              lse.contiguous(), g.contiguous(), softcap=opts.softcap,
                                              scale=opts.scale, needs=needs, config=config,
                                              grad_x_dtype=torch.float32 if group is not None else None)
    if gh is not None and group is not None:
        gh = _merge.all_reduce_sum(gh, group).to(hidden.dtype)
    return gh, gw, gb
