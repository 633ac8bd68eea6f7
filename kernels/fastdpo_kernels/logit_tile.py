"""Helpers shared by the forward and backward kernels: a block's labelled rows, and one
``[BLOCK_M tokens, BLOCK_V vocab]`` tile of transformed logits accumulated in fp32 (one code path, so
the forward and the backward's recompute see bit-identical logits).
"""

import triton
import triton.language as tl


@triton.jit
def logit_tile(x_ptr, w_ptr, b_ptr, src_rows, row_mask, cols, col_mask, H, softcap, scale,
               stride_xn, stride_xh, stride_wv, stride_wh,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Returns ``(z, t)``: ``z = scale·softcap·tanh((x·wᵀ + b)/softcap)`` (no cap: ``scale·(x·wᵀ + b)``)
    and ``t = tanh(...)``, which the backward needs for the cap's derivative (``t = z`` without a cap).

    ``src_rows`` are int64 row indices into ``x`` (gathered tokens); ``cols`` int64 vocabulary ids.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + src_rows[:, None] * stride_xn
    w_rows = w_ptr + cols[:, None] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        x = tl.load(x_rows + k[None, :] * stride_xh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :] * stride_wh, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            # The interpreter multiplies bf16 operands wrongly; fp32 operands are exact there.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        t = tanh(acc / softcap)
        acc = softcap * t
    return acc * scale, t


@triton.jit
def tanh(u):
    """``tanh(u)`` in fp32 within ~2e-7 relative for every ``u`` (core Triton has no tanh the interpreter also runs).

    ``2·sigmoid(2u) − 1`` cancels and loses every digit as ``u → 0`` (a large softcap). For ``|u| < 0.625``,
    ``u·q(u²)`` with ``q`` a degree-5 fit of ``tanh(a)/a`` on ``[0, 0.625]`` (relative error 4e-9, below fp32's
    rounding; a Taylor series needs 10 terms there, and registers the fast-mode forward lacks); above,
    ``(1 − e)/(1 + e)`` with ``e = exp(−2|u|) <= 0.29``, which does not cancel. The cap's derivative
    ``1 − t² = (1 − t)(1 + t)`` is then exact to a few units of 1 everywhere (relative precision is lost only
    where it is tiny, ``|u| >> 1``).
    """
    a = tl.abs(u)
    x2 = a * a
    p = -0.005659991220515114
    p = p * x2 + 0.02059099103118161
    p = p * x2 - 0.05372106911836173
    p = p * x2 + 0.13331127554062144
    p = p * x2 - 0.33333260527928926
    p = p * x2 + 0.9999999960753899
    e = tl.exp(-2.0 * a)
    t = tl.where(a < 0.625, a * p, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -t, t)


@triton.jit
def block_rows(rows_ptr, row0, nv, BLOCK_M: tl.constexpr):
    """Positions ``row0 .. row0+BLOCK_M`` of the compacted token list, which of them are labelled
    (``< nv``), and their int64 row indices into the hidden states."""
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < nv
    src = tl.load(rows_ptr + rows, mask=row_mask, other=0)
    return rows, row_mask, src


@triton.jit
def vocab_split(nv, pid_s, n_tiles, min_programs, max_splits, BLOCK_M: tl.constexpr):
    """Vocabulary tiles ``[t0, t1)`` of split ``pid_s`` when the vocabulary is split until the ``cdiv(nv, BLOCK_M)``
    blocks of labelled rows make ``min_programs`` programs (at most ``max_splits``, the grid's second axis).

    Sized from the labelled count ``nv`` read on the device, not from all rows, and without a host sync. A split
    past the last one used gets ``t0 >= t1``: its program writes the neutral record (max -inf, sums 0).
    """
    blocks = tl.cdiv(nv, BLOCK_M)
    splits = tl.minimum(tl.maximum(tl.cdiv(min_programs, blocks), 1), tl.minimum(n_tiles, max_splits))
    per = tl.cdiv(n_tiles, splits)
    t0 = pid_s * per
    return t0, tl.minimum(t0 + per, n_tiles)
