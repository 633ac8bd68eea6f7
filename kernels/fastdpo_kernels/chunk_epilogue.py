"""Epilogues of the chunked engine: one pass over an fp32 chunk of raw logits ``x·Wᵀ`` that cuBLAS computed
(``[rows, vc]``, one vocabulary chunk of the compacted labelled rows), applying the bias, the softcap and the scale
on the fly.

- :func:`chunk_forward`: the chunk's partial statistics record (the layout of :mod:`.logprob_fwd`, which the shared
  merge combines) and, in fast mode, what the backward keeps: ``e = exp(z − m)`` in the inputs' dtype and the chunk's
  row max ``m`` in fp32.
- :func:`chunk_backward`: ``D = (exp(z − lse) − onehot(y))·(1 − tanh²)``, the logit gradient without its per-row
  factor ``−g·scale`` (applied by the engine outside the products), written in place over the fp32 chunk in the
  inputs' dtype. ``|D| ≤ 1``, so fp16 holds it without rescaling.
"""

import torch
import triton
import triton.language as tl

from .logprob_fwd import _online_tile, _store_record
from .records import N_STATS, N_STATS_EXTRAS

BLOCK_M, BLOCK_V = 16, 128


@triton.jit
def _transformed(z_ptr, b_ptr, rows, row_mask, cols, col_mask, stride_zn, softcap, scale,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(z, t)`` of one tile: ``z = scale·softcap·tanh((x·wᵀ + b)/softcap)`` (without a cap
    ``scale·(x·wᵀ + b)``),
    ``t`` the tanh (``t = z`` without a cap), as :func:`.logit_tile.logit_tile` transforms its product."""
    acc = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0
        acc = softcap * t
    return acc * scale, t


@triton.jit
def _chunk_fwd_kernel(
    z_ptr, b_ptr, tgt_ptr, stats_ptr, e_ptr, m_ptr,
    n, vc, softcap, scale, stride_zn, stride_stat, stride_en,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EXTRAS: tl.constexpr, KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n
    # Chunk-local target ids: one outside [0, vc) matches no column.
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    zt = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    sz = tl.zeros((BLOCK_M,), tl.float32)
    s2 = tl.zeros((BLOCK_M,), tl.float32)
    amax = tl.zeros((BLOCK_M,), tl.int64)
    for tile in range(0, tl.cdiv(vc, BLOCK_V)):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < vc
        z, _ = _transformed(z_ptr, b_ptr, rows, row_mask, cols, col_mask, stride_zn, softcap, scale,
                            HAS_BIAS, HAS_SOFTCAP)
        z_valid = tl.where(col_mask[None, :], z, 0.0)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        m, s, zt, zsum, sz, s2, amax = _online_tile(m, s, zt, zsum, sz, s2, amax, z, z_valid, tile_max, cols, tgt,
                                                    tile, BLOCK_V, EXTRAS)
    _store_record(stats_ptr + rows, stride_stat, row_mask, m, s, zt, zsum, sz, s2, amax, EXTRAS)
    if KEEP:
        # A second pass, relative to the chunk's max: e ∈ [0, 1] with its largest entry 1, so fp16 keeps
        # the probabilities' relative precision. An all -inf row keeps e = 0.
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        tl.store(m_ptr + rows, m, mask=row_mask)
        for tile in range(0, tl.cdiv(vc, BLOCK_V)):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < vc
            z, _ = _transformed(z_ptr, b_ptr, rows, row_mask, cols, col_mask, stride_zn, softcap, scale,
                                HAS_BIAS, HAS_SOFTCAP)
            e = tl.exp(z - m_ref[:, None])
            tl.store(e_ptr + rows[:, None] * stride_en + cols[None, :], e.to(e_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _chunk_bwd_kernel(
    z_ptr, d_ptr, b_ptr, tgt_ptr, lse_ptr,
    n, vc, softcap, scale, stride_zn, stride_dn,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    # Left to right over whole rows: the 16-bit store of a tile only overwrites fp32 columns this program
    # has already loaded (in place, each row's D in the first half of its own bytes).
    for tile in range(0, tl.cdiv(vc, BLOCK_V)):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < vc
        z, t = _transformed(z_ptr, b_ptr, rows, row_mask, cols, col_mask, stride_zn, softcap, scale,
                            HAS_BIAS, HAS_SOFTCAP)
        d = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        if HAS_SOFTCAP:
            d = d * (1.0 - t * t)
        tl.store(d_ptr + rows[:, None] * stride_dn + cols[None, :], d.to(d_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


def _check_chunk(z, targets, bias):
    if z.dim() != 2 or z.dtype != torch.float32 or z.stride(1) != 1:
        raise ValueError(f"z must be a row-major [rows, vc] float32 chunk, got {tuple(z.shape)} {z.dtype} "
                         f"strides {z.stride()}")
    if targets.shape != (z.shape[0],):
        raise ValueError(f"targets must be [{z.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and (bias.shape != (z.shape[1],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a unit-stride [{z.shape[1]}] slice, got {tuple(bias.shape)}")


def chunk_forward(z, bias, targets, stats, *, softcap, scale, extras, keep_e=None, keep_m=None):
    """Write one chunk's partial statistics record.

    Args:
        z: ``[rows, vc]`` fp32 raw logits ``x·Wᵀ`` of the chunk (row-major, any row stride).
        bias: the chunk's ``[vc]`` bias slice or None. targets: ``[rows]`` int64 chunk-local target ids.
        stats: ``[n_stats, rows]`` fp32 view (unit stride along rows) receiving the record; ``ARGMAX`` holds the
            chunk-local id of the first maximum.
        keep_e, keep_m: fast mode's ``[rows, vc]`` 16-bit (or fp32) ``exp(z − m)`` and ``[rows]`` fp32 ``m``
            (unit stride), or None.
    """
    _check_chunk(z, targets, bias)
    rows, vc = z.shape
    if stats.shape != (N_STATS_EXTRAS if extras else N_STATS, rows) or stats.stride(1) != 1:
        raise ValueError(f"stats must be a unit-stride [n_stats, {rows}] view, got {tuple(stats.shape)}")
    keep = keep_e is not None
    if keep and (keep_e.shape != z.shape or keep_e.stride(1) != 1 or keep_m.shape != (rows,)
                 or keep_m.stride(0) != 1):
        raise ValueError("keep_e must be a row-major [rows, vc] tensor and keep_m a unit-stride [rows] one")
    if rows == 0:
        return stats
    _chunk_fwd_kernel[(triton.cdiv(rows, BLOCK_M),)](
        z, bias if bias is not None else z, targets, stats, keep_e if keep else z, keep_m if keep else z,
        rows, vc, float(softcap or 1.0), float(scale), z.stride(0), stats.stride(0),
        keep_e.stride(0) if keep else 0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, EXTRAS=bool(extras), KEEP=keep,
        BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V,
    )
    return stats


def chunk_backward(z, bias, targets, lse, dtype, *, softcap, scale):
    """``D = (exp(z − lse) − onehot)·(1 − tanh²)`` of one chunk in ``dtype`` (16-bit: in place over ``z``'s
    memory, row stride twice ``z``'s; fp32: over ``z`` itself). Returns the ``[rows, vc]`` view.

    ``z``: contiguous ``[rows, vc]`` fp32 raw logits; ``lse``: ``[rows]`` fp32 logsumexp over the whole vocabulary;
    ``targets``: ``[rows]`` int64 chunk-local ids.
    """
    _check_chunk(z, targets, bias)
    if not z.is_contiguous():
        raise ValueError("z must be contiguous: D is written over its memory")
    rows, vc = z.shape
    if dtype == torch.float32:
        d = z
    elif dtype in (torch.bfloat16, torch.float16):
        d = z.view(dtype)[:, :vc]  # row stride 2·vc: each row's D over the first half of its own fp32 bytes
    else:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if rows:
        _chunk_bwd_kernel[(triton.cdiv(rows, BLOCK_M),)](
            z, d, bias if bias is not None else z, targets, lse.contiguous(),
            rows, vc, float(softcap or 1.0), float(scale), z.stride(0), d.stride(0),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V,
        )
    return d
