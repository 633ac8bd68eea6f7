"""Packed (padding-free) DPO: the loss on ``cu_seqlens`` against the padded loss of the same sequences.

A ragged batch is built padded (random lengths, an empty sequence, a sequence without completion tokens, a hole
inside a completion), then packed by hand with a Python loop, independently of fastdpo's packing code. Every
output of the packed call (loss, per-sequence log-probs, rewards, per-pair losses, every metric, every gradient)
must equal the padded call's, for every loss type and option, on both backends.
"""

import re

import pytest
import torch

import fastdpo
import fastdpo.integrations.transformers  # noqa: F401  (fastdpo.integrations.transformers.causal_lm_dpo_loss)
from fastdpo import LossConfig
from fastdpo.losses import LOSS_TYPES
from fdtest import TYPE_OPTIONS, backend_params, rel_err

IGNORE = -100
# Options that change how the per-sequence sums are formed, each on a loss type that accepts it.
OPTION_CASES = {
    "average_log_prob": dict(loss_type="sigmoid", average_log_prob=True),
    "ld_alpha": dict(loss_type=["sigmoid", "ipo", "sft"], ld_alpha=0.3),
    "use_weighting": dict(loss_type=["sigmoid", "cpo"], use_weighting=True),
    "extra_metrics": dict(loss_type=["sigmoid_norm", "orpo"], extra_metrics=True),
    "f_divergence": dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    "everything": dict(loss_type=["sigmoid", "ipo", "simpo", "bco_pair"], loss_weights=[0.5, 0.2, 1.0, 0.3],
                       use_weighting=True, extra_metrics=True),
}


def ragged_batch(lengths, prompts, *, H=13, V=37, dtype=torch.float64, seed=0, bias=False):
    """Padded ``[2B, T, H]`` policy/reference hidden states and ``[2B, T]`` labels of sequences of the given
    lengths (prompt tokens ignored, one hole in the first completion), and the same sequences packed."""
    g = torch.Generator().manual_seed(seed)
    rows, T = len(lengths), max(lengths)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H ** 0.5)
    ref_weight = weight * (1 + 0.2 * torch.randn(V, H, generator=g, dtype=torch.float64))
    labels = torch.randint(0, V, (rows, T), generator=g)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        labels[r, :p] = IGNORE
        labels[r, n:] = IGNORE
    labels[0, prompts[0] + 1] = IGNORE
    packed = {
        "hidden": torch.cat([hidden[r, :n] for r, n in enumerate(lengths)]),
        "ref_hidden": torch.cat([ref_hidden[r, :n] for r, n in enumerate(lengths)]),
        "labels": torch.cat([labels[r, :n] for r, n in enumerate(lengths)]),
        "cu_seqlens": torch.tensor([0] + [sum(lengths[:r + 1]) for r in range(rows)], dtype=torch.int32),
    }
    padded = {"hidden": hidden, "ref_hidden": ref_hidden, "labels": labels}
    extra = {"weight": weight, "ref_weight": ref_weight}
    if bias:
        extra["bias"] = torch.randn(V, generator=g, dtype=torch.float64)
    def cast(d):
        return {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in d.items()}

    return cast(padded), cast(packed), cast(extra), lengths


# 3 pairs; sequence 4 (a rejected one) is empty, sequence 2 has no completion token, lengths differ in every pair.
LENGTHS, PROMPTS = [9, 4, 3, 7, 0, 6], [3, 2, 3, 2, 0, 4]
# The Triton interpreter is slow: 2 pairs, sequence 2 empty.
SMALL_LENGTHS, SMALL_PROMPTS = [6, 3, 0, 5], [2, 1, 0, 3]


def _case(backend):
    if backend == "triton":
        return dict(lengths=SMALL_LENGTHS, prompts=SMALL_PROMPTS, dtype=torch.float32, H=11, V=29)
    return dict(lengths=LENGTHS, prompts=PROMPTS, dtype=torch.float64)


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-12


def _close(a, b, dtype, what):
    if torch.float32 in (a.dtype, b.dtype):  # metrics are reported in fp32 whatever the inputs
        dtype = torch.float32
    a, b = a.double(), b.double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert torch.isfinite(a).all() and err <= _tol(dtype) * scale, f"{what}: packed differs from padded by {err}"


def _run_both(backend, options, *, ref="hidden", case=None, bias=False):
    """Run padded and packed dpo_loss; return their outputs and the gradients (packed ones scattered back)."""
    case = case or _case(backend)
    padded, packed, extra, lengths = ragged_batch(case["lengths"], case["prompts"], dtype=case["dtype"],
                                                  H=case.get("H", 13), V=case.get("V", 37), bias=bias)
    dtype = case["dtype"]
    refs = {}
    if ref == "hidden":
        refs = dict(ref_weight=extra["ref_weight"])
    elif ref == "logps":
        refs = dict(ref_logps=torch.linspace(-9.0, -2.0, len(lengths), dtype=dtype))
    elif ref == "free":
        refs = dict(reference_free=True)
    results = []
    for layout, inputs in (("padded", padded), ("packed", packed)):
        h = inputs["hidden"].clone().requires_grad_()
        w = extra["weight"].clone().requires_grad_()
        b = extra["bias"].clone().requires_grad_() if bias else None
        kwargs = dict(refs, **options)
        if ref == "hidden":
            kwargs["ref_hidden"] = inputs["ref_hidden"]
        if layout == "packed":
            kwargs["cu_seqlens"] = inputs["cu_seqlens"]
        out = fastdpo.dpo_loss(h, w, inputs["labels"], bias=b, backend=backend, **kwargs)
        grads = torch.autograd.grad(out.loss, [t for t in (h, w, b) if t is not None])
        results.append((out, grads))
    (pad_out, pad_grads), (pack_out, pack_grads) = results
    # The packed hidden gradient, put back into the padded layout (zeros on padding).
    gh = torch.zeros_like(pad_grads[0])
    offsets = packed["cu_seqlens"].tolist()
    for r, n in enumerate(lengths):
        gh[r, :n] = pack_grads[0][offsets[r]:offsets[r + 1]]
    return pad_out, pack_out, pad_grads, (gh, *pack_grads[1:]), dtype


