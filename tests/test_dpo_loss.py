"""The DPO loss of both backends against the reference, its reference modes and its bad inputs."""

import pytest
import torch

import fastdpo
from fastdpo.reference import reference_dpo_loss
from fdtest import backend_params, make_batch, rel_err

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected"]


def _ref_inputs(mode, hidden, weight, labels):
    g = torch.Generator().manual_seed(99)
    if mode == "hidden-own-head":
        return dict(ref_hidden=torch.randn(hidden.shape, generator=g, dtype=torch.float64).to(hidden.dtype),
                    ref_weight=(weight.double() + 0.05 * torch.randn(weight.shape, generator=g,
                                                                      dtype=torch.float64)).to(weight.dtype))
    if mode == "hidden-shared-head":
        return dict(ref_hidden=torch.randn(hidden.shape, generator=g, dtype=torch.float64).to(hidden.dtype),
                    ref_weight=weight)
    if mode == "precomputed":
        return dict(ref_logps=-30 * torch.rand(hidden.shape[0], generator=g, dtype=torch.float64))
    return dict(reference_free=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["hidden-own-head", "hidden-shared-head", "precomputed", "free"])
def test_dpo_loss_matches_reference(backend, mode):
    hidden, weight, labels = make_batch(pairs=3, dtype=torch.float64, seed=1)
    ref = _ref_inputs(mode, hidden, weight, labels)
    head = dict(softcap=6.0, temperature=0.8)

    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref64 = {k: (v if not isinstance(v, torch.Tensor) else (w64 if v is weight else v)) for k, v in ref.items()}
    want = reference_dpo_loss(h64, w64, labels, beta=0.3, **ref64, **head)
    want_g = torch.autograd.grad(want.loss, (h64, w64))

    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref32 = {k: (w32 if v is weight else (v.float() if isinstance(v, torch.Tensor) and k != "ref_logps" else v))
             for k, v in ref.items()}
    got = fastdpo.dpo_loss(h32, w32, labels, beta=0.3, backend=backend, **ref32, **head)
    got_g = torch.autograd.grad(got.loss, (h32, w32))

    assert abs(got.loss.item() - want.loss.item()) < 1e-5
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert getattr(got, name).shape == (3,)
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name).double(), rtol=0, atol=2e-4)
    for key in METRICS:
        assert got.metrics[key].dim() == 0
        torch.testing.assert_close(got.metrics[key].double(), want.metrics[key].double(), rtol=0, atol=2e-4,
                                   msg=key)
    for a, b in zip(got_g, want_g):
        assert rel_err(a, b) < 1e-4
    if mode == "free":
        assert torch.equal(got.ref_chosen_logps, torch.zeros(3))


def test_reference_gets_no_gradient_and_shared_head_grads_only_policy():
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=3)
    ref_hidden = torch.randn(hidden.shape).requires_grad_()
    w = weight.clone().requires_grad_()
    out = fastdpo.dpo_loss(hidden, w, labels, ref_hidden=ref_hidden, ref_weight=w, backend="torch")
    out.loss.backward()
    assert ref_hidden.grad is None
    # The reference branch contributes nothing: same grad as with the reference log-probs precomputed.
    pre = fastdpo.sequence_logprobs(ref_hidden.detach(), weight, labels)
    w2 = weight.clone().requires_grad_()
    fastdpo.dpo_loss(hidden, w2, labels, ref_logps=pre, backend="torch").loss.backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_module_holds_options():
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=4)
    module = fastdpo.FusedLinearDPOLoss(beta=0.5, softcap=3.0, backend="torch")
    got = module(hidden, weight, labels, reference_free=True)
    want = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, beta=0.5, softcap=3.0, backend="torch")
    assert torch.equal(got.loss, want.loss)
    assert "beta=0.5" in repr(module)


def test_nan_hidden_gives_nan_loss():
    hidden, weight, labels = make_batch(dtype=torch.float32)
    hidden[1, 6, 0] = float("nan")
    out = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True)
    assert torch.isnan(out.loss)


def test_empty_completion_sequence_is_zero_not_nan():
    hidden, weight, labels = make_batch(dtype=torch.float32)
    labels[0] = -100
    out = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True)
    assert out.chosen_logps[0] == 0 and torch.isfinite(out.loss)


# ---- bad input -----------------------------------------------------------------------------------

def _good():
    hidden, weight, labels = make_batch(dtype=torch.float32)
    return dict(hidden=hidden, weight=weight, labels=labels)


def _call(**overrides):
    args = _good()
    args.update(overrides)
    kwargs = {k: v for k, v in args.items() if k not in ("hidden", "weight", "labels")}
    if not any(k in kwargs for k in ("ref_hidden", "ref_logps", "reference_free", "ref_weight", "ref_bias")):
        kwargs["reference_free"] = True
    return fastdpo.dpo_loss(args["hidden"], args["weight"], args["labels"], **kwargs)


H, V = 19, 53


