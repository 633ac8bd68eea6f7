"""Per-token log-probs and statistics of both backends against the float64 reference."""

import pytest
import torch
import triton
import triton.language as tl

import fastdpo
from fastdpo import _validate
from fastdpo.kernels.config import KernelConfig, use_config
from fastdpo.kernels.logit_tile import tanh
from fastdpo.reference import reference_token_stats
from fdtest import backend_params, make_batch, poison_empty, rel_err

HEADS = [
    dict(),
    dict(softcap=4.0, logit_scale=1.3, temperature=0.7, bias=True),
    dict(logit_scale=0.5, bias=True),
]


@pytest.fixture(autouse=True)
def _poisoned_empty(monkeypatch):
    """Fresh float buffers start as NaN, so an element a kernel forgets to write shows up."""
    poison_empty(monkeypatch)


def _inputs(dtype, head, seed=0, **shape):
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=seed, **shape)
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(weight.shape[0], generator=g, dtype=torch.float64) if head.get("bias") else None
    kw = {k: v for k, v in head.items() if k != "bias"}
    return hidden, weight, bias, labels, kw


def _run(fn, hidden, weight, bias, labels, upstream, kw, dtype):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = bias.to(dtype).requires_grad_() if bias is not None else None
    stats = fn(h, w, labels, b, **kw)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((stats["logp"] * upstream).sum(), params)
    return stats, grads


def _ours(backend):
    def fn(h, w, labels, b, **kw):
        return fastdpo.token_stats(h, w, labels, bias=b, backend=backend, extras=True, **kw)
    return fn


def _reference(h, w, labels, b, **kw):
    return reference_token_stats(h, w, labels, b, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("head", HEADS)
def test_fp32_matches_float64_reference(backend, head):
    hidden, weight, bias, labels, kw = _inputs(torch.float32, head)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours, ours_g = _run(_ours(backend), hidden, weight, bias, labels, upstream.float(), kw, torch.float32)
    ref, ref_g = _run(_reference, hidden, weight, bias, labels, upstream, kw, torch.float64)
    mask = labels != -100
    for name in ("logp", "mean_logit", "entropy", "log_sum_sq_probs"):
        assert ours[name].shape == labels.shape
        assert torch.isfinite(ours[name]).all(), name
        assert (ours[name][~mask] == 0).all(), f"{name} must be 0 at ignored positions"
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=0, atol=2e-5, msg=name)
    assert torch.equal(ours["is_top1"], ref["is_top1"])
    for got, want in zip(ours_g, ref_g):
        assert rel_err(got, want) < 2e-5


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_that_of_torch(backend, dtype):
    """Error of ours in bf16/fp16 <= 2 x error of the naive torch path in the same dtype, + a floor."""
    head = HEADS[1]
    hidden, weight, bias, labels, kw = _inputs(dtype, head, seed=3)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ref, ref_g = _run(_reference, hidden, weight, bias, labels, upstream, kw, torch.float64)
    naive, naive_g = _run(_reference, hidden, weight, bias, labels, upstream.float(), kw, dtype)
    ours, ours_g = _run(_ours(backend), hidden, weight, bias, labels, upstream.float(), kw, dtype)
    # Our logits come from an fp32-accumulated matmul; the naive ones are rounded to `dtype` first.
    naive_err = (naive["logp"].double() - ref["logp"]).abs().max()
    assert (ours["logp"].double() - ref["logp"]).abs().max() <= 2 * naive_err + 1e-4
    for got, base, want in zip(ours_g, naive_g, ref_g):
        assert rel_err(got, want) <= 2 * rel_err(base, want) + 2e-3