def _assert_same(pad_out, pack_out, pad_grads, pack_grads, dtype):
    for name in ("loss", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                 "chosen_rewards", "rejected_rewards", "losses"):
        _close(getattr(pack_out, name), getattr(pad_out, name), dtype, name)
    assert sorted(pack_out.metrics) == sorted(pad_out.metrics)
    for name, value in pad_out.metrics.items():
        _close(pack_out.metrics[name], value, dtype, f"metrics[{name!r}]")
    assert pad_grads[0].abs().max() > 0, "a case whose gradient vanishes checks nothing"
    for i, (a, b) in enumerate(zip(pack_grads, pad_grads)):
        _close(a, b, dtype, f"gradient {i}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_packed_equals_padded_torch(loss_type):
    _assert_same(*_run_both("torch", dict(loss_type=loss_type, **TYPE_OPTIONS[loss_type])))


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
@pytest.mark.parametrize("ref", ["hidden", "logps", "free"])
def test_every_option_packed_equals_padded_torch(case, ref):
    _assert_same(*_run_both("torch", OPTION_CASES[case], ref=ref))


def test_bias_softcap_and_scale_packed_equals_padded():
    opts = dict(loss_type="sigmoid", extra_metrics=True, softcap=2.5, logit_scale=0.7, temperature=1.3)
    _assert_same(*_run_both("torch", opts, bias=True))


# On the Triton interpreter the loss types are covered as mixes, one kernel pass for many types (each type's own
# formula is checked on the padded layout by tests/test_losses.py; here what matters is the per-sequence sums).
TRITON_MIXES = {
    "all_but_weighted": dict(loss_type=list(LOSS_TYPES), label_smoothing=0.1, extra_metrics=True),
    "weighted": dict(loss_type=[t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired")], label_smoothing=0.1,
                     use_weighting=True),
    "ld_alpha": dict(loss_type=["sigmoid", "ipo", "sigmoid_norm", "cpo", "sft"], ld_alpha=0.4),
    "average_log_prob": dict(loss_type=["sigmoid", "simpo", "orpo"], average_log_prob=True),
}


@pytest.mark.parametrize("backend", [b for b in backend_params() if getattr(b, "values", (b,))[0] == "triton"])
@pytest.mark.parametrize("mix", sorted(TRITON_MIXES))
def test_loss_types_and_options_packed_equals_padded_triton(backend, mix):
    _assert_same(*_run_both(backend, TRITON_MIXES[mix]))


@pytest.mark.parametrize("backend", backend_params())
def test_sequence_logprobs_packed(backend):
    case = _case(backend)
    padded, packed, extra, lengths = ragged_batch(case["lengths"], case["prompts"], dtype=case["dtype"],
                                                  H=case.get("H", 13), V=case.get("V", 37))
    for average in (False, True):
        want = fastdpo.sequence_logprobs(padded["hidden"], extra["weight"], padded["labels"], average=average,
                                         backend=backend)
        for layout in ("flat", "batched"):
            h, y = packed["hidden"], packed["labels"]
            if layout == "batched":
                h, y = h.unsqueeze(0), y.unsqueeze(0)
            got = fastdpo.sequence_logprobs(h, extra["weight"], y, average=average, backend=backend,
                                            cu_seqlens=packed["cu_seqlens"].long())
            assert got.shape == (len(lengths),)
            _close(got, want, case["dtype"], f"sequence_logprobs average={average} {layout}")
    # An odd number of sequences is fine outside DPO.
    n = lengths[0]
    want = fastdpo.sequence_logprobs(padded["hidden"][:1], extra["weight"], padded["labels"][:1], backend=backend)
    got = fastdpo.sequence_logprobs(packed["hidden"][:n], extra["weight"], packed["labels"][:n], backend=backend,
                                    cu_seqlens=torch.tensor([0, n]))
    _close(got, want, case["dtype"], "one sequence")


def test_module_and_batched_layout():
    padded, packed, extra, _ = ragged_batch(LENGTHS, PROMPTS)
    loss_fn = fastdpo.FusedLinearDPOLoss(beta=0.2, loss_type="ipo")
    want = loss_fn(padded["hidden"], extra["weight"], padded["labels"], ref_hidden=padded["ref_hidden"],
                   ref_weight=extra["ref_weight"])
    got = loss_fn(packed["hidden"].unsqueeze(0), extra["weight"], packed["labels"].unsqueeze(0),
                  ref_hidden=packed["ref_hidden"].unsqueeze(0), ref_weight=extra["ref_weight"],
                  cu_seqlens=packed["cu_seqlens"])
    _close(got.loss, want.loss, torch.float64, "module loss")


def test_segment_helpers_against_loops():
    from fastdpo import _packing

    offsets = torch.tensor([0, 0, 3, 4, 4, 9])
    ids = _packing.segment_ids(offsets, 9)
    assert ids.tolist() == [1, 1, 1, 2, 4, 4, 4, 4, 4]
    x = torch.arange(1.0, 10.0)
    seqs = _packing.Sequences(x, offsets)
    assert seqs.sum(x).tolist() == [0.0, 6.0, 4.0, 0.0, 35.0]
    assert seqs.cumsum(x).tolist() == [1.0, 3.0, 6.0, 4.0, 5.0, 11.0, 18.0, 26.0, 35.0]
    assert seqs.per_token(torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])).tolist() == [20.0] * 3 + [30.0] + [50.0] * 5
    assert seqs.pairs == 2 and seqs.chosen(x).tolist() == [1.0, 2.0, 3.0, 0, 0, 0, 0, 0, 0]
    assert seqs.rejected(x).tolist() == [0, 0, 0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


@pytest.mark.parametrize("options", [dict(loss_type=["sigmoid", "ipo", "sft", "simpo", "orpo"], use_weighting=True,
                                          extra_metrics=True),
                                     dict(loss_type=["sigmoid_norm", "cpo"], ld_alpha=0.5),
                                     dict(loss_type=["aot", "bco_pair"], average_log_prob=True)])
def test_packed_reductions_never_read_a_value(options):
    """The loss on meta tensors, which hold no values: any host read (``.item()``, ``bool()``, a data-dependent
    shape) would raise, so on a GPU the packed per-sequence sums, the loss and its backward never sync."""
    from fastdpo.losses import compute_dpo_loss

    L, meta = 23, torch.device("meta")
    logp = torch.empty(L, device=meta, requires_grad=True)
    stats = {"logp": logp, "mean_logit": torch.empty(L, device=meta), "entropy": torch.empty(L, device=meta),
             "is_top1": torch.empty(L, dtype=torch.bool, device=meta),
             "log_sum_sq_probs": torch.empty(L, device=meta)}
    out = compute_dpo_loss(stats, torch.empty(L, dtype=torch.bool, device=meta), LossConfig(**options),
                           ref_token_logps=torch.empty(L, device=meta),
                           cu_seqlens=torch.empty(7, dtype=torch.int32, device=meta))
    out.loss.backward()
    assert out.chosen_logps.shape == (3,) and logp.grad.shape == (L,) and logp.grad.device == meta


def test_offset_value_checks_skippable_off_cpu(monkeypatch):
    from fastdpo import _packing

    meta = torch.device("meta")
    cu = torch.empty(5, dtype=torch.int64, device=meta)
    with pytest.raises(RuntimeError, match="meta"):  # the value checks read the offsets: impossible on meta
        _packing.check_cu_seqlens(cu, 10, meta, pairs=True)
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    assert _packing.check_cu_seqlens(cu, 10, meta, pairs=True).device == meta
    with pytest.raises(ValueError, match="must start at 0"):  # CPU tensors are always checked
        _packing.check_cu_seqlens(torch.tensor([1, 10]), 10, torch.device("cpu"))


# --- bad cu_seqlens -----------------------------------------------------------------------------------------------

def _bad_call(**overrides):
    padded, packed, extra, _ = ragged_batch(LENGTHS, PROMPTS)
    kwargs = dict(cu_seqlens=packed["cu_seqlens"], ref_hidden=packed["ref_hidden"], ref_weight=extra["ref_weight"])
    hidden, labels = packed["hidden"], packed["labels"]
    hidden = overrides.pop("hidden", hidden)
    labels = overrides.pop("labels", labels)
    kwargs.update(overrides)
    return fastdpo.dpo_loss(hidden, extra["weight"], labels, **kwargs)


L = sum(LENGTHS)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(cu_seqlens=[0, 9, 13, 16, 23, 23, 29]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (dict(cu_seqlens=torch.tensor([0.0, 9, 13, 16, 23, 23, 29])), TypeError, "int32 or int64"),
    (dict(cu_seqlens=torch.tensor([[0, 9, 13, 16, 23, 23, 29]])), ValueError, "1-D tensor"),
    (dict(cu_seqlens=torch.tensor([0])), ValueError, "at least one sequence"),
    (dict(cu_seqlens=torch.tensor([0, 9, 13, 16, 23, L])), ValueError, "even number of sequences"),
    (dict(cu_seqlens=torch.tensor([1, 9, 13, 16, 23, 23, L])), ValueError, "must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 9, 13, 16, 23, 23, L - 1])), ValueError,
     f"must end at the packed length L = {L}"),
    (dict(cu_seqlens=torch.tensor([0, 9, 13, 12, 23, 23, L])), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 9, 4, 3, 7, 0, 6])), ValueError, "looks like sequence lengths"),
    (dict(cu_seqlens=torch.tensor([0, 9, 13, 16, 23, 23, L], device="meta")), ValueError,
     "cu_seqlens must be on one device"),
    (dict(labels=torch.zeros(L - 1, dtype=torch.long)), ValueError, "labels must be packed like hidden"),
    (dict(hidden=torch.zeros(2, L, 13, dtype=torch.float64)), ValueError, "[L, H] or [1, L, H]"),
    (dict(ref_hidden=torch.zeros(L + 1, 13, dtype=torch.float64)), ValueError, "ref_hidden must be packed like"),
    (dict(ref_hidden=None, ref_weight=None, ref_logps=torch.zeros(4, dtype=torch.float64)), ValueError,
     "ref_logps must be [2B] = [6]"),
])
def test_bad_cu_seqlens_named(overrides, error, words):
    with pytest.raises(error, match=re.escape(words)):
        _bad_call(**overrides)


