"""The chunked engine: its Triton epilogue kernels (through the interpreter, fp32 chunks against float64), the
CUDA path's host code run on CPU tensors (``EPILOGUES``), the running-reference route of the compute-dtype tiles,
and every loss type through lean and fast mode."""

import math

import pytest
import torch

import fastdpo
from fastdpo import _merge, _torch_backend
from fastdpo.losses import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES
from fastdpo.reference import reference_dpo_loss, reference_token_stats
from fdtest import TYPE_OPTIONS, make_batch, rel_err

pytestmark = pytest.mark.skipif(not __import__("fastdpo._validate", fromlist=["x"]).interpreting(),
                                reason="TRITON_INTERPRET is off")

ROWS, VC = 37, 203  # odd: partial row blocks and a partial last column tile (BLOCK_V 128)


def _chunk(seed, masked_row=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(ROWS, VC, generator=g) * 3
    bias = torch.randn(VC, generator=g)
    bias[[0, 50, 130, 202]] = -math.inf
    if masked_row:
        bias[:] = -math.inf
    targets = torch.randint(0, VC, (ROWS,), generator=g)
    targets[[3, 11]] = -5          # a target in another chunk
    targets[20] = VC + 7
    return z, bias, targets


def _transform64(z, bias, softcap, scale):
    u = z.double() + bias.double()
    t = torch.tanh(u / softcap) if softcap is not None else u
    return (softcap * t if softcap is not None else u) * scale, t


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, math.nan, dtype=dtype)


HEADS = [(None, 1.0), (2.5, 1.3)]


@pytest.mark.parametrize("softcap, scale", HEADS, ids=["plain", "softcap+scale"])
@pytest.mark.parametrize("keep_dtype", [None, torch.bfloat16, torch.float16, torch.float32],
                         ids=["lean", "keep-bf16", "keep-fp16", "keep-fp32"])
@pytest.mark.parametrize("masked_row", [False, True], ids=["", "all-masked"])
def test_forward_epilogue_record_against_float64(softcap, scale, keep_dtype, masked_row):
    from fastdpo.kernels import chunk_epilogue as E

    z, bias, targets = _chunk(1, masked_row)
    stats = _nan(_merge.N_STATS_EXTRAS, ROWS)
    keep_e = _nan(ROWS, VC, dtype=keep_dtype) if keep_dtype else None
    keep_m = _nan(ROWS) if keep_dtype else None
    E.chunk_forward(z, bias, targets, stats, softcap=softcap, scale=scale, extras=True, keep_e=keep_e, keep_m=keep_m)
    zz, _ = _transform64(z, bias, softcap, scale)
    m = zz.amax(1)
    ref = torch.where(torch.isneginf(m), 0.0, m).unsqueeze(1)
    e = torch.exp(zz - ref)
    finite = torch.where(torch.isneginf(zz), 0.0, zz)
    inside = (targets >= 0) & (targets < VC)
    want = {
        _merge.MAX: m,
        _merge.SUMEXP: e.sum(1),
        _merge.TARGET: torch.where(inside, zz.gather(1, targets.clamp(0, VC - 1).unsqueeze(1)).squeeze(1), 0.0),
        _merge.SUM: zz.sum(1),  # a -inf logit makes it -inf, as the reference's mean logit
        _merge.XSUMEXP: (e * finite).sum(1),
        _merge.SQSUMEXP: (e * e).sum(1),
    }
    for row, value in want.items():
        torch.testing.assert_close(stats[row].double(), value, rtol=2e-6, atol=2e-5, msg=f"record row {row}")
    if not masked_row:
        assert torch.equal(stats[_merge.ARGMAX].long(), zz.argmax(1))
    if keep_dtype:
        torch.testing.assert_close(keep_m.double(), m, rtol=2e-6, atol=2e-6)
        tol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10, torch.float32: 1e-5}[keep_dtype]
        assert torch.isfinite(keep_e.float()).all()
        assert (keep_e.double() - e).abs().max() <= tol