@pytest.mark.parametrize("backend", backend_params())
def test_torch_backend_float64_is_exact(backend):
    if backend != "torch":
        h, w, labels = make_batch(dtype=torch.float64)
        with pytest.raises(TypeError, match="float64"):
            fastdpo.fused_logprobs(h, w, labels, backend=backend)
        return
    hidden, weight, bias, labels, kw = _inputs(torch.float64, HEADS[1])
    upstream = torch.randn(labels.shape, dtype=torch.float64)
    ours, ours_g = _run(_ours("torch"), hidden, weight, bias, labels, upstream, kw, torch.float64)
    ref, ref_g = _run(_reference, hidden, weight, bias, labels, upstream, kw, torch.float64)
    torch.testing.assert_close(ours["logp"], ref["logp"], rtol=1e-12, atol=1e-12)
    for got, want in zip(ours_g, ref_g):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", [
    KernelConfig(fwd_block_m=16, fwd_block_v=32, fwd_block_k=16, dlogits_block_m=32, dlogits_block_v=16,
                 dlogits_block_k=32, gw_block_v=32, gw_block_h=16, gw_block_k=32, gh_block_m=16, gh_block_h=32,
                 gh_block_k=16, vocab_chunk=1000, min_programs=1),
    KernelConfig(fwd_block_m=16, fwd_block_v=16, fwd_block_k=16, dlogits_block_m=16, dlogits_block_v=16,
                 dlogits_block_k=16, gw_block_v=16, gw_block_h=16, gw_block_k=16, gh_block_m=16, gh_block_h=16,
                 gh_block_k=16, vocab_chunk=17, min_programs=64),
], ids=["one-chunk-one-split", "many-chunks-many-splits"])
def test_triton_tilings_agree(config):
    if not _validate.interpreting():
        pytest.skip("TRITON_INTERPRET is off")
    hidden, weight, bias, labels, kw = _inputs(torch.float32, HEADS[1], seed=5, T=11, H=23, V=67)
    upstream = torch.randn(labels.shape, dtype=torch.float64)
    ref, ref_g = _run(_reference, hidden, weight, bias, labels, upstream, kw, torch.float64)
    with use_config(config):
        ours, ours_g = _run(_ours("triton"), hidden, weight, bias, labels, upstream.float(), kw, torch.float32)
    torch.testing.assert_close(ours["logp"].double(), ref["logp"], rtol=0, atol=2e-5)
    assert torch.equal(ours["is_top1"], ref["is_top1"])
    for got, want in zip(ours_g, ref_g):
        assert rel_err(got, want) < 2e-5


@pytest.mark.parametrize("backend", backend_params())
def test_strided_inputs(backend):
    """Non-contiguous hidden states and weight (views into larger tensors) give the same result."""
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=11)
    wide_h = torch.randn(*hidden.shape[:2], hidden.shape[2] + 5)
    wide_h[..., 2:2 + hidden.shape[2]] = hidden
    h_view = wide_h[..., 2:2 + hidden.shape[2]]
    w_view = weight.t().contiguous().t()
    got = fastdpo.fused_logprobs(h_view, w_view, labels, backend=backend)
    want = reference_token_stats(hidden.double(), weight.double(), labels)["logp"]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic(backend):
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=2)
    outs = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = fastdpo.fused_logprobs(h, w, labels, backend=backend)
        outs.append((logp, *torch.autograd.grad(logp.sum(), (h, w))))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params())
def test_all_ignored_gives_zeros_not_nan(backend):
    hidden, weight, labels = make_batch(dtype=torch.float32)
    labels = torch.full_like(labels, -100)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    logp = fastdpo.fused_logprobs(h, w, labels, backend=backend)
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    assert torch.equal(logp, torch.zeros_like(logp))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_nan_in_inputs_comes_out_as_nan(backend, where):
    hidden, weight, labels = make_batch(dtype=torch.float32)
    if where == "hidden":
        hidden[0, 5, 3] = float("nan")  # a labelled position (prompt is 3 tokens)
    else:
        weight[7, 0] = float("nan")
    logp = fastdpo.fused_logprobs(hidden, weight, labels, backend=backend)
    assert torch.isnan(logp[0, 5])
    if where == "weight":
        assert torch.isnan(logp[labels != -100]).all()
    else:
        assert torch.isfinite(logp[1:]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_sequence_logprobs(backend):
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=4)
    labels[2, :] = -100  # a sequence with no completion token: 0, not NaN
    for average in (False, True):
        got = fastdpo.sequence_logprobs(hidden, weight, labels, average=average, backend=backend)
        logp = reference_token_stats(hidden.double(), weight.double(), labels)["logp"].sum(-1)
        if average:
            logp = logp / (labels != -100).sum(-1).clamp(min=1)
        assert got.shape == (labels.shape[0],)
        assert got[2] == 0
        torch.testing.assert_close(got.double(), logp, rtol=0, atol=1e-4)