def test_bad_cu_seqlens_in_sequence_logprobs():
    _, packed, extra, _ = ragged_batch(LENGTHS, PROMPTS)
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length"):
        fastdpo.sequence_logprobs(packed["hidden"], extra["weight"], packed["labels"],
                                  cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="cu_seqlens must hold int32 or int64"):
        fastdpo.sequence_logprobs(packed["hidden"], extra["weight"], packed["labels"],
                                  cu_seqlens=torch.tensor([0, L], dtype=torch.int16))


def test_loss_config_is_shared_by_both_layouts():
    padded, packed, extra, _ = ragged_batch(LENGTHS, PROMPTS)
    config = LossConfig(beta=0.3, loss_type="hinge")
    a = fastdpo.dpo_loss(padded["hidden"], extra["weight"], padded["labels"], reference_free=True, config=config)
    b = fastdpo.dpo_loss(packed["hidden"], extra["weight"], packed["labels"], reference_free=True, config=config,
                         cu_seqlens=packed["cu_seqlens"])
    _close(b.loss, a.loss, torch.float64, "hinge")


# --- transformers: causal_lm_dpo_loss(padding_free=True) -----------------------------------------------------------

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def tiny_lm(kind, attn, seed=0):
    """A float64 tiny causal LM; Gemma-2 with its final-logit softcap (and, under eager, its attention softcap:
    sdpa cannot compute that one, so the sdpa variant turns it off)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY)
    else:
        config = transformers.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0,
                                           attn_logit_softcapping=50.0 if attn == "eager" else None)
    config._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).double()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # peaked logits, so that Gemma-2's softcap bends them
    return model


def ragged_lm_batch(lengths, prompt=3, seed=0):
    """Right-padded ``[2B, T]`` ids, unshifted labels (prompt and padding ignored) and attention mask."""
    g = torch.Generator().manual_seed(seed)
    S, T = len(lengths), max(lengths)
    ids = torch.randint(2, VOCAB, (S, T), generator=g)
    attention = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = ids.masked_fill(attention == 0, 0)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :prompt] = -100
    return ids, labels, attention


LM_LENGTHS = [13, 5, 9, 4, 11, 13]  # 3 pairs, one full row per half, a pair whose chosen is shorter


def _eager_attention_float64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                             **kwargs):
    """transformers' eager attention (with Gemma-2's attention softcap) with its softmax in the inputs' dtype:
    the stock one computes it in float32 whatever the model's dtype."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = query @ key.transpose(2, 3) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        weights = softcap * torch.tanh(weights / softcap)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _gemma_rms_norm_float64(self, x):
    """Gemma-2's RMSNorm without its float32 upcast."""
    return self._norm(x) * (1.0 + self.weight)


