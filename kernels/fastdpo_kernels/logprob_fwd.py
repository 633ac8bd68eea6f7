"""Forward: per-token online-logsumexp statistics of ``x·Wᵀ`` without storing the logits.

Grid ``(token blocks, vocabulary splits)``, the splits sized on the device from the labelled count
(:func:`.logit_tile.vocab_split`). Each program walks its split's vocabulary tiles,
projecting only gathered (labelled) tokens, and writes one partial record per token and split:
running max ``m``, ``Σ exp(z − m)``, the target logit (0 when the target is outside the split),
``Σ z`` and, with ``EXTRAS``, ``Σ exp(z − m)·z``, ``Σ exp(2(z − m))`` and the first argmax: the record
that ``fastdpo._merge`` defines and merges (a few ``[splits, tokens]`` ops on the host). A split whose
logits are all ``-inf`` writes ``m = -inf`` and ``Σ exp = 0``. With ``KEEP`` the same kernel also stores what
fast mode keeps (``kernels/fastdpo_kernels/logprob_fast.py``).
"""

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .logit_tile import block_rows, logit_tile, vocab_split
from .records import ARGMAX as _ARGMAX
from .records import MAX as _MAX
from .records import N_STATS, N_STATS_EXTRAS
from .records import SQSUMEXP as _SQSUMEXP
from .records import SUM as _SUM
from .records import SUMEXP as _SUMEXP
from .records import TARGET as _TARGET
from .records import XSUMEXP as _XSUMEXP

# The kernels read globals only as constexpr.
_ROW_MAX, _ROW_SUMEXP, _ROW_TARGET, _ROW_SUM = (tl.constexpr(i) for i in (_MAX, _SUMEXP, _TARGET, _SUM))
_ROW_XSUMEXP, _ROW_SQSUMEXP, _ROW_ARGMAX = (tl.constexpr(i) for i in (_XSUMEXP, _SQSUMEXP, _ARGMAX))


@triton.jit
def _online_tile(m, s, zt, zsum, sz, s2, amax, z, z_valid, tile_max, cols, tgt, tile, BLOCK_V: tl.constexpr,
                 EXTRAS: tl.constexpr):
    """One logit tile of the online softmax (``z`` with ``-inf`` outside the vocabulary, ``z_valid`` with 0 there):
    the new running max and the record's sums rescaled to it; returns ``(m_new, s, zt, zsum, sz, s2, amax)``."""
    m_new = tl.maximum(m, tile_max)
    # While every logit so far is -inf (a masked vocabulary), subtract 0: exp(-inf - -inf) would be NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref[:, None])
    s = s * alpha + tl.sum(e, axis=1)
    zt, zsum = _target_and_sum(zt, zsum, cols, tgt, z_valid)
    if EXTRAS:
        # p·z → 0 for a masked logit (p = 0, z = -inf): drop the terms whose exp is 0.
        sz = sz * alpha + tl.sum(tl.where(e > 0.0, e * z_valid, 0.0), axis=1)
        s2 = s2 * alpha * alpha + tl.sum(e * e, axis=1)
        amax = _first_argmax(amax, z, tile_max, m, tile, BLOCK_V)
    return m_new, s, zt, zsum, sz, s2, amax


@triton.jit
def _store_record(base, stride_stat, row_mask, m, s, zt, zsum, sz, s2, amax, EXTRAS: tl.constexpr):
    """Writes one split's statistics record (see ``records``) for a block of rows starting at ``base``."""
    tl.store(base + _ROW_MAX * stride_stat, m, mask=row_mask)
    tl.store(base + _ROW_SUMEXP * stride_stat, s, mask=row_mask)
    tl.store(base + _ROW_TARGET * stride_stat, zt, mask=row_mask)
    tl.store(base + _ROW_SUM * stride_stat, zsum, mask=row_mask)
    if EXTRAS:
        tl.store(base + _ROW_XSUMEXP * stride_stat, sz, mask=row_mask)
        tl.store(base + _ROW_SQSUMEXP * stride_stat, s2, mask=row_mask)
        tl.store(base + _ROW_ARGMAX * stride_stat, amax.to(tl.float32), mask=row_mask)