def test_import_does_not_touch_cuda():
    import subprocess
    import sys

    code = ("import torch; torch.cuda.init = lambda: (_ for _ in ()).throw(RuntimeError('cuda touched'));"
            "import fastdpo, fastdpo.kernels, fastdpo.integrations; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_submodules_the_guide_names_are_attributes_after_import_fastdpo():
    """``import fastdpo`` then ``fastdpo.reference`` (and ``.integrations``, ``.kernels``), in a fresh process,
    without touching CUDA; an unknown attribute stays an AttributeError."""
    import subprocess
    import sys

    code = ("import torch; torch.cuda.init = lambda: (_ for _ in ()).throw(RuntimeError('cuda touched'));"
            "import fastdpo; print(fastdpo.reference.reference_dpo_loss.__name__,"
            " fastdpo.integrations.__name__, fastdpo.kernels.__name__)\n"
            "try:\n    fastdpo.nothing\nexcept AttributeError as e:\n    print('missing', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [
        "reference_dpo_loss fastdpo.integrations fastdpo.kernels",
        "missing module 'fastdpo' has no attribute 'nothing'"], out.stdout


def test_mixed_dtypes_under_autocast_follow_the_autocast_dtype():
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=6)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fastdpo.fused_logprobs(hidden.bfloat16(), w, labels, backend="torch")
    logp.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    want = reference_token_stats(hidden.bfloat16().double(), weight.bfloat16().double(), labels)["logp"]
    torch.testing.assert_close(logp.double(), want, rtol=0, atol=1e-4)
    with pytest.raises(TypeError, match="one dtype"):
        fastdpo.fused_logprobs(hidden.bfloat16(), weight, labels)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias", "weight+bias"])
def test_only_the_requested_gradients(backend, wanted):
    """A frozen lm-head (PEFT), frozen hidden states, or a bias alone: each gradient on its own is right."""
    hidden, weight, bias, labels, kw = _inputs(torch.float32, dict(bias=True), seed=9)
    h = hidden.float().requires_grad_("hidden" in wanted)
    w = weight.float().requires_grad_("weight" in wanted)
    b = bias.float().requires_grad_("bias" in wanted)
    params = [t for t in (h, w, b) if t.requires_grad]
    got = torch.autograd.grad(fastdpo.fused_logprobs(h, w, labels, bias=b, backend=backend).sum(), params)
    hd, wd, bd = (t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b))
    want = torch.autograd.grad(reference_token_stats(hd, wd, labels, bd)["logp"].sum(),
                               [t for t in (hd, wd, bd) if t.requires_grad])
    assert len(got) == len(want)
    for a, c in zip(got, want):
        assert rel_err(a, c) < 2e-5


@pytest.mark.parametrize("backend", backend_params())
def test_empty_and_tiny_vocab(backend):
    hidden, weight, labels = make_batch(dtype=torch.float32, V=5)
    got = fastdpo.fused_logprobs(hidden, weight, labels, backend=backend)
    want = reference_token_stats(hidden.double(), weight.double(), labels)["logp"]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    empty = fastdpo.fused_logprobs(hidden[:0], weight, labels[:0], backend=backend)
    assert empty.shape == (0, labels.shape[1])


def test_chunked_torch_backward_takes_any_per_row_function():
    """The shared chunked backward (log-prob here, TRL's entropy in the integration) back through softcap
    and scale: gradient of Σ_rows Σ_v c_row·z_v (a linear function of the transformed logits) vs autograd."""
    from fastdpo import _torch_backend
    from fastdpo._options import HeadOptions

    hidden, weight, bias, labels, _ = _inputs(torch.float64, dict(bias=True), seed=12)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rows = torch.tensor([0, 3, 4, 9, 17, 20])
    coeff = torch.randn(h2.shape[0], dtype=torch.float64)
    opts = HeadOptions(softcap=3.0, scale=0.7)
    got = _torch_backend.chunked_backward(h2, weight, bias, rows,
                                       lambda z, start, r: torch.ones_like(z) * coeff[r].unsqueeze(1),
                                       opts, (True, True, True))
    hd, wd, bd = (t.clone().requires_grad_() for t in (h2, weight, bias))
    z = 0.7 * 3.0 * torch.tanh((hd[rows] @ wd.t() + bd) / 3.0)
    want = torch.autograd.grad((z * coeff[rows].unsqueeze(1)).sum(), (hd, wd, bd))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- the torch backend across several vocabulary and token chunks ---------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_torch_backend_across_vocabulary_and_token_chunks(head, monkeypatch):
    """Chunks of 7 vocabulary ids and 3 tokens: every statistic and every gradient against float64, so a chunk
    boundary that drops, doubles or misplaces a column or a row fails."""
    from fastdpo import _torch_backend

    monkeypatch.setattr(_torch_backend, "VOCAB_CHUNK", 7, raising=False)
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", 3 * 7)
    hidden, weight, bias, labels, kw = _inputs(torch.float32, head, seed=13, V=45)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours, ours_g = _run(_ours("torch"), hidden, weight, bias, labels, upstream.float(), kw, torch.float32)
    ref, ref_g = _run(_reference, hidden, weight, bias, labels, upstream, kw, torch.float64)
    for name in ("logp", "mean_logit", "entropy", "log_sum_sq_probs"):
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=0, atol=2e-5, msg=name)
    assert torch.equal(ours["is_top1"], ref["is_top1"])
    assert len(ours_g) == len(ref_g)
    for got, want in zip(ours_g, ref_g):
        assert rel_err(got, want) < 2e-5