# Stock eager attention computes its softmax in float32, Gemma-2's RMSNorm in float32 too, and their sums run over
# rows (T padded, L packed) and token counts that differ between the layouts, so these agree to float32 rounding.
# With those two ops kept in float64 ("eager64": Gemma-2's only CPU attention with gradients, since sdpa refuses its
# attention softcap and flex attention has no CPU backward), and with sdpa, they agree to float64 rounding.
@pytest.mark.parametrize("kind, attn, tol", [("llama", "sdpa", 1e-10), ("gemma2", "eager64", 1e-10),
                                             ("llama", "eager", 1e-5), ("gemma2", "eager", 1e-5)])
def test_causal_lm_dpo_loss_packed_equals_padded(kind, attn, tol, monkeypatch):
    if attn == "eager64":
        from transformers.models.gemma2 import modeling_gemma2

        monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", _eager_attention_float64)
        monkeypatch.setattr(modeling_gemma2.Gemma2RMSNorm, "forward", _gemma_rms_norm_float64)
        attn = "eager"
    ids, labels, attention = ragged_lm_batch(LM_LENGTHS)
    reference = tiny_lm(kind, attn, seed=1)
    results = []
    for padding_free in (False, True):
        policy = tiny_lm(kind, attn)
        out = fastdpo.integrations.transformers.causal_lm_dpo_loss(
            policy, ids, labels, attention, ref_model=reference, beta=0.3, padding_free=padding_free,
            loss_type=["sigmoid", "sft"], ld_alpha=0.5)
        out.loss.backward()
        grads = {n: p.grad for n, p in policy.named_parameters()}
        results.append((out, grads))
    (pad, pad_grads), (pack, pack_grads) = results
    assert len(pad_grads) > 10 and all(g is not None for g in pad_grads.values())
    for name in ("loss", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        a, b = getattr(pack, name), getattr(pad, name)
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), (name, a, b)
    for name, value in pad.metrics.items():
        assert abs(pack.metrics[name].item() - value.item()) <= max(tol, 1e-6) * max(1.0, abs(value.item())), name
    for name, g in pad_grads.items():
        err = (pack_grads[name] - g).abs().max().item()
        assert err <= tol * max(1.0, g.abs().max().item()), (name, err)
    assert pad.loss.item() > 0.1 and max(g.abs().max().item() for g in pad_grads.values()) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_causal_lm_logprobs_packed_equals_padded(kind):
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    model = tiny_lm(kind, "eager" if kind == "gemma2" else "sdpa")
    ids, labels, attention = ragged_lm_batch([7, 12, 3, 12, 2])
    padded = fx.causal_lm_token_stats(model, ids, labels, attention, extras=True)
    packed = fx.causal_lm_token_stats(model, ids, labels, attention, extras=True, padding_free=True)
    tol = 1e-5 if kind == "gemma2" else 1e-10
    for name, value in padded.items():
        assert packed[name].shape == value.shape == (5, 11)
        value, got = value.double(), packed[name].double()
        assert (got - value).abs().max() <= tol * max(1.0, value.abs().max().item()), name
    logp = fx.causal_lm_logprobs(model, ids, labels, attention, padding_free=True)
    assert torch.equal(logp, packed["logp"])
    # Sequences never see each other: change one, the log-probs of the others do not move.
    other = ids.clone()
    other[0, :7] = torch.randint(2, VOCAB, (7,), generator=torch.Generator().manual_seed(9))
    moved = fx.causal_lm_logprobs(model, other, labels, attention, padding_free=True)
    assert torch.equal(moved[1:], logp[1:]) and not torch.equal(moved[0], logp[0])


