"""Fast mode (``memory="fast"`` or a GiB budget): the forward keeps, for the first ``V_keep`` vocabulary columns,
each logit tile's ``e = exp(z − m_tile)`` in the inputs' dtype and ``m_tile`` (the tile's row max) in fp32, so
that the backward gets ``p = e·exp(m_tile − lse)`` without recomputing the logits: one head-sized matmul
fewer per step. ``e ∈ [0, 1]`` has the relative precision of its dtype (2⁻⁹ in bf16), which the gradient
keeps; storing the logits themselves in bf16 would not (in a float64 simulation the gradient's relative error
was 2.3e-5 with ``e`` in bf16, 5.9e-3 with the logits in bf16; docs/design.md, "Memory modes").

Layout: ``e [N, V_keep_padded]`` indexed by the position in the compacted token list (labelled rows first) and
the vocabulary id, ``m_tile [N, ceil(V_keep / fwd_block_v)]``. The backward turns each kept chunk of ``e``
into the logit gradient (an elementwise pass into lean mode's ``[N, vocab_chunk]`` workspace, through the hook of
:func:`.logprob_bwd.logprob_backward`, whose grad-weight and grad-hidden GEMMs then run as in lean mode); chunks
past ``V_keep`` are recomputed as in lean mode. ``e`` is only read, so a second backward finds it intact.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .logprob_bwd import logprob_backward

# Rows of e are padded to this many elements so that every row starts 16-byte aligned (vector loads, TMA strides).
ROW_PAD = 8


@triton.jit
def _dlogits_from_kept_kernel(
    e_ptr, mt_ptr, tgt_ptr, nv_ptr, lse_ptr, g_ptr, zt_ptr, dz_ptr,
    v0, vc, softcap, scale,
    stride_en, stride_mn, stride_dzn,
    HAS_SOFTCAP: tl.constexpr, FWD_BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``dZ = g·(onehot(y) − e·exp(m_tile − lse))·scale·(1 − tanh²)`` for one kept chunk, elementwise.

    ``e_ptr`` points at the chunk's first column of ``e``, ``dz_ptr`` at the workspace. With a softcap, ``tanh`` comes
    from ``z = m_tile + log e`` (only where ``e > 0``: elsewhere ``p`` is 0 and so is the term) and, at the target,
    from its exact logit ``zt``.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    nv = tl.load(nv_ptr).to(tl.int64)
    row0 = pid_m * BLOCK_M
    if row0 >= nv:
        return
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < nv
    # Columns stay 32-bit (a vocabulary is < 2^31); only the row offsets need 64 bits.
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    local_mask = local < vc
    cols = v0 + local
    mask = row_mask[:, None] & local_mask[None, :]
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    e_rows = e_ptr + rows * stride_en
    e = tl.load(e_rows[:, None] + local[None, :], mask=mask, other=0.0).to(tl.float32)
    mt = tl.load((mt_ptr + rows * stride_mn)[:, None] + (cols // FWD_BLOCK_V)[None, :], mask=mask, other=0.0)
    p = e * tl.exp(mt - lse[:, None])
    hit = cols[None, :] == tgt[:, None]
    dz = g[:, None] * (hit.to(tl.float32) - p) * scale
    if HAS_SOFTCAP:
        zt = tl.load(zt_ptr + rows, mask=row_mask, other=0.0)
        z = tl.where(hit, zt[:, None], mt + tl.log(tl.maximum(e, 1e-38)))
        t = z / (softcap * scale)
        # (1 − t)(1 + t): 1 − t is exact for t near 1, where 1 − t² would round t² first.
        dz = dz * tl.where(hit | (e > 0), (1.0 - t) * (1.0 + t), 1.0)
    tl.store((dz_ptr + rows * stride_dzn)[:, None] + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


@dataclass
class Kept:
    """What the fast forward keeps: ``e [N, >= V_keep]`` in the inputs' dtype and ``m_tile [N, tiles]`` in fp32."""

    e: torch.Tensor
    m_tile: torch.Tensor
    v_keep: int
    fwd_block_v: int


def kept_bytes(N: int, v_keep: int, dtype: torch.dtype, config: KernelConfig) -> int:
    """Bytes :func:`allocate_kept` takes for ``v_keep`` columns of ``N`` rows."""
    return N * (triton.cdiv(v_keep, ROW_PAD) * ROW_PAD * dtype.itemsize + triton.cdiv(v_keep, config.fwd_block_v) * 4)


def keep_columns(N: int, V: int, dtype: torch.dtype, budget_bytes: float, config: KernelConfig) -> int:
    """How many leading vocabulary columns to keep within ``budget_bytes``: all ``V``, or a multiple of the
    backward's vocabulary chunk (a chunk is kept whole or recomputed whole)."""
    if N == 0 or budget_bytes <= 0:
        return 0
    if budget_bytes >= kept_bytes(N, V, dtype, config):
        return V
    chunk = min(config.vocab_chunk, V)
    cols = (min(V, int(budget_bytes // (N * dtype.itemsize))) // chunk) * chunk
    while cols > 0 and kept_bytes(N, cols, dtype, config) > budget_bytes:
        cols -= chunk
    return cols


def kept_shapes(N: int, v_keep: int, dtype: torch.dtype, config: KernelConfig):
    """``((shape, dtype) of e, (shape, dtype) of m_tile)`` for ``v_keep`` kept columns of ``N`` rows."""
    width = triton.cdiv(v_keep, ROW_PAD) * ROW_PAD
    return ((N, width), dtype), ((N, triton.cdiv(v_keep, config.fwd_block_v)), torch.float32)


def allocate_kept(N: int, v_keep: int, dtype: torch.dtype, device, config: KernelConfig) -> Kept:
    (e_shape, e_dtype), (m_shape, m_dtype) = kept_shapes(N, v_keep, dtype, config)
    return Kept(torch.empty(e_shape, dtype=e_dtype, device=device), torch.empty(m_shape, dtype=m_dtype, device=device),
                v_keep, config.fwd_block_v)


def logprob_backward_kept(x, weight, bias, rows, targets, nv, lse, grad, zt, kept: Kept, *, softcap, scale,
                          needs, config: KernelConfig):
    """The backward of :func:`.logprob_bwd.logprob_backward` (same arguments and results) where the chunks below
    ``kept.v_keep`` come from ``kept`` and the rest are recomputed: lean mode's chunk loop with a hook.

    ``zt [N]`` fp32: each entry's transformed target logit (read only with a softcap).
    """
    cfg = config

    def from_kept(v0, vc, g, dz):
        if v0 + vc > kept.v_keep:
            return False
        e = kept.e[:, v0:]
        grid = (triton.cdiv(x.shape[0], cfg.kept_block_m), triton.cdiv(vc, cfg.kept_block_v))
        _dlogits_from_kept_kernel[grid](
            e, kept.m_tile, targets, nv, lse, g, zt, dz,
            v0, vc, float(softcap or 1.0), float(scale),
            e.stride(0), kept.m_tile.stride(0), dz.stride(0),
            HAS_SOFTCAP=softcap is not None, FWD_BLOCK_V=kept.fwd_block_v,
            BLOCK_M=cfg.kept_block_m, BLOCK_V=cfg.kept_block_v, num_warps=cfg.kept_warps,
        )
        return True

    return logprob_backward(x, weight, bias, rows, targets, nv, lse, grad, softcap=softcap, scale=scale,
                            needs=needs, config=config, kept_chunk=from_kept)
