"""The chunked engine: products over vocabulary chunks of the compacted labelled rows, no ``[N, V]`` tensor.

Each call gathers the labelled rows once (``hidden[idx]``: on CUDA the one host sync of this engine, to learn their
count, as ``h[mask]`` does) and walks the vocabulary in chunks, each chunk in tiles of at most ``CHUNK_ELEMENTS``
(CPU) or ``DEVICE_CHUNK_ELEMENTS`` (GPU) logits. Lean mode, fast mode and a GiB budget are one code path:

- forward: every tile writes its rows' partial statistics record (:mod:`fastdpo._merge`, which combines the
  chunks as it combines the fused kernels' splits); in fast mode the chunks within the budget also keep
  ``e = exp(z − r)`` and the per-row reference ``r`` (``[N·V_keep]`` and ``[kept chunks, N]``).
- backward: every tile becomes ``D = (p − onehot(y))·(1 − tanh²)``, the logit gradient without its per-row factor
  ``a = −g·scale``: recomputed from the product in lean chunks. A kept chunk skips that product and is only read:
  ``p = e·f`` with ``f = exp(r − lse)`` per row, so ``f`` scales the rows that multiply ``e`` (the gathered rows
  for the weight gradient, the product's result for the hidden gradient) and the one-hot rows are subtracted from
  the accumulators (with a softcap, ``p`` goes into a new tile, as ``1 − tanh²`` is per logit). ``a`` multiplies the
  hidden gradient once at the end and is folded into the gathered rows for the weight gradient, so the products
  see ``D`` as it is. Each chunk's weight and bias gradient is complete when its chunk is done and is written once,
  in the parameter's dtype.

Two ways to make a tile:

- the compute dtype (CPU, and fp32/fp64 inputs anywhere): products in fp32 (fp64 for fp64) with the bias and a
  per-row reference (the running logsumexp in the forward, ``lse`` in the backward) folded into them as extra
  columns, so that one ``exp_`` (and in the forward a row sum) is all a tile adds to its product; the first chunk
  takes its statistics from ``softmax`` (one fused pass) and two row maxima, as do the extras and the softcap.
  The target logit and ``Σ z`` come once per call.
- epilogues (CUDA, 16-bit inputs): cuBLAS products of the 16-bit operands with fp32 outputs
  (``torch.mm(..., out_dtype=torch.float32)``), the hidden gradient accumulated in fp32 by the functional
  ``torch.addmm(..., out_dtype=...)``, and the Triton kernels of ``kernels/fastdpo_kernels/chunk_epilogue.py``
  (statistics and kept ``exp(z − m)`` in one pass over each fp32 chunk; ``D`` in place, in the inputs' dtype).
  ``EPILOGUES = True`` routes CPU tensors through the same host code (products upcast to fp32), so that it runs
  under the Triton interpreter.
"""

from __future__ import annotations

import torch

from . import _merge
from ._options import HeadOptions, compute_dtype
from .vocab_parallel import resolve_group

# Logits of one CPU tile (fp32: 16 MiB): few, large ops (a tile adds one or two element-wise passes to its product).
CHUNK_ELEMENTS = 1 << 22
# Logits of one GPU tile (fp32: 128 MiB): as many labelled rows as fit, so the products are large.
DEVICE_CHUNK_ELEMENTS = 1 << 25
# Vocabulary rows of a chunk: at most VOCAB_CHUNK and a sixteenth of the vocabulary, not under MIN_VOCAB_CHUNK (an
# upcast chunk of a 16-bit weight and its fp32 gradient then stay an eighth of the weight's bytes each).
VOCAB_CHUNK = 4096
MIN_VOCAB_CHUNK = 256
# True: take the epilogue path for 16-bit inputs on any device (the interpreter runs the kernels on CPU tensors).
EPILOGUES = False

_HALF = (torch.bfloat16, torch.float16)


def _epilogues(x: torch.Tensor) -> bool:
    return x.dtype in _HALF and (x.is_cuda or EPILOGUES)