# ---- -inf logits (a masked vocabulary) ------------------------------------------------------------------------

def _masked_reference(hidden, weight, bias, labels, scale):
    """float64 statistics where ``p·log p`` is 0 for a masked (-inf) logit, as its limit is."""
    z = (hidden @ weight.t() + bias) * scale
    logsm = torch.log_softmax(z, -1)
    mask = labels != -100
    safe = torch.where(mask, labels, 0)
    logp = torch.where(mask, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0)
    p = logsm.exp()
    entropy = -torch.where(p > 0, p * logsm, 0).sum(-1)
    return {"logp": logp, "entropy": torch.where(mask, entropy, 0),
            "log_sum_sq_probs": torch.where(mask, torch.logsumexp(2 * logsm, -1), 0),
            "mean_logit": torch.where(mask, z.mean(-1), 0), "is_top1": (z.argmax(-1) == safe) & mask}


@pytest.mark.parametrize("memory", ["lean", "fast", "part"])
@pytest.mark.parametrize("backend", backend_params())
def test_minus_inf_logits_are_finite(backend, memory, monkeypatch):
    """A bias of -inf on the first tile of a split, on a whole split (Triton; a whole chunk on torch) and on
    scattered columns: log-probs, entropy and every gradient finite and equal to float64's, in lean mode, fast
    mode (the backward reads the kept tiles) and with a budget that keeps part (Triton: columns 0-63, so the
    masked split 2 is recomputed; torch: the first two chunks of 16 ids, the first wholly masked)."""
    from fastdpo import _torch_backend
    from fastdpo.kernels import logprob_fast

    V = 80
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=21, V=V)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[0:16] = True    # tiles of 16: the first tile of split 0 (tiles 0-1)
    masked[64:80] = True   # the whole of split 2 (tile 4)
    masked[[20, 37, 41, 50]] = True
    bias[masked] = float("-inf")
    allowed = (~masked).nonzero().squeeze(1)
    labels = torch.where(labels == -100, labels, allowed[labels % allowed.numel()])
    upstream = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    scale = 1.3

    h64, w64, b64 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    ref = _masked_reference(h64, w64, b64, labels, scale)
    ref_g = torch.autograd.grad((ref["logp"] * upstream).sum(), (h64, w64, b64))

    monkeypatch.setattr(_torch_backend, "VOCAB_CHUNK", 16, raising=False)
    config = KernelConfig(fwd_block_m=16, fwd_block_v=16, fwd_block_k=16, dlogits_block_m=16, dlogits_block_v=16,
                          dlogits_block_k=16, gw_block_v=16, gw_block_h=16, gw_block_k=16, gh_block_m=16,
                          gh_block_h=16, gh_block_k=16, vocab_chunk=32, min_programs=9)
    N = labels.numel()
    if memory == "part":
        if backend == "triton":
            memory = logprob_fast.kept_bytes(N, 64, torch.float32, config) / 2 ** 30
            assert logprob_fast.keep_columns(N, V, torch.float32, memory * 2 ** 30, config) == 64
        else:
            # The first two chunks of 16 ids (the first wholly masked), e and a reference per row each.
            memory = N * (32 + 2) * 4 / 2 ** 30
            assert _torch_backend.kept_chunks(N, V, hidden.float(), memory) == 2
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    with use_config(config):
        ours = fastdpo.token_stats(h, w, labels, bias=b, logit_scale=scale, backend=backend, extras=True,
                                   memory=memory)
        ours_g = torch.autograd.grad((ours["logp"] * upstream.float()).sum(), (h, w, b))
    for name in ("logp", "entropy", "log_sum_sq_probs"):
        assert torch.isfinite(ours[name]).all(), name
        torch.testing.assert_close(ours[name].double(), ref[name].detach(), rtol=0, atol=2e-5, msg=name)
    torch.testing.assert_close(ours["mean_logit"].double(), ref["mean_logit"].detach())
    assert torch.equal(ours["is_top1"], ref["is_top1"])
    for got, want in zip(ours_g, ref_g):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 2e-5
    assert (ours_g[2][masked] == 0).all()
    out = fastdpo.dpo_loss(h.detach(), w.detach(), labels, bias=b.detach(), logit_scale=scale, backend=backend,
                           reference_free=True, extra_metrics=True, memory=memory)
    assert torch.isfinite(out.loss) and torch.isfinite(out.metrics["entropy"])