def test_pack_batch_layout():
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13], [14, 0, 0, 0]])
    attention = (ids != 0).long()
    labels = ids.masked_fill(ids == 0, -100)
    labels[:, 0] = -100
    packed = fx.pack_batch(ids, labels, attention, token_type_ids=ids * 0 + 1, output_hidden_states=False)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]
    assert packed.targets.tolist() == [6, 7, -100, 9, -100, 11, 12, 13, -100, -100]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 9, 10] and packed.cu_seqlens.dtype == torch.int32
    assert packed.model_kwargs == {"token_type_ids": packed.model_kwargs["token_type_ids"],
                                   "output_hidden_states": False}
    assert packed.model_kwargs["token_type_ids"].shape == (1, 10)
    back = packed.to_padded(torch.arange(1.0, 11.0))
    assert back.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8], [10, 0, 0]]
    # Left padding packs to the same row, positions restarting at 0 all the same.
    left = torch.stack([torch.cat([r[a == 0], r[a != 0]]) for r, a in zip(ids, attention)])
    left_labels = torch.stack([torch.cat([r[a == 0], r[a != 0]]) for r, a in zip(labels, attention)])
    again = fx.pack_batch(left, left_labels, (left != 0).long())
    for name in ("input_ids", "position_ids", "targets", "cu_seqlens"):
        assert torch.equal(getattr(again, name), getattr(packed, name)), name
    with pytest.raises(ValueError, match="position_ids: padding_free=True computes its own"):
        fx.pack_batch(ids, labels, attention, position_ids=torch.zeros_like(ids))


def test_pack_batch_masks_each_sequences_last_target():
    """Every packed target is the padded batch's shifted label, and the last token of each sequence (whose "next
    token" in the packed row is the following sequence's first) predicts nothing, also where that first token is
    labelled. Right and left padding, an empty row, every token labelled."""
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    g = torch.Generator().manual_seed(3)
    lengths = [4, 2, 5, 0, 3]
    S, T = len(lengths), max(lengths)
    right = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(2, VOCAB, (S, T), generator=g).masked_fill(right == 0, 0)
    labels = ids.masked_fill(right == 0, -100)  # the first token of every sequence is labelled
    packed = fx.pack_batch(ids, labels, right)
    want = labels[:, 1:].masked_fill(right[:, 1:] == 0, -100)
    real = right[:, :-1] == 1
    assert torch.equal(packed.to_padded(packed.targets)[real], want[real])
    ends = packed.cu_seqlens[1:].long() - 1
    ends = ends[torch.tensor(lengths) > 0]
    assert (packed.targets[ends] == -100).all() and (packed.targets != -100).sum() == sum(n - 1 for n in lengths
                                                                                          if n)
    # Left padding: the same sequences, the same targets.
    order = torch.argsort(right, dim=1, stable=True)
    left = fx.pack_batch(ids.gather(1, order), labels.gather(1, order), right.gather(1, order))
    assert torch.equal(left.targets, packed.targets) and torch.equal(left.input_ids, packed.input_ids)


def test_masks_padding_free_cannot_reproduce_are_refused():
    """A hole in a row's mask (the padded batch keeps counting positions across it) and a mask without any token
    are refused with a ValueError naming attention_mask; left padding (one run per row) is accepted."""
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    model = tiny_lm("llama", "sdpa")
    ids, labels, attention = ragged_lm_batch([6, 4, 5, 6])
    holed = attention.clone()
    holed[2, 2] = 0
    for call in (lambda m: fx.causal_lm_dpo_loss(model, ids, labels, m, reference_free=True, padding_free=True),
                 lambda m: fx.causal_lm_logprobs(model, ids, labels, m, padding_free=True),
                 lambda m: fx.pack_batch(ids, labels, m)):
        with pytest.raises(ValueError, match=r"attention_mask: .*row 2 has a 0 between 1s"):
            call(holed)
        with pytest.raises(ValueError, match="attention_mask: .*0 everywhere"):
            call(torch.zeros_like(attention))
    order = torch.argsort(attention, dim=1, stable=True)
    left = fx.causal_lm_logprobs(model, ids.gather(1, order), labels.gather(1, order), attention.gather(1, order),
                                 padding_free=True)
    assert torch.isfinite(left).all() and left.abs().sum() > 0