@pytest.mark.parametrize("softcap, scale", HEADS, ids=["plain", "softcap+scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_epilogue_in_place_against_float64(softcap, scale, dtype):
    from fastdpo.kernels import chunk_epilogue as E

    z, bias, targets = _chunk(2)
    zz, t = _transform64(z, bias, softcap, scale)
    lse = torch.logsumexp(zz, 1) + torch.rand(ROWS, dtype=torch.float64)  # a vocabulary wider than the chunk
    inside = (targets >= 0) & (targets < VC)
    onehot = torch.zeros(ROWS, VC, dtype=torch.float64)
    onehot[inside.nonzero().squeeze(1), targets[inside]] = 1.0
    want = torch.exp(zz - lse.unsqueeze(1)) - onehot
    if softcap is not None:
        want = want * (1 - t * t)
    buf = z.clone()
    d = E.chunk_backward(buf, bias, targets, lse.float(), dtype, softcap=softcap, scale=scale)
    assert d.dtype == dtype and d.shape == (ROWS, VC)
    assert d.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # in place
    tol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10, torch.float32: 1e-5}[dtype]
    assert (d.double() - want).abs().max() <= tol


def test_epilogues_refuse_bad_chunks():
    from fastdpo.kernels import chunk_epilogue as E

    z, bias, targets = _chunk(3)
    stats = torch.empty(_merge.N_STATS, ROWS)
    with pytest.raises(ValueError, match="float32 chunk"):
        E.chunk_forward(z.double(), None, targets, stats, softcap=None, scale=1.0, extras=False)
    with pytest.raises(ValueError, match="targets must be"):
        E.chunk_forward(z, None, targets[1:], stats, softcap=None, scale=1.0, extras=False)
    with pytest.raises(ValueError, match="stats must be"):
        E.chunk_forward(z, None, targets, stats[:, 1:], softcap=None, scale=1.0, extras=False)
    with pytest.raises(ValueError, match="contiguous"):
        E.chunk_backward(torch.zeros(ROWS, VC + 5)[:, :VC], None, targets, targets.float(), torch.bfloat16,
                         softcap=None, scale=1.0)
    with pytest.raises(ValueError, match="dtype must be"):
        E.chunk_backward(z.clone(), None, targets, targets.float(), torch.float64, softcap=None, scale=1.0)


# ---- the engine's host code on the epilogue path (the CUDA path, products upcast on CPU) -----------------------

@pytest.fixture
def small_chunks(monkeypatch):
    # Chunks of 16 ids in tiles of 8 rows: several chunks and tiles, a budget that keeps part.
    monkeypatch.setattr(_torch_backend, "VOCAB_CHUNK", 16)
    monkeypatch.setattr(_torch_backend, "MIN_VOCAB_CHUNK", 16)
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", 8 * 16)


def _head_case(dtype, head, seed=4):
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=seed, V=61)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(61, generator=g, dtype=torch.float64)
    kw = {"plain": {}, "bias+scale": dict(logit_scale=1.3, temperature=0.9),
          "softcap+bias+scale": dict(softcap=2.5, logit_scale=1.3, temperature=0.9)}[head]
    leaves = [t.to(dtype) for t in (hidden, weight)] + ([bias.to(dtype)] if head != "plain" else [])
    upstream = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    return leaves, labels, kw, upstream


def _stats_and_grads(leaves, labels, kw, upstream, fn, **extra):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    bias = leaves[2] if len(leaves) > 2 else None
    stats = fn(leaves[0], leaves[1], labels, bias, **kw, **extra)
    grads = torch.autograd.grad((stats["logp"].double() * upstream).sum(), leaves)
    return stats, grads


def _ours(h, w, y, b, **kw):
    return fastdpo.token_stats(h, w, y, bias=b, backend="torch", extras=True, **kw)


def _ref(h, w, y, b, **kw):
    return reference_token_stats(h, w, y, b, **kw)


