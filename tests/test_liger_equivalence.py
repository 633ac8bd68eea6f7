"""The checks of Liger-Kernel's preference-loss tests (DPO, CPO, SimPO, ORPO), restated against fastdpo.

Liger compares its fused losses with a materialized-logits implementation over: a policy and a reference head
that both may carry a bias, an ``ignore_index`` that is also a valid token id (42), ``beta``, an NLL term on the
chosen tokens (``compute_nll_loss``, fastdpo's ``sft`` term; CPO's ``alpha``), per-token mean log-probs
(``average_log_prob``, applied to the reference too), CPO/SimPO label smoothing and SimPO's ``gamma``, the
loss types ``apo_zero``, ``apo_down``, ``sppo_hard``, ``nca_pair``, and the returned log-probs, rewards and
gradients of hidden, weight and bias. The expected values here are float64 formulas over logits built in the
test.
"""

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from fdtest import backend_params, rel_err


def _batch(ignore_index, *, pairs=3, T=11, H=13, V=47, bias=True, ref_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    d = torch.float64
    hidden = torch.randn(rows, T, H, generator=g, dtype=d)
    ref_hidden = hidden + 0.3 * torch.randn(rows, T, H, generator=g, dtype=d)
    weight = torch.randn(V, H, generator=g, dtype=d) * 0.6
    ref_weight = weight * (1 + 0.2 * torch.randn(V, H, generator=g, dtype=d))
    b = torch.randn(V, generator=g, dtype=d) if bias else None
    rb = torch.randn(V, generator=g, dtype=d) if ref_bias else None
    labels = torch.randint(0, V, (rows, T), generator=g)
    if ignore_index != 42:
        labels[labels == 42] = 41  # 42 is then only ever a token id in the -100 case
    # A prompt, padding of unequal length, and ignored positions scattered inside completions.
    labels[:, :2] = ignore_index
    labels[1::2, T - 3:] = ignore_index
    scatter = torch.rand(rows, T, generator=g) < 0.2
    scatter[:, 2] = False  # every row keeps a labelled token
    labels[scatter] = ignore_index
    return hidden, weight, b, ref_hidden, ref_weight, rb, labels


def _logps(hidden, weight, bias, labels, ignore_index, average):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    logsm = torch.log_softmax(z, dim=-1)
    mask = labels != ignore_index
    tok = torch.gather(logsm, 2, torch.where(mask, labels, 0).unsqueeze(2)).squeeze(2) * mask
    total = tok.sum(-1)
    return (total / mask.sum(-1) if average else total), tok, mask


def _expected(kind, opts, batch, ignore_index, average):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = batch
    beta = opts.get("beta", 0.1)
    pi, tok, mask = _logps(hidden, weight, bias, labels, ignore_index, average)
    with torch.no_grad():
        rho = _logps(ref_hidden, ref_weight, ref_bias, labels, ignore_index, average)[0]
    B = labels.shape[0] // 2
    pc, pr, rc, rr = pi[:B], pi[B:], rho[:B], rho[B:]
    # Liger's cross-entropy over all chosen tokens of the batch.
    nll = -tok[:B].sum() / mask[:B].sum()
    eps = opts.get("label_smoothing", 0.0)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    elif kind == "apo_zero":
        losses = 1 - torch.sigmoid(beta * (pc - rc)) + torch.sigmoid(beta * (pr - rr))
    elif kind == "apo_down":
        losses = torch.sigmoid(beta * (pc - rc)) + 1 - torch.sigmoid(beta * ((pc - rc) - (pr - rr)))
    elif kind == "sppo_hard":
        losses = (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    elif kind == "nca_pair":
        cr, rr_ = beta * (pc - rc), beta * (pr - rr)
        losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr_)
    elif kind in ("cpo", "simpo"):
        # Liger's HFCPOLoss / HFSimPOLoss: logits = β(π_c − π_r) (− γ for SimPO), smoothed log-sigmoid.
        m = beta * (pc - pr) - (opts.get("simpo_gamma", 0.5) if kind == "simpo" else 0.0)
        losses = -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)
        if kind == "cpo":
            losses = losses + opts.get("cpo_alpha", 1.0) * nll
    elif kind == "orpo":
        def log_odds(a):
            return a - torch.log1p(-torch.exp(a))
        losses = nll - beta * F.logsigmoid(log_odds(pc) - log_odds(pr))
    else:
        raise AssertionError(kind)
    loss = losses.mean()
    if opts.get("compute_nll_loss"):
        loss = loss + nll
    return loss, pc, pr, rc, rr, nll