def test_bool_options_must_be_bools():
    """``padding_free="False"`` is truthy: every bool option of the helpers takes only a real bool."""
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    model = tiny_lm("llama", "sdpa")
    ids, labels, attention = ragged_lm_batch([5, 3, 4, 5])
    for name in ("padding_free", "reference_free"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fx.causal_lm_dpo_loss(model, ids, labels, attention, **{"reference_free": True, name: "False"})
    for name in ("padding_free", "extras"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fx.causal_lm_token_stats(model, ids, labels, attention, **{name: "False"})
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fx.causal_lm_logprobs(model, ids, labels, attention, **{name: 0})


def test_models_that_cannot_run_packed_are_refused():
    transformers = pytest.importorskip("transformers")
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    ids, labels, attention = ragged_lm_batch([5, 3, 4, 5])
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16,
                                                                   num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="MambaForCausalLM takes no position_ids"):
        fx.causal_lm_dpo_loss(mamba, ids, labels, attention, reference_free=True, padding_free=True)
    llama = tiny_lm("llama", "sdpa")
    llama.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="LlamaForCausalLM has layers .* carry state along the sequence"):
        fx.causal_lm_logprobs(llama, ids, labels, attention, padding_free=True)
    llama = tiny_lm("llama", "sdpa")
    llama.config._attn_implementation = "my_custom_attention"
    with pytest.raises(ValueError, match="attn_implementation='my_custom_attention'"):
        fx.causal_lm_logprobs(llama, ids, labels, attention, padding_free=True)
    # GptOss passes every static check, but its mask ignores position_ids: only the probe finds it out.
    gpt_oss = tiny_family("gpt_oss")
    fx.check_packable(gpt_oss, probe=False)
    with pytest.raises(ValueError, match="GptOssForCausalLM does not keep packed sequences apart"):
        fx.causal_lm_dpo_loss(gpt_oss, ids, labels, attention, reference_free=True, padding_free=True)
    with pytest.raises(ValueError, match="hidden_states"):
        fx.causal_lm_token_stats(tiny_lm("llama", "sdpa"), ids, labels, attention, padding_free=True,
                                 hidden_states=torch.zeros(4, 5, 32))


# --- every causal-LM family: packs exactly or is refused ------------------------------------------------------------

FAMILY_TINY = dict(TINY, head_dim=8, bos_token_id=2)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
# Per-family config overrides (experts kept few; Gemma-2's attention softcap off so that sdpa can run it; Lfm2 with a
# convolution layer, as its released checkpoints have).
FAMILIES = {
    "llama": {}, "mistral": {}, "mixtral": dict(num_local_experts=4), "qwen2": {}, "qwen3": {},
    "qwen3_moe": dict(_MOE, num_experts=4), "qwen2_moe": dict(_MOE, num_experts=4, shared_expert_intermediate_size=16),
    "gemma": {}, "gemma2": dict(attn_logit_softcapping=None, final_logit_softcapping=2.0), "gemma3_text": {},
    "phi3": {}, "phi": {}, "cohere": {}, "cohere2": {}, "granite": {}, "granite_swa": {}, "olmo": {}, "olmo2": {},
    "gpt_oss": dict(num_local_experts=4, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "afmoe": dict(_MOE, num_experts=4, num_dense_layers=1), "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm3": {}, "starcoder2": {}, "stablelm": {}, "gpt2": {}, "gpt_neox": {}, "opt": {}, "biogpt": {}, "glm4": {},
    "smollm3": {}, "helium": {}, "nemotron": {}, "exaone4": {}, "seed_oss": {}, "mamba": {}, "bloom": {},
}
# Families that must come out packable (sdpa, restarting positions, no state along the sequence) or refused.
MUST_PACK = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3",
             "cohere", "granite", "olmo"}
MUST_REFUSE = {"gpt_oss", "afmoe", "lfm2", "mamba", "bloom"}


