"""The functional API (``dpo_loss``, ``fused_logprobs``) on the inputs a user passes by accident: any memory layout
of every tensor argument, NumPy scalars for numeric options, tensors on the meta device, autocast. Each gives the
right result or a named TypeError/ValueError."""

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch

import fastdpo
from fastdpo import _torch_backend
from fastdpo.kernels import logprob_fast as K
from fastdpo.kernels.config import INTERPRETER_DEFAULT, use_config
from fdtest import backend_params, rel_err

R, T, H, V = 4, 5, 7, 23


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(hidden=torch.randn(R, T, H, generator=g), weight=torch.randn(V, H, generator=g),
             bias=torch.randn(V, generator=g), ref_hidden=torch.randn(R, T, H, generator=g),
             ref_weight=torch.randn(V, H, generator=g), ref_bias=torch.randn(V, generator=g),
             labels=torch.randint(0, V, (R, T), generator=g))
    t["labels"][:, 0] = -100
    t["labels"][1, 3:] = -100
    return t


def _relayout(t, how):
    """The same values in another memory layout: every stride pattern a view can produce."""
    if how == "strided":  # every other element of a buffer twice the size, along the last dimension
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if how == "transposed":  # the first two dimensions swapped in memory (1-d: a column of a row-major [n, 3])
        if t.dim() == 1:
            buf = torch.zeros(t.shape[0], 3, dtype=t.dtype)
            buf[:, 1] = t
            return buf[:, 1]
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "expanded":  # stride 0 along the first dimension: all rows equal to the first one
        return t[:1].clone().expand(t.shape)  # a fresh one-row buffer: nothing valid to read past it
    raise AssertionError(how)


def _run(t, backend, memory="lean"):
    # detach() keeps the layout (clone() would make a gappy view contiguous).
    leaves = {k: t[k].detach().requires_grad_() if k in ("hidden", "weight", "bias") else t[k]
              for k in t}
    out = fastdpo.dpo_loss(leaves["hidden"], leaves["weight"], leaves["labels"], bias=leaves["bias"],
                           ref_hidden=leaves["ref_hidden"], ref_weight=leaves["ref_weight"],
                           ref_bias=leaves["ref_bias"], beta=0.5, backend=backend, memory=memory)
    grads = torch.autograd.grad(out.loss, [leaves[k] for k in ("hidden", "weight", "bias")])
    return out.loss, out.chosen_rewards, grads


LAYOUT_CASES = [(name, how, "lean") for name in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias",
                                                 "labels") for how in ("strided", "transposed", "expanded")]
# Fast mode keeps logits for its own backward: the policy head's inputs again, all kept and partly kept (the
# backward then reads the inputs again for the chunks it recomputes).
LAYOUT_CASES += [(name, how, memory) for name in ("hidden", "weight", "bias") for how in ("strided", "expanded")
                 for memory in ("fast", "part")]
# "part": vocabulary chunks of 16 columns on both engines, a budget that keeps only the leading ones.
_PART_CONFIG = replace(INTERPRETER_DEFAULT, vocab_chunk=16)
_PART_GIB = K.kept_bytes(R * T, 16, torch.float32, _PART_CONFIG) / 2 ** 30


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name, how, memory", LAYOUT_CASES)
def test_every_tensor_argument_in_any_layout(backend, name, how, memory):
    """Each tensor argument alone in a non-contiguous layout gives the contiguous result, gradients included."""
    t = _inputs()
    if how == "expanded":
        # Expansion changes the values (every row the first): compare with the same values laid out contiguously.
        t[name] = t[name][:1].expand(t[name].shape).contiguous()
    part = memory == "part"
    if part:
        memory = _PART_GIB
        assert 0 < K.keep_columns(R * T, V, torch.float32, _PART_GIB * 2 ** 30, _PART_CONFIG) < V
    with use_config(_PART_CONFIG) if part else contextlib.nullcontext(), pytest.MonkeyPatch.context() as mp:
        if part:
            mp.setattr(_torch_backend, "VOCAB_CHUNK", 16)
            mp.setattr(_torch_backend, "MIN_VOCAB_CHUNK", 16)
            if backend == "torch":
                kept = _torch_backend.kept_chunks(R * T, V, t["hidden"], _PART_GIB)
                assert 0 < kept < len(_torch_backend._vocab_chunks(V))
        base = _run(t, backend, memory)
        t[name] = _relayout(t[name], how)
        assert not t[name].is_contiguous()
        got = _run(t, backend, memory)
    assert rel_err(got[0], base[0]) <= 1e-6
    assert rel_err(got[1], base[1]) <= 1e-5
    for g, b in zip(got[2], base[2]):
        assert rel_err(g, b) <= 1e-5


