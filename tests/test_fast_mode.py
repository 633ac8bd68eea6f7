"""Fast mode (``memory="fast"`` or a GiB budget) against float64, on the torch backend and through the interpreter.

What is checked: every output and gradient (hidden, weight, bias) at odd shapes with ignored tokens, a softcap, a
bias and a logit scale, in lean, fast and part-kept modes; that unwritten memory cannot hide (NaN-poisoned
allocations); that fast mode really skips the backward's logit recompute; a second backward; no kept memory when
no gradient is needed; the budget arithmetic; and argument checking.
"""

import math

import pytest
import torch

import fastdpo
from fastdpo import _torch_backend
from fastdpo.kernels import logprob_fast as K
from fastdpo.kernels.config import INTERPRETER_DEFAULT
from fastdpo.reference import reference_dpo_loss, reference_token_stats
from fdtest import backend_params, make_batch, poison_empty

N_ROWS, T, H, V = 3, 13, 21, 61  # 39 tokens; V crosses 4 tiles of 16 and 3 backward chunks of 24
HEADS = {"plain": {}, "bias+scale": dict(logit_scale=1.4, temperature=0.9, bias=True),
         "softcap+bias+scale": dict(softcap=2.5, logit_scale=1.4, temperature=0.9, bias=True)}
STATS = ("logp", "mean_logit", "entropy", "log_sum_sq_probs")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_ROWS, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (4.0 / H ** 0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N_ROWS, T), generator=g)
    labels[:, :4] = -100
    labels[1, -3:] = -100
    upstream = torch.randn(N_ROWS, T, generator=g, dtype=torch.float64)
    return hidden, weight, bias, labels, upstream


def _run(fn, hidden, weight, bias, labels, upstream, head, dtype, **kw):
    leaves = [hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
    if head.get("bias"):
        leaves.append(bias.to(dtype).requires_grad_())
    opts = {k: v for k, v in head.items() if k != "bias"}
    stats = fn(leaves[0], leaves[1], labels, leaves[2] if len(leaves) > 2 else None, **opts, **kw)
    grads = torch.autograd.grad((stats["logp"] * upstream.to(stats["logp"].dtype)).sum(), leaves)
    return stats, grads


def _ours(h, w, y, b, **kw):
    return fastdpo.token_stats(h, w, y, bias=b, extras=True, **kw)


def _ref(h, w, y, b, **kw):
    return reference_token_stats(h, w, y, b, **kw)


def _part_budget(dtype, backend):
    """A budget (GiB) that keeps some but not all of the vocabulary: the first chunk (torch: of 16 ids, see
    _small_torch_chunks; ``e`` and one reference per row)."""
    if backend == "triton":
        return K.kept_bytes(N_ROWS * T, INTERPRETER_DEFAULT.vocab_chunk, dtype, INTERPRETER_DEFAULT) / 2 ** 30
    return N_ROWS * T * (16 + 1) * (8 if dtype == torch.float64 else 4) / 2 ** 30


@pytest.fixture
def _small_torch_chunks(monkeypatch):
    # Vocabulary chunks of 16 ids (4 chunks) in tiles of 8 rows (the 24 labelled tokens cross three): a budget
    # can keep the first chunk and recompute the others.
    monkeypatch.setattr(_torch_backend, "VOCAB_CHUNK", 16)
    monkeypatch.setattr(_torch_backend, "MIN_VOCAB_CHUNK", 16)
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", 8 * 16)


CASES = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)]


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backend, dtype", CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
def test_every_output_and_gradient_against_float64(backend, dtype, head, monkeypatch, _small_torch_chunks):
    hidden, weight, bias, labels, upstream = _batch()
    cfg = HEADS[head]
    rounded = [t.to(dtype).double() for t in (hidden, weight, bias)]
    ref, ref_g = _run(_ref, *rounded, labels, upstream, cfg, torch.float64)
    poison_empty(monkeypatch)
    results = {}
    for memory in ("lean", "fast", _part_budget(dtype, backend)):
        ours, ours_g = _run(_ours, hidden, weight, bias, labels, upstream, cfg, dtype, backend=backend, memory=memory)
        for name in STATS:
            assert torch.isfinite(ours[name]).all(), (memory, name)
            assert (ours[name].double() - ref[name]).abs().max() <= (1e-10 if dtype == torch.float64 else 2e-5), (
                memory, name)
        assert torch.equal(ours["is_top1"], ref["is_top1"])
        errs = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(ours_g, ref_g)]
        results[memory if isinstance(memory, str) else "part"] = errs
    lean = results["lean"]
    for mode in ("fast", "part"):
        for err, lean_err in zip(results[mode], lean):
            if dtype == torch.bfloat16:
                # bf16 gradients round to 2^-9; fast mode's p = e·exp(m - lse) adds at most that again.
                assert err <= max(2 * lean_err, 4e-3), (mode, results)
            else:
                assert err <= (1e-10 if dtype == torch.float64 else 2e-6), (mode, results)