def tiny_family(kind, seed=0):
    """A float64 tiny causal LM of the family ``kind`` (2 layers, 96 tokens) in eval mode, on sdpa where the family
    has it; MoE experts run as plain matmuls (the grouped ones take no float64)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if kind not in CONFIG_MAPPING and kind not in MUST_PACK | MUST_REFUSE:
        # A family newer than the installed transformers (the floors run an older release); the families whose
        # verdict is pinned above exist in every supported release, so they are never skipped.
        pytest.skip(f"transformers {transformers.__version__} has no {kind!r} family")
    config = transformers.AutoConfig.for_model(kind, **FAMILY_TINY, **FAMILIES[kind])
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              experts_implementation="eager")
    except ValueError:  # no sdpa in this family
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                              experts_implementation="eager")
    model = model.double().eval()  # no dropout: packed and padded forwards must be comparable
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # peaked logits, which a leak moves visibly
    return model


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_family_packs_exactly_or_is_refused(kind, monkeypatch):
    """Each family either gives the padded batch's loss when packed (float64; 1e-10 on sdpa, 1e-6 on eager
    attention, whose softmax runs in float32) or is refused by check_packable before any loss is computed; a
    family the probe refuses really does differ packed (so the probe refuses no exact model)."""
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    from fastdpo.integrations import _hf_head
    model = tiny_family(kind)
    ids, labels, attention = ragged_lm_batch([9, 5, 7, 9], prompt=2)
    labels[1, 0] = ids[1, 0]  # a labelled first token: its packed predecessor belongs to another sequence

    def run(padding_free):
        out = fx.causal_lm_dpo_loss(model, ids, labels, attention, reference_free=True, beta=0.5,
                                    padding_free=padding_free, loss_type=["sigmoid", "sft"])
        logps = fx.causal_lm_logprobs(model, ids, labels, attention, padding_free=padding_free)
        return out.loss, logps

    def differences(packed, padded):
        return [rel_err(a, b) for a, b in zip(packed, padded)]

    padded = run(False)
    assert torch.isfinite(padded[0]) and padded[0] > 0 and padded[1].abs().max() > 1
    try:
        fx.check_packable(model)
    except ValueError as err:
        assert kind not in MUST_PACK, err
        assert re.search(rf"padding_free=True: .*{type(model).__name__}", str(err)), err
        with pytest.raises(ValueError, match=re.escape(str(err))):
            run(True)
        if "does not keep packed sequences apart" in str(err):
            monkeypatch.setattr(_hf_head, "check_packable", lambda *args, **kwargs: None)
            assert max(differences(run(True), padded)) > 1e-4, "refused, yet packs exactly"
        return
    assert kind not in MUST_REFUSE
    tol = 1e-10 if model.config._attn_implementation == "sdpa" else 1e-6
    assert max(differences(run(True), padded)) <= tol


def test_packing_probe_runs_once_per_model_in_eval_mode():
    """The probe is the model's own forward through its wrappers: 4 of them (packed, then each sequence) on the
    same tokens every time, without gradient and with dropout off; the verdict is kept, the modes restored."""
    fx = pytest.importorskip("fastdpo.integrations.transformers")
    model = tiny_lm("llama", "sdpa")
    model.config.attention_dropout = 0.5  # would make packed and one-by-one differ, were dropout on
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    seen = []
    model.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (kwargs["input_ids"].clone(), torch.is_grad_enabled(), m.training)), with_kwargs=True)
    fx.check_packable(model)
    assert [ids.shape[1] for ids, _, _ in seen] == [12, 5, 3, 4]
    assert not any(grad or training for _, grad, training in seen)
    assert model.training and all(m.training for m in model.modules())
    fx.check_packable(model)
    assert len(seen) == 4, "the verdict is kept on the model"
    again = tiny_lm("llama", "sdpa", seed=5)
    again.model.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs["input_ids"].clone(),)),
                                      with_kwargs=True)
    fx.check_packable(again)
    assert torch.equal(seen[4][0], seen[0][0]), "every model (every rank) gets the same probe tokens"


# --- FastDPOTrainer(DPOConfig(padding_free=True)) -----------------------------------------------------------------

@pytest.mark.parametrize("kind, kw", [pytest.param("llama", {"ref": "model"}, id="llama-ref_model"),
                                      pytest.param("gemma2", {"ref": "precompute"}, id="gemma2-precomputed"),
                                      pytest.param("llama", {"ref": None, "peft": True}, id="llama-peft"),
                                      pytest.param("qwen3_moe", {"ref": "model"}, id="qwen3_moe-router_loss")])
def test_fast_trainer_padding_free_trains_like_padded(kind, kw, tmp_path, monkeypatch):
    trl_tests = pytest.importorskip("test_integrations_trl")
    from trl.trainer import dpo_trainer

    from fastdpo.integrations import _hf_model
    from fastdpo.integrations.trl import FastDPOTrainer

    padded = trl_tests.train(FastDPOTrainer, kind, tmp_path, **kw)
    warnings, backbone_rows = [], []
    monkeypatch.setattr(dpo_trainer.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    backbone_outputs = _hf_model._backbone_outputs

    def spy(lm, *args, **kwargs):
        backbone_rows.append((tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask")))
        return backbone_outputs(lm, *args, **kwargs)

    monkeypatch.setattr(_hf_model, "_backbone_outputs", spy)
    packed = trl_tests.train(FastDPOTrainer, kind, tmp_path, padding_free=True, **kw)
    assert not [w for w in warnings if "padding_free" in w], warnings
    # Control: the stock trainer does warn (and pad), and the spy hears it.
    dpo_trainer.DPOTrainer(model=trl_tests.make_model("llama"), ref_model=trl_tests.make_model("llama"),
                           args=trl_tests.make_args(tmp_path, padding_free=True),
                           train_dataset=trl_tests.make_dataset(), processing_class=trl_tests.make_tokenizer())
    assert [w for w in warnings if "padding_free" in w]
    # Every backbone pass (policy, reference or precompute) ran on one packed row, without an attention mask.
    assert backbone_rows and all(shape[0] == 1 and mask is None for shape, mask in backbone_rows), backbone_rows
    if kind != "qwen3_moe":
        trl_tests.assert_same_training(packed, padded)
        return
    # The MoE case: same logs (the router loss included) to the same tolerance. Its weights after three AdamW steps
    # at lr 1e-2 differ by up to ~1e-4 (not 5e-5): Adam divides each gradient by its own running magnitude, so the
    # fp32 rounding of near-zero gradient entries (attention over [16, T] rows padded vs one [1, L] row) turns into
    # differences of the order of the learning rate times that rounding's relative size.
    (packed_logs, packed_params), (padded_logs, padded_params) = packed, padded
    for step, (a, b) in enumerate(zip(packed_logs, padded_logs)):
        for name in trl_tests.METRICS + ("aux_loss",):
            assert a[name] == pytest.approx(b[name], rel=2e-4, abs=2e-5), f"step {step}: {name}"
    for name, p in padded_params.items():
        torch.testing.assert_close(packed_params[name], p, atol=3e-4, rtol=1e-4, msg=name)


def test_fast_trainer_refuses_what_cannot_pack_before_training(tmp_path, monkeypatch):
    """A model instance that cannot pack (GptOss: refused by the probe) and a model id whose architecture cannot
    (Lfm2 with a convolution layer: refused from its config) are refused before DPOTrainer's set-up; a model id
    that only the probe refuses (GptOss) is refused once TRL has loaded it, still at construction. A non-bool
    padding_free is a TypeError."""
    trl_tests = pytest.importorskip("test_integrations_trl")
    transformers = pytest.importorskip("transformers")
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer

    kwargs = dict(train_dataset=trl_tests.make_dataset(), processing_class=trl_tests.make_tokenizer())
    gpt_oss_path, lfm2_path = tmp_path / "gpt_oss", tmp_path / "lfm2"
    trl_tests.make_model("gpt_oss").save_pretrained(gpt_oss_path)
    torch.manual_seed(0)
    transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"])).save_pretrained(lfm2_path)
    parent_init = DPOTrainer.__init__
    with monkeypatch.context() as m:
        def parent_must_not_run(*args, **kw):
            raise AssertionError("DPOTrainer.__init__ ran before padding_free was refused")

        m.setattr(DPOTrainer, "__init__", parent_must_not_run)
        with pytest.raises(ValueError, match="padding_free=True: GptOssForCausalLM does not keep packed sequences"):
            FastDPOTrainer(model=trl_tests.make_model("gpt_oss"),
                           args=trl_tests.make_args(tmp_path, padding_free=True), **kwargs)
        with pytest.raises(ValueError, match=r"padding_free=True: Lfm2 has layers of type \['conv'\]"):
            FastDPOTrainer(model=str(lfm2_path), args=trl_tests.make_args(tmp_path, padding_free=True), **kwargs)
        with pytest.raises(ValueError, match=r"padding_free=True: .*Lfm2ForCausalLM has layers"):
            FastDPOTrainer(model=trl_tests.make_model("llama"), ref_model=transformers.Lfm2ForCausalLM.from_pretrained(
                lfm2_path), args=trl_tests.make_args(tmp_path, padding_free=True), **kwargs)
        with pytest.raises(TypeError, match="DPOConfig.padding_free must be a bool"):
            FastDPOTrainer(model=trl_tests.make_model("llama"),
                           args=trl_tests.make_args(tmp_path, padding_free="False"), **kwargs)
        # Control: a model that packs reaches the parent.
        with pytest.raises(AssertionError, match="DPOTrainer.__init__ ran"):
            FastDPOTrainer(model=trl_tests.make_model("llama"), args=trl_tests.make_args(tmp_path, padding_free=True),
                           **kwargs)
    assert DPOTrainer.__init__ is parent_init
    with pytest.raises(ValueError, match="padding_free=True: GptOssForCausalLM does not keep packed sequences"):
        FastDPOTrainer(model=str(gpt_oss_path), args=trl_tests.make_args(tmp_path, padding_free=True), **kwargs)


# --- fastdpo profile --padding-free -------------------------------------------------------------------------------

def test_padding_free_profile_on_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    import json

    from fastdpo.bench import cli
    from fastdpo.bench.padding_free import ragged_lengths

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dict(TINY, model_type="llama")))
    out = tmp_path / "out"
    argv = ["profile", "--padding-free", "--model", str(config_path), "--seq-len", "40", "--pairs", "5",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "padding_free.json").read_text())
    lengths = ragged_lengths(5, 40)
    assert report["lengths"] == lengths
    seqs = [p + c for p, c in zip(lengths["prompt"], lengths["chosen"])]
    seqs += [p + r for p, r in zip(lengths["prompt"], lengths["rejected"])]
    assert max(seqs) <= 40 and len(set(seqs)) > 3, "a ragged batch"
    pad, pack = report["steps"]["padded"], report["steps"]["packed"]
    assert pad["backbone_tokens"] == 10 * max(seqs) and pack["backbone_tokens"] == sum(seqs) < pad["backbone_tokens"]
    assert pad["labelled_tokens"] == pack["labelled_tokens"] == sum(lengths["chosen"]) + sum(lengths["rejected"])
    assert pack["loss"] == pytest.approx(pad["loss"], rel=1e-5)
    assert pack["logps_chosen"] == pytest.approx(pad["logps_chosen"], rel=1e-5) and pad["logps_chosen"] < -1
    assert str(seqs) in text and "backbone tokens" in text and "packed/padded" in text


def test_padding_free_profile_refuses_a_model_that_cannot_run_packed(tmp_path, capsys):
    pytest.importorskip("transformers")
    import json

    from fastdpo.bench import cli

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dict(TINY, model_type="llama", layer_types=["full_attention",
                                                                                  "linear_attention"])))
    argv = ["profile", "--padding-free", "--model", str(config_path), "--seq-len", "16", "--pairs", "2",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "carry state along the sequence" in capsys.readouterr().err