def _rows_per_chunk(columns: int, weight_elements: int | None = None, device=None) -> int:
    """Token rows of one ``[rows, columns]`` tile: the tile budget, or V·H/16 for a smaller head (not under 64k
    elements, where the head is too small for its memory to matter)."""
    elements = DEVICE_CHUNK_ELEMENTS if device is not None and torch.device(device).type == "cuda" else CHUNK_ELEMENTS
    if weight_elements is not None:
        elements = min(elements, max(1 << 16, weight_elements // 16))
    return max(1, elements // max(columns, 1))


def _vocab_chunks(vocab: int):
    step = max(1, min(VOCAB_CHUNK, max(MIN_VOCAB_CHUNK, -(-vocab // 16))))
    return [(v0, min(vocab, v0 + step)) for v0 in range(0, vocab, step)]


def _keepable(opts: HeadOptions) -> bool:
    # With a softcap the backward rebuilds tanh from the kept values through the scale.
    return opts.softcap is None or opts.scale != 0


# ---------------------------------------------------------------------------------------------- fast mode sizing


def _kept_dtypes(hidden: torch.Tensor):
    """``(e, r)`` dtypes: 16-bit ``e`` and fp32 ``r`` on the epilogue path, else the compute dtype for both."""
    if _epilogues(hidden):
        return hidden.dtype, torch.float32
    cd = compute_dtype(hidden.dtype)
    return cd, cd


def kept_chunks(N: int, V: int, hidden: torch.Tensor, memory_gib: float) -> int:
    """The leading vocabulary chunks whose ``e`` and ``r`` fit ``memory_gib`` (sized by all ``N`` rows: the labelled
    count is data)."""
    if memory_gib <= 0 or N == 0:
        return 0
    e_dtype, r_dtype = _kept_dtypes(hidden)
    fit = 0
    for k, (_, v1) in enumerate(_vocab_chunks(V), 1):
        if N * v1 * e_dtype.itemsize + k * N * r_dtype.itemsize > memory_gib * 2.0 ** 30:
            break
        fit = k
    return fit


def kept_like(hidden, weight, opts: HeadOptions):
    """Empty ``(e, r)`` shaped as :func:`forward_kept` keeps them (flat ``[N·V_keep]`` and ``[chunks, N]``)."""
    N, V = hidden.shape[0], weight.shape[0]
    k = kept_chunks(N, V, hidden, opts.memory) if _keepable(opts) else 0
    if k == 0:
        return hidden.new_empty(0), hidden.new_empty(0)
    e_dtype, r_dtype = _kept_dtypes(hidden)
    v_keep = _vocab_chunks(V)[k - 1][1]
    return hidden.new_empty(N * v_keep, dtype=e_dtype), hidden.new_empty((k, N), dtype=r_dtype)


# ---------------------------------------------------------------------------------------------- the engine


class _Rows:
    """The labelled rows of one call, gathered once: ``idx`` (positions), ``tgt`` (int64 target ids), ``x``
    (``[n, H]`` in the products' operand dtype)."""

    def __init__(self, hidden, targets, ignore_index, epilogues):
        self.idx = (targets != ignore_index).nonzero().squeeze(1)  # the host sync: n sizes what follows
        self.n = self.idx.numel()
        self.tgt = targets.index_select(0, self.idx).to(torch.int64)
        self.cd = compute_dtype(hidden.dtype)
        self.epilogues = epilogues
        self.x = hidden.index_select(0, self.idx)
        if not epilogues:
            self.x = self.x.to(self.cd)

    def scatter(self, values, N):
        return values.new_zeros(N).index_copy_(0, self.idx, values)


def _mm(a, b):
    """``a @ b`` with fp32 output for 16-bit operands (cuBLAS on CUDA; upcast elsewhere), else in their dtype."""
    if a.dtype in _HALF:
        return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.float() @ b.float()
    return a @ b


def _logit_product(x, w, v0, out=None):
    """The raw logits of a tile: ``x @ w.T`` for the vocabulary chunk from row ``v0``, into ``out`` when given (a
    compute-dtype tile; profilers and tests see the products that fast mode skips by this name)."""
    if out is not None:
        return torch.mm(x, w.t(), out=out)
    return _mm(x, w.t())


def _addmm_(acc, a, b):
    """``acc += a @ b`` for an fp32 (fp64) accumulator, whatever the operands' dtype."""
    if a.dtype in _HALF:
        if a.is_cuda:
            # The functional form: addmm's out= variant with out_dtype misbehaves (pytorch#154086).
            return acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))
        return acc.addmm_(a.float(), b.float())
    return acc.addmm_(a, b)


def _sub_rows_(acc, index, rows):
    """``acc[index[i]] −= rows[i]`` for every ``i``, repeated indices summed in a fixed order (``index_add_``
    adds with atomics on CUDA; the accumulating ``index_put_`` with atomics on a multi-threaded CPU)."""
    if acc.is_cuda:
        acc.index_put_((index,), rows.neg(), accumulate=True)
    else:
        acc.index_add_(0, index, rows, alpha=-1)


def _vocab_walk(chunks, opts, bias):
    """Each vocabulary chunk ``[v0, v1)`` as ``(index, v0, v1, width, first global id, bias slice or None)``."""
    for c, (v0, v1) in enumerate(chunks):
        yield c, v0, v1, v1 - v0, opts.vocab_start + v0, (bias[v0:v1] if bias is not None else None)


def _chunk_operands(weight, v0, v1, epilogues, cd, extra_cols=()):
    """The chunk's weight for the products: a view (16-bit on the epilogue path, a compute-dtype weight), else its
    compute-dtype copy; ``extra_cols`` (``[vc]`` tensors) are appended as columns."""
    w = weight[v0:v1]
    if epilogues:
        return w
    w = w.to(cd)
    if extra_cols:
        w = torch.cat([w] + [c.to(cd).unsqueeze(1) for c in extra_cols], 1)
    return w


def _stat_record(z, local, col0, extras, out, e_out=None, maskable=True, shift=None):
    """A compute-dtype tile's record from one fused softmax and two row maxima. ``z`` are the transformed logits
    minus ``shift`` (per row, None for 0); ``e_out`` receives ``softmax(z)`` (else a scratch tile). Returns the
    reference ``r`` with ``e = exp(z + shift − r)`` (the tile's logsumexp; ``-inf`` for an all ``-inf`` row, whose
    ``e`` is 0). ``maskable``: whether such rows can occur. ``TARGET`` and ``SUM`` are the caller's."""
    m = z.amax(1)
    e = torch.ops.aten._softmax.out(z, 1, False, out=e_out if e_out is not None else torch.empty_like(z))
    masked = torch.isneginf(m)
    # Only a -inf bias (or infinite inputs) makes a row all -inf; a CPU check costs no sync.
    if maskable and (z.is_cuda or bool(masked.any())):
        e.masked_fill_(masked.unsqueeze(1), 0.0)
    s = torch.where(masked, 0.0, e.amax(1).reciprocal())  # Σ exp(z − m) = 1 / max softmax
    if extras:
        # Σ e·z and Σ e² with e = s·softmax; a -inf logit (e = 0) counts as the lowest finite value. Never shifted.
        out[_merge.XSUMEXP] = (z.clamp(min=torch.finfo(z.dtype).min) * e).sum(1) * s
        out[_merge.SQSUMEXP] = e.square().sum(1) * (s * s)
        out[_merge.ARGMAX] = (z.argmax(1) + col0).to(out.dtype)
    if shift is not None:
        m = m + shift
    out[_merge.MAX] = m
    out[_merge.SUMEXP] = s
    return m + torch.log(s)


def _target_logits(x, weight, bias, tgt, vocab_start):
    """``x_t·w_{y_t} (+ b_{y_t})`` of each row in the compute dtype of ``x``, and whether ``y_t`` is one of this
    head's rows (0 where not)."""
    V = weight.shape[0]
    local = tgt - vocab_start
    inside = (local >= 0) & (local < V)
    local = local.clamp(0, V - 1)
    raw = (x * weight.index_select(0, local).to(x.dtype)).sum(1)
    if bias is not None:
        raw += bias.index_select(0, local).to(x.dtype)
    return torch.where(inside, raw, 0.0), inside


def _forward(hidden, weight, bias, targets, opts: HeadOptions, n_keep: int):
    """``(out, e, r)``: the ``[N]`` outputs, and what fast mode keeps for the first ``n_keep`` chunks.

    Compute-dtype tiles without softcap and extras take ``exp(z − r)`` straight from the product, ``r`` the rows'
    running logsumexp over the chunks so far, folded into the product as a column; its sum is the record
    (``MAX = r``). The first chunk, a row whose ``r`` is still ``-inf`` and a tile whose sum overflows take the
    softmax route. Their target logit and ``Σ z`` come once per call (chunk 0's record; the others hold 0).
    """
    N, V = hidden.shape[0], weight.shape[0]
    epi = _epilogues(hidden)
    R = _Rows(hidden, targets, opts.ignore_index, epi)
    n, cd, dev = R.n, R.cd, hidden.device
    chunks = _vocab_chunks(V)
    stats = torch.empty((_merge.N_STATS_EXTRAS if opts.extras else _merge.N_STATS, len(chunks), n),
                        dtype=torch.float32 if epi else cd, device=dev)
    e_dtype, r_dtype = _kept_dtypes(hidden)
    v_keep = chunks[n_keep - 1][1] if n_keep else 0
    kept_e = torch.empty(N * v_keep, dtype=e_dtype, device=dev) if n_keep else hidden.new_empty(0)
    kept_r = torch.empty((n_keep, N), dtype=r_dtype, device=dev) if n_keep else hidden.new_empty(0)
    softcap, scale = opts.softcap, opts.scale
    running = not epi and softcap is None and not opts.extras
    if epi:
        x = R.x
    else:
        raw_t, inside = _target_logits(R.x, weight, bias, R.tgt, opts.vocab_start)
        if softcap is None:
            stats[_merge.TARGET, 0] = raw_t * scale
            # Σ_v z_v of every row at once: the rows times the column sums (without a softcap z is linear).
            colsum = weight.sum(0, dtype=cd)
            stats[_merge.SUM, 0] = R.x @ colsum * scale + (bias.sum(dtype=cd) * scale if bias is not None else 0)
        else:
            stats[_merge.TARGET, 0] = torch.where(inside, torch.tanh(raw_t / softcap) * (softcap * scale), 0.0)
        stats[_merge.TARGET, 1:] = 0
        if softcap is None:
            stats[_merge.SUM, 1:] = 0
        # The scale (or 1/softcap) goes into the gathered rows once; the bias and −r into the products as columns.
        cols = [R.x.mul_(scale if softcap is None else 1.0 / softcap)]
        if bias is not None:
            cols.append(R.x.new_ones(n, 1))
        if running:
            cols.append(R.x.new_zeros(n, 1))
            r_run = torch.full((n,), float("-inf"), dtype=cd, device=dev)
        x = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    for c, v0, v1, vc, col0, b in _vocab_walk(chunks, opts, bias):
        if epi:
            w = _chunk_operands(weight, v0, v1, True, cd)
            b = b.contiguous() if b is not None else None
        else:
            extra = () if b is None else ((b.to(cd) * scale if softcap is None else b.to(cd) / softcap),)
            if running:
                extra += (torch.ones(vc, dtype=cd, device=dev),)
            w = _chunk_operands(weight, v0, v1, False, cd, extra)
        step = _rows_per_chunk(vc, weight.numel(), dev)
        e_chunk = kept_e[N * v0:N * v1].view(N, vc) if c < n_keep else None
        for s in range(0, n, step):
            e = min(n, s + step)
            record = stats[:, c, s:e]
            local = R.tgt[s:e] - col0
            keep = (e_chunk[s:e], kept_r[c, s:e]) if e_chunk is not None else (None, None)
            running_tile = running and c > 0 and not bool(torch.isneginf(r_run[s:e]).any())
            # A running tile's exp(z − r) is its kept e: its product goes straight into the kept tile.
            z = _logit_product(x[s:e], w, v0, out=keep[0] if running_tile else None)
            if epi:
                from .kernels import chunk_epilogue

                chunk_epilogue.chunk_forward(z, b, local, record, softcap=softcap, scale=scale, extras=opts.extras,
                                             keep_e=keep[0], keep_m=keep[1])
                if opts.extras:
                    record[_merge.ARGMAX] += col0
                continue
            shift = None
            if running:
                r = r_run[s:e]
                shift = torch.where(torch.isneginf(r), 0.0, r)
                if running_tile:
                    sums = z.exp_().sum(1)
                    if bool(torch.isfinite(sums).all()):
                        record[_merge.MAX] = r
                        record[_merge.SUMEXP] = sums
                        if keep[1] is not None:
                            keep[1].copy_(r)
                        continue
                    z = _logit_product(x[s:e], w, v0)  # a logit past r + 88: the softmax route
            if softcap is not None:
                z.tanh_().mul_(softcap * scale)
            ref = _stat_record(z, local, col0, opts.extras, record, keep[0], bias is not None or not z.is_cuda,
                               shift)
            if keep[1] is not None:
                keep[1].copy_(ref)
            if softcap is not None:
                record[_merge.SUM] = z.sum(1)
        if running:
            rec = stats[:, c]
            r_run = torch.logaddexp(r_run, rec[_merge.MAX] + torch.log(rec[_merge.SUMEXP]))
            x[:, -1] = torch.where(torch.isneginf(r_run), 0.0, -r_run)
    merged = _merge.merge(stats, opts.vocab_total if opts.vocab_total >= 0 else V, opts.extras, R.tgt,
                          resolve_group(opts.group))
    top1 = merged["argmax"] == R.tgt.to(merged["argmax"].dtype) if opts.extras else None
    out = _merge.token_outputs(merged, opts.extras, lambda v: R.scatter(v, N), top1)
    return out, kept_e, kept_r


def forward(hidden, weight, bias, targets, opts: HeadOptions):
    """Per-token statistics over ``N`` flattened tokens (lean mode).

    Returns ``(out, saved)``: ``out`` maps names to ``[N]`` tensors (0 where ignored), ``saved`` is what
    :func:`backward` needs (the ``[N]`` logsumexp, 0 where ignored; also ``out["lse"]``).
    """
    out, _, _ = _forward(hidden, weight, bias, targets, opts, 0)
    return out, out["lse"]


def forward_kept(hidden, weight, bias, targets, opts: HeadOptions):
    """As :func:`forward`, also keeping what the backward needs for the chunks within ``opts.memory`` GiB:
    ``(out, (e, r))`` (empty tensors when nothing fits)."""
    k = kept_chunks(hidden.shape[0], weight.shape[0], hidden, opts.memory) if _keepable(opts) else 0
    out, e, r = _forward(hidden, weight, bias, targets, opts, k)
    return out, (e, r)


def backward(hidden, weight, bias, targets, saved, grad_logp, opts: HeadOptions, needs, kept=None):
    """Gradients for (hidden, weight, bias) given ``grad_logp [N]``, in their dtypes; None where not needed.

    ``d logp_t / d z_v = onehot(y_t)_v − softmax(z_t)_v``, times the upstream gradient, back through the scale
    and the softcap. ``kept``: the ``(e, r)`` of :func:`forward_kept` (its chunks are not recomputed). For a
    vocabulary-parallel head ``saved`` is the logsumexp over the whole vocabulary and the ranks' hidden gradients
    are summed (one all-reduce of the labelled rows, in fp32/fp64).
    """
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    epi = _epilogues(hidden)
    R = _Rows(hidden, targets, opts.ignore_index, epi)
    n, cd, dev = R.n, R.cd, hidden.device
    acc_dtype = torch.float32 if epi else cd
    softcap, scale = opts.softcap, opts.scale
    lse = saved.index_select(0, R.idx).to(acc_dtype)
    # The logit gradient of row t is a_t·D_t (times a kept chunk's factor), a_t = −g_t·scale.
    a = grad_logp.index_select(0, R.idx).to(acc_dtype).mul_(-scale)
    kept_e, kept_r = kept if kept is not None and kept[0].numel() else (None, None)
    n_keep = kept_r.shape[0] if kept_r is not None else 0
    chunks = _vocab_chunks(V)
    # The rows a_t·x_t for the weight gradient: fp16 holds a_t·x_t / G, G a power of two >= max |a| (exact to
    # multiply back), since a loss scaler's g times the scale can pass fp16's range.
    gscale = None
    if need_w or need_b:
        if epi and hidden.dtype == torch.float16:
            peak = a.abs().amax()
            gscale = torch.where(peak > 0, torch.exp2(torch.ceil(torch.log2(peak))), torch.ones_like(peak))
            a_op = a / gscale
        else:
            a_op = a
        xa = (R.x.to(acc_dtype) * a_op.unsqueeze(1)).to(R.x.dtype)
    if epi:
        x = R.x
    elif softcap is None:
        # z − lse in the products: the gathered rows scaled, with −lse (and 1 for the bias) as extra columns.
        x = torch.cat([R.x * scale, (-lse).unsqueeze(1)] + ([R.x.new_ones(n, 1)] if bias is not None else []), 1)
    else:
        x = R.x / softcap
        if bias is not None:
            x = torch.cat([x, x.new_ones(n, 1)], 1)
    t_target = None
    if softcap is not None and n_keep:
        # tanh at the target, for the one-hot part of the kept chunks: from the exact target logit.
        raw, inside = _target_logits(R.x.to(acc_dtype), weight, bias, R.tgt, opts.vocab_start)
        t_target = torch.where(inside, torch.tanh(raw / softcap), 0.0)
    acc_h = torch.zeros((n, H), dtype=acc_dtype, device=dev) if need_h else None
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.empty(V, dtype=bias.dtype, device=bias.device) if need_b else None
    for c, v0, v1, vc, col0, b in _vocab_walk(chunks, opts, bias):
        if epi:
            w = _chunk_operands(weight, v0, v1, True, cd)
            b = b.contiguous() if b is not None else None
        else:
            extra = () if c < n_keep else (
                (torch.ones(vc, dtype=cd, device=dev),) if softcap is None else ())
            if b is not None and c >= n_keep:
                extra += ((b.to(cd) * scale if softcap is None else b.to(cd) / softcap),)
            w = _chunk_operands(weight, v0, v1, False, cd, extra)
        w_h = w[:, :H]
        gw = torch.zeros((vc, H), dtype=acc_dtype, device=dev) if need_w else None
        gb = torch.zeros(vc, dtype=acc_dtype, device=dev) if need_b else None
        kept_chunk = c < n_keep
        step = _rows_per_chunk(vc, weight.numel(), dev)
        for s in range(0, n, step):
            e = min(n, s + step)
            local = R.tgt[s:e] - col0
            hit = ((local >= 0) & (local < vc)).nonzero().squeeze(1)
            t = None
            if kept_chunk:
                ek = kept_e[N * v0:N * v1].view(N, vc)[s:e]
                r = kept_r[c, s:e].to(acc_dtype)
                factor = torch.where(torch.isneginf(r), 0.0, torch.exp(r - lse[s:e])).unsqueeze(1)
                if softcap is None:
                    # D = f·e − onehot(y), f = exp(r − lse) per row: f scales the products' small operands (or
                    # their result) and the one-hot rows are subtracted from the accumulators, so no pass over the
                    # tile is made and the kept tile stays as it is (it serves a second backward too).
                    cols = local.index_select(0, hit)
                    if need_h:
                        acc_h[s:e].addcmul_(_mm(ek, w_h), factor)
                        _sub_rows_(acc_h[s:e], hit, w_h.index_select(0, cols).to(acc_dtype))
                    if need_w:
                        _addmm_(gw, ek.t(), (xa[s:e].to(acc_dtype) * factor).to(xa.dtype))
                        _sub_rows_(gw, cols, xa[s:e].index_select(0, hit).to(acc_dtype))
                    if need_b:
                        ga = a_op[s:e].unsqueeze(1)
                        _addmm_(gb.unsqueeze(1), ek.t(), (ga * factor).to(xa.dtype))
                        _sub_rows_(gb.unsqueeze(1), cols, ga.index_select(0, hit))
                    continue
                # With a softcap 1 − tanh² is per logit: p = e·exp(r − lse) goes into a new tile (the kept one
                # serves a second backward), and tanh comes from z = r + log e where e > 0 (elsewhere p is 0),
                # exact at the target.
                d = (ek * factor).to(ek.dtype)
                ef = ek.to(acc_dtype)
                t = torch.where(ef > 0, (r.unsqueeze(1) + ef.log()) / (softcap * scale), 0.0)
                t[hit, local[hit]] = t_target[s:e][hit]
            else:
                z = _logit_product(x[s:e], w, v0)
                if epi:
                    from .kernels import chunk_epilogue

                    d = chunk_epilogue.chunk_backward(z, b, local, lse[s:e], hidden.dtype, softcap=softcap,
                                                      scale=scale)
                elif softcap is None:
                    d = z.exp_()
                else:
                    t = z.tanh_()
                    d = torch.mul(t, softcap * scale).sub_(lse[s:e].unsqueeze(1)).exp_()
            if kept_chunk or not epi:
                d.index_put_((hit, local[hit]), d.new_tensor(-1.0), accumulate=True)
                if t is not None:
                    d.mul_(t.square_().neg_().add_(1).to(d.dtype))
            if need_h:
                _addmm_(acc_h[s:e], d, w_h)
            if need_w:
                _addmm_(gw, d.t(), xa[s:e])
            if need_b:
                _addmm_(gb.unsqueeze(1), d.t(), a_op[s:e].unsqueeze(1).to(xa.dtype))
        if gscale is not None:
            gw = gw.mul_(gscale) if need_w else gw
            gb = gb.mul_(gscale) if need_b else gb
        if need_w:
            grad_w[v0:v1] = gw
        if need_b:
            grad_b[v0:v1] = gb
        # Free this chunk's operands and gradients before the next chunk allocates its own.
        del w, w_h, gw, gb
    grad_h = None
    if need_h:
        acc_h.mul_(a.unsqueeze(1))
        # A vocabulary-parallel head sums the ranks' hidden gradients here, once, before the cast.
        _merge.all_reduce_sum(acc_h, resolve_group(opts.group))
        grad_h = torch.zeros((N, H), dtype=hidden.dtype, device=dev).index_copy_(0, R.idx, acc_h.to(hidden.dtype))
    return grad_h, grad_w, grad_b


# ------------------------------------------------------------------------- any per-row function of the logits


def _logits(x, w, b, opts: HeadOptions):
    """Transformed logits of one chunk, and tanh(z/softcap) when softcapping (for the backward); in place where
    possible, so that few ``[rows, columns]`` tiles live at once."""
    z = x @ w.t()
    if b is not None:
        z.add_(b)
    t = None
    if opts.softcap is not None:
        t = torch.tanh(z.div_(opts.softcap))
        z = t * opts.softcap
    return z.mul_(opts.scale), t


def _cast(weight, bias, cd):
    return weight.to(cd), (bias.to(cd) if bias is not None else None)


def chunked_backward(hidden, weight, bias, rows_all, dlogits, opts: HeadOptions, needs, *, logits=None, step=None):
    """Gradients for (hidden, weight, bias) of a sum of per-row functions of the transformed logits.

    Walks ``rows_all`` in chunks of whole rows (the function may need a row's every logit, as TRL's entropy
    gradient does); ``dlogits(z, start, rows)`` returns the function's gradient w.r.t. the chunk's transformed
    logits ``z`` (it may reuse ``z``'s memory unless ``logits`` hands out kept logits), which is taken back through
    the scale and the softcap here. ``logits(x, w, b, start, rows)`` returns the chunk's ``(z, tanh)`` as
    :func:`_logits` does (the default: recomputed); ``step`` is the chunk's row count (default: a ``CHUNK_ELEMENTS``
    tile). Returns the gradients in the compute dtype, None where not needed. Unlike :func:`backward` it upcasts
    the whole weight and sums its gradient over the token chunks in the compute dtype.
    """
    need_h, need_w, need_b = needs
    cd = compute_dtype(hidden.dtype)
    w, b = _cast(weight, bias, cd)
    grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
    step = step or _rows_per_chunk(weight.shape[0])
    for s in range(0, rows_all.numel(), step):
        rows = rows_all[s:s + step]
        x = hidden[rows].to(cd)
        z, t = logits(x, w, b, s, rows) if logits is not None else _logits(x, w, b, opts)
        dz = dlogits(z, s, rows).mul_(opts.scale)
        if t is not None:
            dz.mul_(1 - t * t)
        if need_h:
            grad_h[rows] = dz @ w
        if need_w:
            grad_w.addmm_(dz.t(), x)
        if need_b:
            grad_b += dz.sum(0)
    return grad_h, grad_w, grad_b