def test_fast_mode_skips_the_logit_recompute_on_triton(monkeypatch):
    """With everything kept, the recompute kernel never runs; with part kept, it runs on the other chunks only."""
    hidden, weight, bias, labels, upstream = _batch(1)
    from fastdpo.kernels import logprob_bwd

    launches = []
    real = logprob_bwd._dlogits_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args[10])  # v0: the first column of the recomputed chunk
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(logprob_bwd, "_dlogits_kernel", Spy())
    _run(_ours, hidden, weight, bias, labels, upstream, {}, torch.float32, backend="triton", memory="fast")
    assert launches == []
    _run(_ours, hidden, weight, bias, labels, upstream, {}, torch.float32, backend="triton",
         memory=_part_budget(torch.float32, "triton"))
    chunk = INTERPRETER_DEFAULT.vocab_chunk
    assert launches == list(range(chunk, V, chunk))


@pytest.mark.parametrize("epilogues", [False, True], ids=["compute-dtype", "epilogues"])
def test_fast_mode_skips_the_logit_recompute_on_torch(monkeypatch, _small_torch_chunks, epilogues):
    """The chunked engine's backward projects no kept chunk again: none in fast mode, the chunks past the first
    with part kept; the forward projects every (chunk, tile) once."""
    hidden, weight, _, labels, _ = _batch(2)
    dtype = torch.float32
    if epilogues:
        monkeypatch.setattr(_torch_backend, "EPILOGUES", True)
        dtype = torch.bfloat16
    calls = []
    real = _torch_backend._logit_product
    monkeypatch.setattr(_torch_backend, "_logit_product",
                        lambda x, w, v0, out=None: calls.append((v0, x.shape[0])) or real(x, w, v0, out))
    n = int((labels != -100).sum())
    tiles = []
    for v0, v1 in _torch_backend._vocab_chunks(V):
        step = _torch_backend._rows_per_chunk(v1 - v0, V * H)
        tiles += [(v0, min(step, n - s)) for s in range(0, n, step)]
    assert [v0 for v0, _ in tiles[::3]] == [0, 16, 32, 48] and len(tiles) == 12
    part = _torch_backend.kept_chunks(N_ROWS * T, V, hidden.to(dtype), _part_budget(dtype, "torch"))
    assert part == 1
    for memory, recomputed in (("lean", tiles), ("fast", []), (_part_budget(dtype, "torch"), tiles[3:])):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        logp = fastdpo.fused_logprobs(h, w, labels, backend="torch", memory=memory)
        assert calls == tiles
        calls.clear()
        logp.sum().backward()
        assert calls == recomputed
        calls.clear()


@pytest.mark.parametrize("epilogues", [False, True], ids=["compute-dtype", "epilogues"])
def test_fast_mode_gradients_are_deterministic_with_repeated_targets(monkeypatch, _small_torch_chunks, epilogues):
    """Kept chunks subtract their one-hot rows from the weight gradient by target id: with every token on one of
    three ids (many repeats in each tile) two runs agree bit for bit, and with float64 within rounding."""
    hidden, weight, bias, labels, upstream = _batch(5)
    labels = torch.where(labels == -100, labels, labels % 3 + 16)  # ids 16-18: the second chunk, one tile's width
    dtype = torch.float32
    if epilogues:
        monkeypatch.setattr(_torch_backend, "EPILOGUES", True)
        dtype = torch.bfloat16
    head = {"logit_scale": 1.4, "bias": True}
    rounded = [t.to(dtype).double() for t in (hidden, weight, bias)]
    _, ref_g = _run(_ref, *rounded, labels, upstream, head, torch.float64)
    runs = [_run(_ours, hidden, weight, bias, labels, upstream, head, dtype, backend="torch", memory="fast")[1]
            for _ in range(2)]
    for a, b, want in zip(*runs, ref_g):
        assert torch.equal(a, b)
        assert ((a.double() - want).abs().max() / want.abs().max()).item() < (1e-2 if epilogues else 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_backward_gives_the_same_gradients(backend):
    hidden, weight, bias, labels, upstream = _batch(3)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    logp = fastdpo.fused_logprobs(h, w, labels, backend=backend, memory="fast")
    loss = (logp * upstream.float()).sum()
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_nothing_is_kept_without_a_gradient(monkeypatch):
    hidden, weight, _, labels, _ = _batch(4)
    calls = []
    monkeypatch.setattr(K, "allocate_kept", lambda *a, **k: calls.append(a) or pytest.fail("kept without backward"))
    with torch.no_grad():
        fastdpo.fused_logprobs(hidden.float(), weight.float(), labels, backend="triton", memory="fast")
    fastdpo.fused_logprobs(hidden.float(), weight.float(), labels, backend="triton", memory="fast")
    assert calls == []


def test_dpo_loss_in_fast_mode_matches_the_reference():
    hidden, weight, _, labels, _ = _batch(5)
    ref_hidden = hidden + 0.1
    # The first two rows as one pair (chosen, rejected), float64 on the torch backend.
    h2 = hidden[:2].clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    ours = fastdpo.dpo_loss(h2, w2, labels[:2], ref_hidden=ref_hidden[:2], ref_weight=weight, memory="fast",
                            extra_metrics=True)
    gh, gw = torch.autograd.grad(ours.loss, (h2, w2))
    r2 = hidden[:2].clone().requires_grad_()
    rw = weight.clone().requires_grad_()
    ref = reference_dpo_loss(r2, rw, labels[:2], ref_hidden=ref_hidden[:2], ref_weight=weight)
    rgh, rgw = torch.autograd.grad(ref.loss, (r2, rw))
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, rgh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, rgw, rtol=1e-9, atol=1e-12)