@pytest.mark.parametrize("overrides, error, words", [
    (dict(weight=torch.randn(V, H + 1)), ValueError, "hidden size"),
    (dict(hidden=torch.randn(3, 9, H), labels=torch.zeros(3, 9, dtype=torch.long)), ValueError, "even number"),
    (dict(labels=torch.full((4, 9), V, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.full((4, 9), -5, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(4, 9)), TypeError, "labels"),
    (dict(labels=torch.zeros(4, 8, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(36, dtype=torch.long)), ValueError, "labels"),
    (dict(ref_hidden=torch.randn(4, 9, H), ref_weight=torch.randn(V + 2, H)), ValueError, "ref_weight"),
    (dict(ref_hidden=torch.randn(4, 9, H), ref_weight=torch.randn(V, H + 3)), ValueError, "ref_hidden"),
    (dict(ref_hidden=torch.randn(4, 8, H), ref_weight=torch.randn(V, H)), ValueError, "ref_hidden"),
    (dict(ref_hidden=torch.randn(4, 9, H)), ValueError, "ref_weight"),
    (dict(ref_weight=torch.randn(V, H)), ValueError, "ref_hidden"),
    (dict(ref_hidden=torch.randn(4, 9, H), ref_weight=torch.randn(V, H), ref_logps=torch.zeros(4)), ValueError,
     "exactly one"),
    (dict(ref_logps=torch.zeros(4), reference_free=True), ValueError, "exactly one"),
    (dict(ref_logps=torch.zeros(3)), ValueError, "ref_logps"),
    (dict(hidden=torch.randn(0, 9, H), labels=torch.zeros(0, 9, dtype=torch.long)), ValueError, "empty"),
    (dict(hidden=torch.randn(4, 0, H), labels=torch.zeros(4, 0, dtype=torch.long)), ValueError, "empty"),
    (dict(hidden=torch.randn(4, 9, H, dtype=torch.float64)), TypeError, "dtype"),
    (dict(hidden="not a tensor"), TypeError, "hidden"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_raises_clear_error(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides)


def test_no_reference_without_reference_free():
    args = _good()
    with pytest.raises(ValueError, match="no reference"):
        fastdpo.dpo_loss(args["hidden"], args["weight"], args["labels"])


def test_triton_backend_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call(backend="triton")


# ---- reference isolation, differing heads ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["hidden", "precomputed"])
def test_no_gradient_reaches_any_reference_input(backend, mode):
    """Every reference input that requires grad gets none, and the policy's gradient equals the one with the
    reference detached: a reference that leaks into the graph fails here."""
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=8)
    g = torch.Generator().manual_seed(8)
    V = weight.shape[0]
    if mode == "hidden":
        ref = dict(ref_hidden=torch.randn(hidden.shape, generator=g), ref_weight=weight + 0.1 * torch.randn(
            weight.shape, generator=g), ref_bias=torch.randn(V, generator=g))
    else:
        ref = dict(ref_logps=-20 * torch.rand(hidden.shape[0], generator=g))
    leaves = {k: v.clone().requires_grad_() for k, v in ref.items()}
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fastdpo.dpo_loss(h, w, labels, backend=backend, **leaves)
    out.loss.backward()
    for name, t in leaves.items():
        assert t.grad is None, f"{name} got a gradient"
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        assert not getattr(out, name).requires_grad
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fastdpo.dpo_loss(h2, w2, labels, backend=backend, **ref).loss.backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("entry", ["dpo_loss", "module"])
def test_reference_head_differs_from_the_policy_head(backend, entry):
    """Policy and reference with their own weight and bias (and softcap/scale applied to both): a reference
    computed with the policy's head, or without its own bias, fails here."""
    hidden, weight, labels = make_batch(pairs=3, dtype=torch.float64, seed=12)
    g = torch.Generator().manual_seed(12)
    V = weight.shape[0]
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    ref_hidden = torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.3 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
    ref_bias = torch.randn(V, generator=g, dtype=torch.float64)
    head = dict(softcap=4.0, logit_scale=1.2)
    h64, w64, b64 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = reference_dpo_loss(h64, w64, labels, bias=b64, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              ref_bias=ref_bias, beta=0.2, **head)
    want_g = torch.autograd.grad(want.loss, (h64, w64, b64))
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    refs = dict(ref_hidden=ref_hidden.float(), ref_weight=ref_weight.float(), ref_bias=ref_bias.float())
    if entry == "module":
        got = fastdpo.FusedLinearDPOLoss(beta=0.2, backend=backend, **head)(h, w, labels, bias=b, **refs)
    else:
        got = fastdpo.dpo_loss(h, w, labels, bias=b, beta=0.2, backend=backend, **refs, **head)
    got_g = torch.autograd.grad(got.loss, (h, w, b))
    torch.testing.assert_close(got.ref_chosen_logps.double(), want.ref_chosen_logps.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(got.ref_rejected_logps.double(), want.ref_rejected_logps.double(), rtol=0, atol=1e-4)
    assert abs(got.loss.item() - want.loss.item()) < 1e-5
    for key in METRICS:
        torch.testing.assert_close(got.metrics[key].double(), want.metrics[key].double(), rtol=0, atol=2e-4, msg=key)
    for a, c in zip(got_g, want_g):
        assert rel_err(a, c) < 1e-4


@pytest.mark.parametrize("backend", backend_params())
def test_tied_rewards_are_not_accurate(backend):
    """``rewards/accuracies`` counts chosen rewards strictly above the rejected ones, as TRL does: a pair whose
    chosen and rejected completions are the same ties and counts 0."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    B = hidden.shape[0] // 2
    hidden[B:], labels[B:] = hidden[:B], labels[:B]
    out = fastdpo.dpo_loss(hidden, weight, labels, ref_logps=torch.zeros(2 * B), backend=backend)
    assert torch.equal(out.chosen_rewards, out.rejected_rewards)
    assert out.metrics["rewards/accuracies"].item() == 0.0