@pytest.mark.parametrize("backend", backend_params())
def test_expanded_bias_gradient_is_the_sum_over_its_rows(backend):
    """A stride-0 bias (one value broadcast over the vocabulary): its gradient is the sum of the full one."""
    t = _inputs()
    scalar = torch.tensor([0.7], requires_grad=True)
    out = fastdpo.fused_logprobs(t["hidden"], t["weight"], t["labels"], bias=scalar.expand(V), backend=backend)
    (g,) = torch.autograd.grad(out.sum(), scalar)
    full = torch.full((V,), 0.7, requires_grad=True)
    want_out = fastdpo.fused_logprobs(t["hidden"].double(), t["weight"].double(), t["labels"], bias=full.double(),
                                      backend="torch")
    (want,) = torch.autograd.grad(want_out.sum(), full)
    assert rel_err(out, want_out) <= 1e-5
    assert abs(g.item() - want.sum().item()) <= 1e-5  # softmax gradients sum to 0 over the vocabulary


def test_numpy_scalars_are_numbers():
    """NumPy scalars (what a config read with NumPy, or a sweep over np.linspace, hands over) are accepted as
    the Python numbers they equal; NumPy bools are not numbers."""
    t = _inputs()
    assert fastdpo.dpo_loss(t["hidden"], t["weight"], t["labels"], reference_free=True, memory=np.float32(0.5),
                            backend="torch").loss.isfinite()
    py = dict(beta=0.25, softcap=3.0, logit_scale=1.5, temperature=0.8, ignore_index=-100, label_smoothing=0.1,
              loss_type=["robust", "sft"], loss_weights=[1, 2])
    npy = dict(beta=np.float32(0.25), softcap=np.float32(3.0), logit_scale=np.float64(1.5),
               temperature=np.float64(0.8),
               ignore_index=np.int64(-100), label_smoothing=np.float32(0.1), loss_type=["robust", "sft"],
               loss_weights=[np.int32(1), np.int64(2)])
    h, w, y = t["hidden"].double(), t["weight"].double(), t["labels"]
    a = fastdpo.dpo_loss(h, w, y, reference_free=True, backend="torch", **py)
    b = fastdpo.dpo_loss(h, w, y, reference_free=True, backend="torch", **npy)
    # np.float32(0.25) and 0.25 are the same number; np.float32(0.1) is 0.1 rounded to fp32.
    assert abs(a.loss.item() - b.loss.item()) <= 1e-7
    cfg = fastdpo.LossConfig(beta=np.float32(0.25), loss_weights=[np.int64(2)])
    assert type(cfg.beta) is float and cfg.weights == (2.0,)
    logp = fastdpo.fused_logprobs(h, w, y, ignore_index=np.int32(-100), softcap=np.float32(3.0), backend="torch")
    assert rel_err(logp, fastdpo.fused_logprobs(h, w, y, softcap=3.0, backend="torch")) <= 1e-12
    for bad in (dict(beta=np.bool_(True)), dict(softcap=np.bool_(True)), dict(ignore_index=np.float64(-100)),
                dict(ignore_index=True), dict(beta=torch.tensor(0.1))):
        with pytest.raises(TypeError, match=next(iter(bad))):
            fastdpo.dpo_loss(h, w, y, reference_free=True, backend="torch", **bad)


@pytest.mark.parametrize("backend", backend_params())
def test_meta_tensors_give_shapes(backend):
    """All inputs on the meta device (a model built with ``torch.device("meta")``): the shapes come out, with no
    attempt to read values (the label range check has none to read)."""
    t = {k: v.to("meta") for k, v in _inputs().items()}
    logp = fastdpo.fused_logprobs(t["hidden"], t["weight"], t["labels"], bias=t["bias"], backend=backend)
    assert logp.device.type == "meta" and logp.shape == (R, T)
    h = t["hidden"].requires_grad_()
    out = fastdpo.dpo_loss(h, t["weight"], t["labels"], ref_hidden=t["ref_hidden"], ref_weight=t["ref_weight"],
                           backend=backend)
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    (g,) = torch.autograd.grad(out.loss, h)
    assert g.shape == h.shape and g.device.type == "meta"


@pytest.mark.parametrize("backend", backend_params())
def test_autocast_computes_in_the_autocast_dtype_like_a_linear(backend):
    """Under torch.autocast the head computes in the autocast dtype as F.linear would, also when hidden states
    and weight are both fp32 (mixed-precision training of fp32 weights: stock TRL's lm-head runs in bf16 there;
    an fp32 head would be slower and differ from its bf16 reference pass). fp64 inputs stay fp64, as autocast
    leaves them."""
    t = _inputs()
    h, w, y = t["hidden"], t["weight"], t["labels"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastdpo.fused_logprobs(h, w, y, backend=backend)
        got64 = fastdpo.fused_logprobs(h.double(), w.double(), y, backend="torch")
    want = fastdpo.fused_logprobs(h.bfloat16(), w.bfloat16(), y, backend=backend)
    assert torch.equal(got, want)
    assert got64.dtype == torch.float64
    assert rel_err(got64, fastdpo.fused_logprobs(h.double(), w.double(), y, backend="torch")) == 0