# ---- fp16 with a loss scaler's upstream gradient ----------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
def test_fp16_backward_with_a_loss_scalers_gradient(backend):
    """An upstream gradient of 65536 (a loss scaler's) on a token of each row, with logit_scale 2: the logit
    gradients reach 131072, past fp16's 65504, while every true gradient fits fp16. They must come out finite
    and right."""
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=17)
    hidden, weight = 0.1 * hidden, 0.2 * weight
    kw = dict(logit_scale=2.0)
    upstream = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    upstream[:, 5] = 65536.0
    ref, ref_g = _run(_reference, hidden, weight, None, labels, upstream, kw, torch.float64)
    assert max(g.abs().max().item() for g in ref_g) < 60000  # the true gradients fit fp16
    ours, ours_g = _run(_ours(backend), hidden, weight, None, labels, upstream.float(), kw, torch.float16)
    for got, want in zip(ours_g, ref_g):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 5e-3


# ---- exact ties ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory", ["lean", "fast"])
@pytest.mark.parametrize("splits", ["tile_per_split", "one_split"])
@pytest.mark.parametrize("backend", backend_params())
def test_exact_ties_take_the_first_index(backend, splits, memory, monkeypatch):
    """Duplicate vocabulary rows tie bit for bit at the top: ``is_top1`` holds for the first of them only, for
    ties inside one tile (20, 23) and across tiles (5, 40): with every tile in its own split (the merge breaks the
    tie) and all in one split (the kernel's running argmax does), in lean mode and in fast mode (inputs that
    require a gradient: the forward keeps tiles)."""
    from fastdpo import _torch_backend

    monkeypatch.setattr(_torch_backend, "VOCAB_CHUNK", 16, raising=False)
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=19, V=53)
    bias = torch.zeros(weight.shape[0])
    for first, second in ((5, 40), (20, 23)):
        weight[second] = weight[first]
    labelled = labels != -100
    rows, cols = labelled.nonzero(as_tuple=True)
    # Each token's top pair: bias 50 on (5, 40) for even rows, on (20, 23) for odd rows.
    targets = torch.tensor([5, 40, 20, 23])
    pick = targets[(rows % 2) * 2 + (cols % 2)]
    labels[rows, cols] = pick
    even = (torch.arange(labels.shape[0]) % 2 == 0).unsqueeze(1)
    tops = []
    for top in ((5, 40), (20, 23)):
        b = bias.clone()
        b[list(top)] = 50.0
        tops.append(b)
    config = KernelConfig(fwd_block_m=16, fwd_block_v=16, fwd_block_k=16, dlogits_block_m=16, dlogits_block_v=16,
                          dlogits_block_k=16, gw_block_v=16, gw_block_h=16, gw_block_k=16, gh_block_m=16,
                          gh_block_h=16, gh_block_k=16, vocab_chunk=24,
                          min_programs=64 if splits == "tile_per_split" else 1)
    got = {}
    with use_config(config):
        for i, b in enumerate(tops):
            got[i] = fastdpo.token_stats(hidden.requires_grad_(memory == "fast"), weight, labels, bias=b,
                                         backend=backend, extras=True, memory=memory)["is_top1"]
    is_top1 = torch.where(even, got[0], got[1])
    want = labelled & ((labels == 5) | (labels == 20))
    assert want.any() and (labelled & ~want).any()
    assert torch.equal(is_top1, want)


