"""Backward: exact gradients of the per-token log-probs, one vocabulary chunk at a time.

For each chunk of ``vocab_chunk`` columns:
1. ``_dlogits_kernel`` recomputes the chunk's logit tiles (same code as the forward) and writes
   ``dZ = g·(onehot(y) − exp(z − lse))·scale·(1 − tanh²)`` for the labelled tokens into a bounded
   workspace ``[N, vocab_chunk]`` in the compute dtype (for fp16, ``dZ / G`` with ``G`` a power of two that
   keeps it within fp16's range; the GEMMs below multiply ``G`` back);
2. ``_grad_weight_kernel`` reduces ``dZᵀ·X`` over all labelled tokens in registers (fp32) and writes
   the chunk's rows of the weight (and bias) gradient once, in the parameter dtype: no ``[V, H]`` fp32
   buffer;
3. ``_grad_hidden_kernel`` adds ``dZ·W_chunk`` into an fp32 accumulator (the output itself on the
   last or only chunk).
No atomics, a fixed reduction order: the same inputs give bit-identical gradients.
"""

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .logit_tile import block_rows, logit_tile
from .logprob_fwd import dot_in_fp32, input_precision


@triton.jit
def _dlogits_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, nv_ptr, lse_ptr, g_ptr, dz_ptr,
    H, v0, vc, softcap, scale,
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dzn,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    nv = tl.load(nv_ptr).to(tl.int64)
    row0 = pid_m * BLOCK_M
    if row0 >= nv:
        return
    rows, row_mask, src = block_rows(rows_ptr, row0, nv, BLOCK_M)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    local_mask = local < vc
    cols = v0 + local
    z, t = logit_tile(x_ptr, w_ptr, b_ptr, src, row_mask, cols, local_mask, H, softcap, scale,
                      stride_xn, stride_xh, stride_wv, stride_wh,
                      HAS_BIAS, HAS_SOFTCAP, DOT_F32, INPUT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - p) * scale
    if HAS_SOFTCAP:
        # (1 − t)(1 + t): no rounding of t² first.
        dz = dz * ((1.0 - t) * (1.0 + t))
    ptrs = dz_ptr + rows[:, None] * stride_dzn + local[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & local_mask[None, :])


@triton.jit
def _grad_weight_kernel(
    dz_ptr, x_ptr, rows_ptr, nv_ptr, gw_ptr, gb_ptr, gscale_ptr,
    H, v0, vc,
    stride_dzn, stride_xn, stride_xh, stride_gwv, stride_gwh,
    HAS_BIAS: tl.constexpr, RESCALE: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_v = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    nv = tl.load(nv_ptr).to(tl.int64)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    local_mask = local < vc
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_V, BLOCK_H), tl.float32)
    bsum = tl.zeros((BLOCK_V,), tl.float32)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, nv, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < nv
        src = tl.load(rows_ptr + k, mask=k_mask, other=0)
        dz = tl.load(dz_ptr + k[:, None] * stride_dzn + local[None, :],
                     mask=k_mask[:, None] & local_mask[None, :], other=0.0)
        x = tl.load(x_ptr + src[:, None] * stride_xn + hs[None, :] * stride_xh,
                    mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        if DOT_F32:
            dz = dz.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dz), x, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bsum += tl.sum(dz.to(tl.float32), axis=0)
    if RESCALE:
        # The workspace holds dZ / G (see logprob_backward); G is a power of two, so this is exact.
        gscale = tl.load(gscale_ptr)
        acc = acc * gscale
        bsum = bsum * gscale
    cols = v0 + local
    tl.store(gw_ptr + cols[:, None] * stride_gwv + hs[None, :] * stride_gwh, acc.to(gw_ptr.dtype.element_ty),
             mask=local_mask[:, None] & h_mask[None, :])
    if HAS_BIAS:
        if pid_h == 0:
            tl.store(gb_ptr + cols, bsum.to(gb_ptr.dtype.element_ty), mask=local_mask)


