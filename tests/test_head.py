"""The head interface: one dispatch, the options as one string across the custom ops, the fused engine's
compaction saved for its backward, and ``backend="auto"`` choosing by measurement (timings injected here)."""

import json
import math
import warnings

import pytest
import torch

import fastdpo
from fastdpo import head
from fastdpo._options import HeadOptions
from fastdpo.head import auto, ops
from fdtest import backend_params, make_batch, rel_err


@pytest.fixture
def dispatched(monkeypatch):
    """Every engine the custom ops dispatch to, as ``(backend, memory)``."""
    seen = []
    real = ops.dispatch

    def spy(backend, memory):
        seen.append((backend, memory))
        return real(backend, memory)

    monkeypatch.setattr(ops, "dispatch", spy)
    return seen


@pytest.mark.parametrize("opts", [HeadOptions(), HeadOptions(ignore_index=7, softcap=2.5, scale=-1 / 3, backend="triton",
                                                             extras=True, vocab_start=11, vocab_total=97,
                                                             group="g;name=1", memory=math.inf),
                                  HeadOptions(memory=1e-5, scale=0.0)])
def test_options_cross_the_op_boundary_as_one_string(opts):
    text = opts.encode()
    assert isinstance(text, str)
    assert HeadOptions.decode(text) == opts


@pytest.mark.parametrize("text", ["", "ignore_index=-100", "nonsense;" * 9,
                                  HeadOptions().encode().replace("scale=1.0", "scale=x")])
def test_a_malformed_options_string_is_refused(text):
    with pytest.raises(ValueError, match="options"):
        HeadOptions.decode(text)


@pytest.mark.parametrize("call", [
    lambda: fastdpo.fused_logprobs(*make_batch()[:2], make_batch()[2], backend="cuda"),
    lambda: fastdpo.FusedLinearDPOLoss(backend="fused_v2"),
    lambda: head.dispatch("auto", 0.0),
])
def test_unknown_backend_is_refused_with_the_choices(call):
    with pytest.raises(ValueError, match=r"backend must be one of .*'torch'"):
        call()


def test_every_backend_name_has_a_lean_and_a_fast_engine():
    assert head.BACKENDS == ("auto", *head.ENGINES)
    for name in head.ENGINES:
        lean, fast = head.dispatch(name, 0.0), head.dispatch(name, math.inf)
        assert (lean.backend, fast.backend, lean.keeps, fast.keeps) == (name, name, False, True)
        assert head.dispatch(name, 0.5) is fast


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("memory", ["lean", "fast", 1e-6], ids=["lean", "fast", "budget"])
def test_public_api_reaches_the_engine_through_the_op(backend, memory, dispatched):
    hidden, weight, labels = make_batch(seed=4)
    h = hidden.requires_grad_()
    fastdpo.dpo_loss(h, weight, labels, reference_free=True, backend=backend, memory=memory).loss.backward()
    want = head.resolve_memory(memory)
    assert dispatched == [(backend, want), (backend, want)]  # forward, then backward


def test_fused_backward_reuses_the_forward_compaction(monkeypatch):
    """The stable sort of the labelled rows runs once per forward+backward, and the gradients stay exact."""
    if not fastdpo._validate.interpreting():
        pytest.skip("TRITON_INTERPRET is off")
    from fastdpo import _triton_path
    from fastdpo.reference import reference_token_stats

    calls = []
    real = _triton_path.compaction_order
    monkeypatch.setattr(_triton_path, "compaction_order", lambda *a: calls.append(1) or real(*a))
    hidden, weight, labels = make_batch(seed=6)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = torch.autograd.grad(reference_token_stats(hd, wd, labels)["logp"], (hd, wd), g)
    for memory in ("lean", "fast"):
        calls.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = fastdpo.fused_logprobs(h, w, labels, backend="triton", memory=memory)
        got = torch.autograd.grad(logp, (h, w), g.float())
        assert len(calls) == 1, memory  # sorted in the forward only
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5, memory