# ---- softcap across its range ------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory", ["lean", "fast"])
@pytest.mark.parametrize("softcap", [1.0, 30.0, 1e3, 1e6])
@pytest.mark.parametrize("backend", backend_params())
def test_softcap_from_saturated_to_negligible(backend, softcap, memory):
    """``tanh(u)`` with ``u = z/softcap`` from ~10 (saturated) down to ~1e-6 (a cap that changes nothing): the
    per-token statistics, the DPO loss and every gradient against float64, in fp32."""
    hidden, weight, labels = make_batch(dtype=torch.float64, seed=23, logit_std=10.0)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    kw = dict(softcap=softcap, logit_scale=1.5)
    ours, ours_g = _run(_ours(backend), hidden, weight, bias, labels, upstream.float(), dict(kw, memory=memory),
                        torch.float32)
    rounded = [t.float().double() for t in (hidden, weight, bias)]
    ref, ref_g = _run(_reference, *rounded, labels, upstream, kw, torch.float64)
    # Logits up to ~50 carry fp32 rounding of ~4e-6 (the torch backend's error here is under 1e-5 and 2e-6).
    for name in ("logp", "mean_logit", "entropy", "log_sum_sq_probs"):
        assert torch.isfinite(ours[name]).all(), name
        assert (ours[name].double() - ref[name]).abs().max() < 2e-5, name
    # The gradients against float64, within three times the error of the same computation in plain fp32 PyTorch (the
    # materialized reference run in fp32), or 5e-6 (1e-5 for the chunked engine, which folds -lse into its fp32
    # products: at logits of ~50 that subtraction alone carries ~|z|·2^-24 ≈ 3e-6 per element).
    floor = 1e-5 if backend == "torch" else 5e-6
    _, ref32_g = _run(_reference, *(t.float() for t in rounded), labels, upstream.float(), kw, torch.float32)
    for name, got, want, plain in zip(("hidden", "weight", "bias"), ours_g, ref_g, ref32_g):
        bound = max(floor, 3 * rel_err(plain, want))
        assert rel_err(got, want) < bound, (name, rel_err(got, want), bound)

    from fastdpo.reference import reference_dpo_loss

    losses = []
    plain = [t.float() for t in rounded]
    for args, fn in (((hidden.float(), weight.float(), bias.float()), fastdpo.dpo_loss), (rounded, reference_dpo_loss),
                     (plain, reference_dpo_loss)):
        h, w, b = (t.clone().requires_grad_() for t in args)
        if fn is fastdpo.dpo_loss:
            out = fn(h, w, labels, bias=b, reference_free=True, backend=backend, memory=memory, beta=0.5, **kw)
        else:
            out = fn(h, w, labels, bias=b, reference_free=True, beta=0.5, **kw)
        losses.append((out.loss, *torch.autograd.grad(out.loss, (h, w, b))))
    (loss, *grads), (want_loss, *want_grads), (_, *plain_grads) = losses
    assert abs(loss.item() - want_loss.item()) <= 2e-6 * abs(want_loss.item())
    for got, want, plain_grad in zip(grads, want_grads, plain_grads):
        bound = max(floor, 3 * rel_err(plain_grad, want))
        assert rel_err(got, want) < bound, (rel_err(got, want), bound)


@triton.jit
def _tanh_kernel(u_ptr, t_ptr, d_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tanh(tl.load(u_ptr + offs, mask=mask, other=0.0))
    tl.store(t_ptr + offs, t, mask=mask)
    # The softcap's derivative as the backward computes it.
    tl.store(d_ptr + offs, (1.0 - t) * (1.0 + t), mask=mask)


def test_kernel_tanh_is_accurate_over_its_whole_range():
    """The kernels' ``tanh`` within 3e-7 relative of float64 for ``|u|`` from 1e-8 to 20 (exactly 0, ±1, NaN at 0,
    ±inf, NaN), and the derivative ``1 − tanh²`` within 3e-7 of 1 (a cancelling formula loses every digit of tanh
    near 0)."""
    a = torch.logspace(-8, torch.log10(torch.tensor(20.0)).item(), 20001, dtype=torch.float64).float()
    u = torch.cat([a, -a])
    t, d = torch.empty_like(u), torch.empty_like(u)
    _tanh_kernel[(triton.cdiv(u.numel(), 1024),)](u, t, d, u.numel(), BLOCK=1024)
    u64 = u.double()
    assert ((t.double() - u64.tanh()) / u64.tanh()).abs().max() < 3e-7
    assert (d.double() - u64.cosh().pow(-2)).abs().max() < 3e-7
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    t, d = torch.empty_like(special), torch.empty_like(special)
    _tanh_kernel[(1,)](special, t, d, special.numel(), BLOCK=8)
    assert t[:4].tolist() == [0.0, 0.0, 1.0, -1.0] and d[:4].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert t[4].isnan() and d[4].isnan()