CASES = [
    # (loss type, options, average_log_prob): the grids of Liger's test_dpo_loss, test_cpo_loss,
    # test_simpo_loss and test_orpo_loss.
    ("sigmoid", dict(beta=0.1), False),
    ("sigmoid", dict(beta=0.2, compute_nll_loss=True), False),
    ("sigmoid", dict(beta=0.1, compute_nll_loss=True), True),
    ("apo_zero", dict(beta=0.2), False),
    ("apo_down", dict(beta=0.1), True),
    ("sppo_hard", dict(beta=0.2), True),
    ("nca_pair", dict(beta=0.1), False),
    ("cpo", dict(beta=0.2, cpo_alpha=0.85), False),
    ("cpo", dict(beta=0.1, cpo_alpha=1.0, label_smoothing=0.1), False),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1), True),
    ("orpo", dict(beta=0.2), True),
]


def _fastdpo_options(kind, opts, average):
    o = {k: v for k, v in opts.items() if k != "compute_nll_loss"}
    if opts.get("compute_nll_loss"):
        o.update(loss_type=[kind, "sft"], loss_weights=[1.0, 1.0])
    else:
        o.update(loss_type=kind)
    if kind not in ("simpo", "orpo"):  # these two average by definition
        o["average_log_prob"] = average
    return o


@pytest.mark.parametrize("ignore_index", [-100, 42])
@pytest.mark.parametrize("bias, ref_bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("kind, opts, average", CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_liger_grid_float64(kind, opts, average, ignore_index, bias, ref_bias):
    batch = _batch(ignore_index, bias=bias, ref_bias=ref_bias)
    hidden, weight, b, ref_hidden, ref_weight, rb, labels = batch
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias:
        leaves.append(b.clone().requires_grad_())
    exp_batch = (leaves[0], leaves[1], leaves[2] if bias else None, ref_hidden, ref_weight, rb, labels)
    want, pc, pr, rc, rr, nll = _expected(kind, opts, exp_batch, ignore_index, average)
    want_grads = torch.autograd.grad(want, leaves)
    assert all(g.abs().max() > 0 for g in want_grads)

    ours_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fastdpo.dpo_loss(ours_leaves[0], ours_leaves[1], labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                           bias=ours_leaves[2] if bias else None, ref_bias=rb, ignore_index=ignore_index,
                           backend="torch", **_fastdpo_options(kind, opts, average))
    grads = torch.autograd.grad(out.loss, ours_leaves)
    tol = 1e-10
    assert abs(out.loss.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    for ours, theirs in zip(grads, want_grads):
        assert rel_err(ours, theirs) <= tol
    if kind in ("simpo", "orpo"):
        # fastdpo reports the summed π whatever the loss averages (one convention for every loss mix).
        pi = _logps(hidden, weight, b, labels, ignore_index, False)[0]
        pc, pr = pi[: len(pi) // 2], pi[len(pi) // 2:]
    torch.testing.assert_close(out.chosen_logps, pc.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.rejected_logps, pr.detach(), rtol=tol, atol=tol)
    if kind not in ("cpo", "simpo", "orpo"):
        beta = opts["beta"]
        torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc).detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr).detach(), rtol=tol, atol=tol)
    if opts.get("compute_nll_loss") or kind in ("cpo", "orpo"):
        assert abs(out.metrics["nll_loss"].item() - nll.item()) <= tol


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind, opts, average", [CASES[2], CASES[8]], ids=["dpo+nll", "cpo"])
def test_liger_grid_fp32_both_backends(backend, kind, opts, average):
    """The same checks in fp32 on both backends, against the float64 formula."""
    batch = _batch(42, pairs=2, T=7, H=11, V=37)
    hidden, weight, b, ref_hidden, ref_weight, rb, labels = batch
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), b.clone().requires_grad_()]
    want = _expected(kind, opts, (*leaves, ref_hidden, ref_weight, rb, labels), 42, average)[0]
    want_grads = torch.autograd.grad(want, leaves)
    ours_leaves = [t.detach().float().requires_grad_() for t in leaves]
    out = fastdpo.dpo_loss(ours_leaves[0], ours_leaves[1], labels, ref_hidden=ref_hidden.float(),
                           ref_weight=ref_weight.float(), bias=ours_leaves[2], ref_bias=rb.float(), ignore_index=42,
                           backend=backend, **_fastdpo_options(kind, opts, average))
    grads = torch.autograd.grad(out.loss, ours_leaves)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for ours, theirs in zip(grads, want_grads):
        assert rel_err(ours, theirs) <= 1e-4