def test_keep_columns_fits_the_budget():
    cfg = INTERPRETER_DEFAULT
    N = 100
    full = K.kept_bytes(N, V, torch.bfloat16, cfg)
    assert K.keep_columns(N, V, torch.bfloat16, math.inf, cfg) == V
    assert K.keep_columns(N, V, torch.bfloat16, full, cfg) == V
    assert K.keep_columns(N, V, torch.bfloat16, 0, cfg) == 0
    assert K.keep_columns(0, V, torch.bfloat16, full, cfg) == 0
    one_chunk = K.kept_bytes(N, cfg.vocab_chunk, torch.bfloat16, cfg)
    assert K.keep_columns(N, V, torch.bfloat16, one_chunk - 1, cfg) == 0
    for budget in (full - 1, full / 2, one_chunk):
        cols = K.keep_columns(N, V, torch.bfloat16, budget, cfg)
        assert cols % cfg.vocab_chunk == 0 and 0 < cols < V
        assert K.kept_bytes(N, cols, torch.bfloat16, cfg) <= budget
        assert K.kept_bytes(N, cols + cfg.vocab_chunk, torch.bfloat16, cfg) > budget or cols + cfg.vocab_chunk >= V


@pytest.mark.parametrize("bad", ["medium", -1.0, math.nan, math.inf, True, None, [1]])
def test_bad_memory_is_refused(bad):
    hidden, weight, _, labels, _ = _batch(6)
    with pytest.raises(ValueError, match="memory must be 'lean', 'fast' or a budget in GiB"):
        fastdpo.fused_logprobs(hidden, weight, labels, memory=bad)
    with pytest.raises(ValueError, match="memory must be"):
        fastdpo.dpo_loss(hidden[:2], weight, labels[:2], reference_free=True, memory=bad)


@pytest.mark.parametrize("keep", [False, True], ids=["lean", "fast"])
@pytest.mark.parametrize("labelled", [16, 40, 64])
def test_forward_splits_the_vocabulary_by_the_labelled_count(keep, labelled):
    """The split count comes from nv on the device: cdiv(min_programs, cdiv(nv, BLOCK_M)) splits work, the others
    write neutral records (max -inf, sums 0), and the merged statistics do not depend on the split."""
    from fastdpo.kernels import logprob_fwd as F
    from fastdpo.kernels import records

    cfg = INTERPRETER_DEFAULT  # BLOCK_M 16, BLOCK_V 16, min_programs 4
    g = torch.Generator().manual_seed(7)
    N, Hx, Vx = 64, 19, 150  # 10 vocabulary tiles
    x = torch.randn(N, Hx, generator=g)
    w = torch.randn(Vx, Hx, generator=g)
    rows = torch.randperm(N, generator=g)
    tgt = torch.randint(0, Vx, (N,), generator=g)
    nv = torch.tensor([labelled], dtype=torch.int32)
    kw = dict(softcap=None, scale=1.0, extras=True, config=cfg)
    kept = K.allocate_kept(N, Vx, x.dtype, x.device, cfg) if keep else None
    stats = F.logprob_forward(x, w, None, rows, tgt, nv, kept=kept, **kw)
    assert stats.shape[1] == F.max_splits(N, 10, cfg) == 4  # sized for N/8 = 8 labelled rows: 1 block x 4
    used = min(4, -(-cfg.min_programs // -(-labelled // 16)))
    per = -(-10 // used)
    working = -(-10 // per)
    m = stats[records.MAX, :, :labelled]
    assert torch.isfinite(m[:working]).all()
    assert (m[working:] == -math.inf).all() and (stats[records.SUMEXP, working:, :labelled] == 0).all()
    z = x[rows[:labelled]] @ w.t()
    lse = torch.logsumexp(z.double(), 1)
    m_all = m.max(0).values
    merged = m_all + torch.log((stats[records.SUMEXP, :, :labelled] * torch.exp(m - m_all)).sum(0))
    torch.testing.assert_close(merged.double(), lse, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_a_zero_memory_budget_is_lean(backend):
    """A memory budget of 0 (int or float) is lean mode: the same log-probs and weight gradient, bit for bit."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    grads = []
    for memory in ("lean", 0, 0.0):
        w = weight.clone().requires_grad_()
        logp = fastdpo.fused_logprobs(hidden, w, labels, backend=backend, memory=memory)
        grads.append((logp.detach(), torch.autograd.grad(logp.sum(), w)[0]))
    for got in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, grads[0]))