@triton.jit
def _target_and_sum(zt, zsum, cols, tgt, z_valid):
    """Adds a tile's target logit (0 when the target is outside the tile) and its sum of logits."""
    zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z_valid, 0.0), axis=1)
    # Σz also carries any NaN of the inputs, which tl.maximum would drop.
    zsum += tl.sum(z_valid, axis=1)
    return zt, zsum


@triton.jit
def _first_argmax(amax, z, tile_max, m, tile, BLOCK_V: tl.constexpr):
    """The running first argmax after a tile whose row max is ``tile_max`` (``m``: the max before it)."""
    tile_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int64) + tile * BLOCK_V
    # Tiles go left to right, so a strictly greater max keeps the first argmax.
    return tl.where(tile_max > m, tile_arg, amax)


@triton.jit
def _logprob_fwd_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, nv_ptr, stats_ptr, e_ptr, mt_ptr,
    V, H, V_keep, min_programs, max_splits, softcap, scale,
    stride_xn, stride_xh, stride_wv, stride_wh, stride_stat, stride_split, stride_en, stride_mn,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EXTRAS: tl.constexpr, KEEP: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The statistics record of every token and split. With ``KEEP`` (fast mode,
    ``kernels/fastdpo_kernels/logprob_fast.py``)
    each tile's sums are taken relative to the tile's own max and ``e = exp(z − m_tile)``/``m_tile`` are stored
    for the tiles below ``V_keep`` (``e_ptr``, ``mt_ptr``, ``V_keep`` and their strides are read only then).

    The order of the reductions differs per specialization on purpose: it decides which tiles are live at once,
    hence the registers and spills tests/test_kernels_compile.py checks.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    # The number of labelled tokens lives on the device, so the host never waits for it.
    nv = tl.load(nv_ptr).to(tl.int64)
    row0 = pid_m * BLOCK_M
    if row0 >= nv:
        return
    rows, row_mask, src = block_rows(rows_ptr, row0, nv, BLOCK_M)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0).to(tl.int64)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    zt = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    sz = tl.zeros((BLOCK_M,), tl.float32)
    s2 = tl.zeros((BLOCK_M,), tl.float32)
    amax = tl.zeros((BLOCK_M,), tl.int64)
    n_tiles = tl.cdiv(V, BLOCK_V)
    t0, t1 = vocab_split(nv, pid_s, n_tiles, min_programs, max_splits, BLOCK_M)
    for tile in range(t0, t1):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z, _ = logit_tile(x_ptr, w_ptr, b_ptr, src, row_mask, cols, col_mask, H, softcap, scale,
                          stride_xn, stride_xh, stride_wv, stride_wh,
                          HAS_BIAS, HAS_SOFTCAP, DOT_F32, INPUT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        z_valid = tl.where(col_mask[None, :], z, 0.0)
        if KEEP:
            # Every reduction of z first, then e: fewer tiles live at once (with the extras 300 -> 40 spilled bytes
            # on sm_90; without them 24 -> 0 at a real head's specialisation, triton 3.6 and 3.9).
            zt, zsum = _target_and_sum(zt, zsum, cols, tgt, z_valid)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        if KEEP:
            if EXTRAS:
                amax = _first_argmax(amax, z, tile_max, m, tile, BLOCK_V)
            # A tile whose logits are all -inf (a masking bias) keeps e = 0 instead of exp(-inf + inf) = NaN.
            tile_ref = tl.where(tile_max == float("-inf"), 0.0, tile_max)
            e = tl.exp(z - tile_ref[:, None])
            if tile * BLOCK_V < V_keep:
                keep = row_mask[:, None] & (cols < V_keep)[None, :]
                tl.store(e_ptr + rows[:, None] * stride_en + cols[None, :], e.to(e_ptr.dtype.element_ty), mask=keep)
                tl.store(mt_ptr + rows * stride_mn + tile, tile_max, mask=row_mask)
        if KEEP:
            m_new = tl.maximum(m, tile_max)
            # While every logit so far is -inf (a masked vocabulary), subtract 0: exp(-inf - -inf) would be NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            beta = tl.exp(tile_ref - m_ref)
            s = s * alpha + tl.sum(e, axis=1) * beta
            if EXTRAS:
                # p·z → 0 for a masked logit (e = 0, z = -inf), as in the lean branch.
                sz = sz * alpha + tl.sum(tl.where(e > 0.0, e * z_valid, 0.0), axis=1) * beta
                s2 = s2 * alpha * alpha + tl.sum(e * e, axis=1) * beta * beta
        else:
            m_new, s, zt, zsum, sz, s2, amax = _online_tile(m, s, zt, zsum, sz, s2, amax, z, z_valid, tile_max, cols,
                                                            tgt, tile, BLOCK_V, EXTRAS)
        m = m_new

    _store_record(stats_ptr + pid_s * stride_split + rows, stride_stat, row_mask, m, s, zt, zsum, sz, s2, amax, EXTRAS)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch for matmuls (off by default: exact fp32); 16-bit inputs
    keep Triton's default, which does not change their products."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot_in_fp32(x: torch.Tensor) -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret) and x.dtype == torch.bfloat16


def max_splits(N: int, n_tiles: int, config: KernelConfig) -> int:
    """The grid's vocabulary-split axis: enough for :func:`.logit_tile.vocab_split` to make ``min_programs`` work
    when as few as N/8 rows are labelled (with fewer, fewer programs work). The splits a batch does not use
    write neutral records, a few bytes each."""
    rows = max(1, N // 8)
    return max(1, min(n_tiles, triton.cdiv(config.min_programs, triton.cdiv(rows, config.fwd_block_m))))


def logprob_forward(x, weight, bias, rows, targets, nv, *, softcap, scale, extras, config: KernelConfig,
                    kept=None):
    """Launch the forward.

    Args:
        x: ``[N, H]`` hidden states (any strides). weight: ``[V, H]``. bias: ``[V]`` or None.
        rows: ``[N]`` int64, the labelled rows of ``x`` first (only the first ``nv`` are read).
        targets: ``[N]`` int64 target of each entry of ``rows``.
        nv: one-element int32 device tensor, the number of labelled rows.
        kept: a :class:`.logprob_fast.Kept` to fill as well (fast mode), or None.

    Returns:
        ``stats [n_stats, splits, N]`` fp32; columns ``>= nv`` are not written.
    """
    N, H = x.shape
    V = weight.shape[0]
    bm, bv = config.fwd_block_m, config.fwd_block_v
    if kept is not None and bv != kept.fwd_block_v:
        raise ValueError(f"kept tiles were laid out for fwd_block_v={kept.fwd_block_v}, config has {bv}")
    n_tiles = triton.cdiv(V, bv)
    token_blocks = triton.cdiv(N, bm)
    n_stats = N_STATS_EXTRAS if extras else N_STATS
    if token_blocks == 0:
        return torch.empty((n_stats, 1, 0), dtype=torch.float32, device=x.device)
    splits = max_splits(N, n_tiles, config)
    stats = torch.empty((n_stats, splits, N), dtype=torch.float32, device=x.device)
    # Without kept tiles the KEEP-only arguments are never read: any pointer and zeros do.
    e, m_tile = (kept.e, kept.m_tile) if kept is not None else (stats, stats)
    v_keep, stride_en, stride_mn = (kept.v_keep, e.stride(0), m_tile.stride(0)) if kept is not None else (0, 0, 0)
    _logprob_fwd_kernel[(token_blocks, splits)](
        x, weight, bias if bias is not None else weight, rows, targets, nv, stats, e, m_tile,
        V, H, v_keep, config.min_programs, splits, float(softcap or 1.0), float(scale),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stats.stride(0), stats.stride(1),
        stride_en, stride_mn,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, EXTRAS=bool(extras), KEEP=kept is not None,
        DOT_F32=dot_in_fp32(x), INPUT_PRECISION=input_precision(x.dtype),
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=config.fwd_block_k,
        num_warps=config.fwd_warps, num_stages=config.fwd_stages,
    )
    return stats