@pytest.mark.parametrize("head", ["plain", "bias+scale", "softcap+bias+scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_epilogue_path_every_output_and_gradient(dtype, head, monkeypatch, small_chunks):
    monkeypatch.setattr(_torch_backend, "EPILOGUES", True)
    leaves, labels, kw, upstream = _head_case(dtype, head)
    ref, ref_g = _stats_and_grads([t.double() for t in leaves], labels, kw, upstream, _ref)
    N = labels.numel()
    part = N * (16 * dtype.itemsize + 4) * 1.5 / 2 ** 30  # the first chunk's e and m
    assert _torch_backend.kept_chunks(N, 61, leaves[0], part) == 1
    errs = {}
    for memory in ("lean", "fast", part):
        ours, ours_g = _stats_and_grads(leaves, labels, kw, upstream, _ours, memory=memory)
        for name in ("logp", "mean_logit", "entropy", "log_sum_sq_probs"):
            assert torch.isfinite(ours[name]).all()
            assert (ours[name].double() - ref[name]).abs().max() <= 2e-5, (memory, name)
        assert torch.equal(ours["is_top1"], ref["is_top1"])
        errs[str(memory)] = [rel_err(a, b) for a, b in zip(ours_g, ref_g)]
        # The gradients are rounded to 16 bits, and so are D and the rows a·x on this path.
        assert max(errs[str(memory)]) < (1.2e-2 if dtype == torch.bfloat16 else 2e-3), errs


def test_epilogue_path_fp16_with_a_loss_scalers_gradient(monkeypatch, small_chunks):
    """A loss scaler's 65536 times logit_scale 2 passes fp16's range in a·x: the power-of-two scaling keeps it."""
    monkeypatch.setattr(_torch_backend, "EPILOGUES", True)
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=17, V=61)
    hidden, weight = 0.1 * hidden, 0.2 * weight
    upstream = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    upstream[:, 5] = 65536.0
    leaves = [hidden.half(), weight.half()]
    _, ref_g = _stats_and_grads([t.double() for t in leaves], labels, dict(logit_scale=2.0), upstream, _ref)
    assert max(g.abs().max().item() for g in ref_g) < 60000
    for memory in ("lean", "fast"):
        _, ours_g = _stats_and_grads(leaves, labels, dict(logit_scale=2.0), upstream, _ours, memory=memory)
        for got, want in zip(ours_g, ref_g):
            assert torch.isfinite(got).all()
            assert rel_err(got, want) < 5e-3


# ---- compute-dtype tiles: the running reference and its fallback ----------------------------------------------

@pytest.mark.parametrize("memory", ["lean", "fast"])
def test_running_reference_falls_back_when_a_later_logit_overflows(memory, small_chunks):
    """Chunk 0's logits sit near -100 and a logit of chunk 2 near +100: exp(z − r) overflows fp32 there, so those
    tiles take the softmax route; the outputs and gradients still equal float64's."""
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=8, V=61)
    bias = torch.zeros(61, dtype=torch.float64)
    bias[:16] = -100.0
    bias[40] = 100.0
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = [hidden.float(), weight.float(), bias.float()]
    ref, ref_g = _stats_and_grads([t.double() for t in leaves], labels, {}, upstream, _ref)
    calls = []
    real = _torch_backend._stat_record
    _torch_backend._stat_record = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ours, ours_g = _stats_and_grads(leaves, labels, {}, upstream,
                                        lambda h, w, y, b: {"logp": fastdpo.fused_logprobs(
                                            h, w, y, bias=b, backend="torch", memory=memory)})
    finally:
        _torch_backend._stat_record = real
    tiles_per_chunk = -(-int((labels != -100).sum()) // 8)
    assert len(calls) > tiles_per_chunk  # chunk 0's tiles and the overflowing ones
    assert (ours["logp"].double() - ref["logp"]).abs().max() <= 2e-5
    for got, want in zip(ours_g, ref_g):
        assert rel_err(got, want) < 2e-5


# ---- every loss type through the engine, lean and fast ---------------------------------------------------------

@pytest.mark.parametrize("memory", ["lean", "fast"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_through_the_chunked_engine(loss_type, memory, small_chunks):
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=9, V=61)
    ref_hidden = hidden + 0.05 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1),
                                             dtype=torch.float64)
    reference = {} if loss_type in REFERENCE_FREE_LOSS_TYPES else dict(ref_hidden=ref_hidden, ref_weight=weight)
    outs = []
    for fn, extra in ((fastdpo.dpo_loss, dict(backend="torch", memory=memory)), (reference_dpo_loss, {})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(h, w, labels, loss_type=loss_type, softcap=3.0, logit_scale=1.1, **TYPE_OPTIONS[loss_type],
                 **reference, **extra)
        outs.append((out.loss, *torch.autograd.grad(out.loss, (h, w))))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