@triton.jit
def _grad_hidden_kernel(
    dz_ptr, w_ptr, rows_ptr, nv_ptr, acc_ptr, out_ptr, gscale_ptr,
    H, v0, vc,
    stride_dzn, stride_wv, stride_wh, stride_accn, stride_outn,
    FIRST: tl.constexpr, LAST: tl.constexpr, RESCALE: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    nv = tl.load(nv_ptr).to(tl.int64)
    row0 = pid_m * BLOCK_M
    if row0 >= nv:
        return
    rows, row_mask, src = block_rows(rows_ptr, row0, nv, BLOCK_M)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, vc, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < vc
        dz = tl.load(dz_ptr + rows[:, None] * stride_dzn + k[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + (v0 + k)[:, None] * stride_wv + hs[None, :] * stride_wh,
                    mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        if DOT_F32:
            dz = dz.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dz, w, acc, input_precision=INPUT_PRECISION)
    if RESCALE:
        acc = acc * tl.load(gscale_ptr)
    mask = row_mask[:, None] & h_mask[None, :]
    if not FIRST:
        acc += tl.load(acc_ptr + src[:, None] * stride_accn + hs[None, :], mask=mask, other=0.0)
    if LAST:
        tl.store(out_ptr + src[:, None] * stride_outn + hs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + src[:, None] * stride_accn + hs[None, :], acc, mask=mask)


def logprob_backward(x, weight, bias, rows, targets, nv, lse, grad, *, softcap, scale, needs,
                     config: KernelConfig, grad_x_dtype=None, kept_chunk=None):
    """Launch the backward.

    Args:
        x, weight, bias, rows, targets, nv: as in :func:`logprob_forward`.
        lse: ``[N]`` fp32 logsumexp of each entry of ``rows`` (first ``nv`` valid).
        grad: ``[N]`` fp32 upstream gradient of each entry's log-prob.
        needs: which of (hidden, weight, bias) gradients to produce.
        grad_x_dtype: the dtype of ``grad_x`` (default ``x.dtype``; fp32 for a sum over ranks).
        kept_chunk: fast mode's hook (:mod:`.logprob_fast`), ``(v0, vc, grad, dz) -> bool``: fills the workspace
            ``dz`` with the logit gradient of columns ``v0 .. v0+vc`` from what the forward kept, and says so,
            instead of the recompute. ``grad`` is the upstream gradient as the recompute would read it.

    Returns:
        ``(grad_x [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)`` in the inputs'
        dtypes (``grad_x`` in ``grad_x_dtype``); rows of ``grad_x`` that are not labelled are 0.
    """
    need_x, need_w, need_b = needs
    N, H = x.shape
    V = weight.shape[0]
    dev = x.device
    cfg = config
    flags = dict(DOT_F32=dot_in_fp32(x), INPUT_PRECISION=input_precision(x.dtype))
    grad_x = torch.zeros((N, H), dtype=grad_x_dtype or x.dtype, device=dev) if need_x else None
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.empty((V,), dtype=bias.dtype, device=dev) if need_b else None
    if N == 0:
        return (grad_x, grad_w.zero_() if need_w else None, grad_b.zero_() if need_b else None)
    chunk = min(cfg.vocab_chunk, V)
    n_chunks = triton.cdiv(V, chunk)
    # Across several chunks the hidden gradient is summed in fp32; the output is that buffer for fp32.
    acc = None
    if need_x and n_chunks > 1:
        acc = grad_x if grad_x.dtype == torch.float32 else torch.empty((N, H), dtype=torch.float32, device=dev)
    # fp16 tops out at 65504, and a loss scaler's upstream gradient (65536) times the logit gradient passes it
    # while the true gradients are small. For fp16 the workspace holds dZ / G, G a power of two >= max|g·scale|
    # (so |dZ / G| <= 1), and the GEMMs multiply G back in fp32. bf16 and fp32 have fp32's range: unchanged.
    rescale = x.dtype == torch.float16
    gscale = grad
    if rescale:
        peak = grad.abs().amax() * abs(float(scale))
        gscale = torch.where(peak > 0, torch.exp2(torch.ceil(torch.log2(peak))), torch.ones_like(peak)).reshape(1)
        grad = grad / gscale
    dz = torch.empty((N, chunk), dtype=x.dtype, device=dev)
    for c in range(n_chunks):
        v0 = c * chunk
        vc = min(chunk, V - v0)
        if kept_chunk is None or not kept_chunk(v0, vc, grad, dz):
            _dlogits_kernel[(triton.cdiv(N, cfg.dlogits_block_m), triton.cdiv(vc, cfg.dlogits_block_v))](
                x, weight, bias if bias is not None else weight, rows, targets, nv, lse, grad, dz,
                H, v0, vc, float(softcap or 1.0), float(scale),
                x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **flags,
                BLOCK_M=cfg.dlogits_block_m, BLOCK_V=cfg.dlogits_block_v, BLOCK_K=cfg.dlogits_block_k,
                num_warps=cfg.dlogits_warps, num_stages=cfg.dlogits_stages,
            )
        if need_w or need_b:
            gw = grad_w if need_w else dz  # a placeholder pointer when only the bias is wanted
            _grad_weight_kernel[(triton.cdiv(vc, cfg.gw_block_v), triton.cdiv(H, cfg.gw_block_h) if need_w else 1)](
                dz, x, rows, nv, gw, grad_b if need_b else dz, gscale,
                H if need_w else 0, v0, vc,
                dz.stride(0), x.stride(0), x.stride(1), gw.stride(0), gw.stride(1),
                HAS_BIAS=need_b, RESCALE=rescale, **flags,
                BLOCK_V=cfg.gw_block_v, BLOCK_H=cfg.gw_block_h, BLOCK_K=cfg.gw_block_k,
                num_warps=cfg.gw_warps, num_stages=cfg.gw_stages,
            )
        if need_x:
            first, last = c == 0, c == n_chunks - 1
            acc_buf = acc if acc is not None else grad_x
            _grad_hidden_kernel[(triton.cdiv(N, cfg.gh_block_m), triton.cdiv(H, cfg.gh_block_h))](
                dz, weight, rows, nv, acc_buf, grad_x, gscale,
                H, v0, vc,
                dz.stride(0), weight.stride(0), weight.stride(1), acc_buf.stride(0), grad_x.stride(0),
                FIRST=first, LAST=last, RESCALE=rescale, **flags,
                BLOCK_M=cfg.gh_block_m, BLOCK_H=cfg.gh_block_h, BLOCK_K=cfg.gh_block_k,
                num_warps=cfg.gh_warps, num_stages=cfg.gh_stages,
            )
    return grad_x, grad_w, grad_b
