"""The DPO loss family against independent float64 formulas, on both backends.

The expected values below are written from the papers and TRL 1.16's ``DPOTrainer._compute_loss`` with
different primitives (softplus, explicit loops over pairs and tokens) from fastdpo's registry, and
computed from logits materialized here in float64. A last group runs TRL's own ``_compute_loss`` on
the same per-token log-probs.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from fastdpo import LossConfig
from fastdpo.losses import LOSS_TYPES, TRL_LOSS_TYPES
from fastdpo.reference import reference_dpo_loss
from fdtest import TYPE_OPTIONS, backend_params, make_batch, rel_err

IGNORE = -100


# --- inputs -------------------------------------------------------------------------------------------------------

def _shape(backend):
    # The interpreter is slow: the triton cases stay tiny. The torch ones use 3 pairs, so that every pair has
    # completions of different lengths (make_batch pads every other row).
    return dict(pairs=2, T=7, H=19, V=41) if backend == "triton" else dict(pairs=3, T=9, H=19, V=53)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _batch(backend, seed=0):
    """Policy and reference inputs in float64; the reference is a perturbed policy so that the log-ratios
    are O(1) and no loss saturates. Lengths differ inside every pair, and one position inside a completion
    is ignored, so that nothing can assume contiguous completions of equal length."""
    hidden, weight, labels = make_batch(seed=seed, dtype=torch.float64, **_shape(backend))
    labels = labels.clone()
    B = labels.shape[0] // 2
    labels[0, 4] = IGNORE
    for b in range(B):
        valid = (labels[b + B] != IGNORE).nonzero().flatten()
        if (labels[b] != IGNORE).sum() == valid.numel():
            labels[b + B, valid[-1]] = IGNORE
    g = torch.Generator().manual_seed(seed + 100)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    ref_weight = weight * (1 + 0.2 * torch.randn(weight.shape, generator=g, dtype=torch.float64))
    return hidden, weight, labels, ref_hidden, ref_weight


def _token_stats(hidden, weight, labels):
    """Per-token log-prob (differentiable), log Σp², entropy and top-1 from float64 logits built here."""
    z = hidden.double() @ weight.double().t()
    logsm = z - torch.logsumexp(z, dim=-1, keepdim=True)
    mask = labels != IGNORE
    logp = torch.stack([torch.stack([logsm[s, t, labels[s, t]] if mask[s, t] else logsm.new_zeros(())
                                     for t in range(labels.shape[1])]) for s in range(labels.shape[0])])
    with torch.no_grad():
        p = logsm.exp()
        lssp = torch.log((p * p).sum(-1))
        entropy = -(p * logsm).sum(-1)
        top1 = z.argmax(-1) == labels
    return logp, lssp, entropy, top1, mask


# --- the independent formulas -------------------------------------------------------------------------------------

def _log_sig(x):
    return -F.softplus(-x)


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def _sequence_logps(logp, mask, opts):
    """π per row: the sum, the per-token mean, or LD-DPO's shared part + α · the tail (token by token)."""
    rows = logp.shape[0]
    B = rows // 2
    lengths = [int(mask[s].sum()) for s in range(rows)]
    out = []
    for s in range(rows):
        if opts.get("ld_alpha") is not None:
            shared = min(lengths[s % B], lengths[s % B + B])
            total, k = logp.new_zeros(()), 0
            for t in range(logp.shape[1]):
                if mask[s, t]:
                    k += 1
                    total = total + (1.0 if k <= shared else opts["ld_alpha"]) * logp[s, t]
        else:
            total = logp[s].sum()
            if opts.get("average_log_prob"):
                total = total / max(lengths[s], 1)
        out.append(total)
    return torch.stack(out)


def _score(u, opts):
    kind = opts.get("f_divergence_type", "reverse_kl")
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + _log_sig(u)
    if kind == "alpha_divergence":
        a = opts.get("f_alpha_divergence_coef", 0.5)
        return u if abs(a - 1) < 1e-6 else (torch.exp((a - 1) * u) - 1) / (a - 1)
    return u


def _pair_losses(name, beta, opts, pi, rho, n, mean_logp, nll):
    """The ``[B]`` per-pair losses of one type, written pair by pair."""
    B = pi.shape[0] // 2
    eps = opts.get("label_smoothing", 0.0)
    out = []
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            a, _ = torch.sort(pi[:B] - pi[B:])
            b, _ = torch.sort(rho[:B] - rho[B:])
        else:
            a, _ = torch.sort(pi[:B] - rho[:B])
            b, _ = torch.sort(pi[B:] - rho[B:])
        d = beta * (a - b)
        return (1 - eps) * F.softplus(-d) + eps * F.softplus(d)
    for b in range(B):
        uc, ur = pi[b] - rho[b], pi[b + B] - rho[b + B]
        sc, sr = _score(uc, opts), _score(ur, opts)
        x = beta * (sc - sr)
        nc, nr = max(n[b], 1), max(n[b + B], 1)
        if name == "sigmoid":
            v = F.softplus(-x)
        elif name == "hinge":
            v = torch.clamp(1 - x, min=0)
        elif name == "ipo":
            v = (sc / nc - sr / nr - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            q = _sig(x)
            v = q * (torch.log(q) - math.log(1 - eps)) + (1 - q) * (torch.log(1 - q) - math.log(eps))
        elif name == "nca_pair":
            v = F.softplus(-beta * uc) + 0.5 * F.softplus(beta * uc) + 0.5 * F.softplus(beta * ur)
        elif name == "robust":
            v = ((1 - eps) * F.softplus(-x) - eps * F.softplus(x)) / (1 - 2 * eps)
        elif name == "bco_pair":
            v = F.softplus(-beta * uc) + F.softplus(beta * ur)
        elif name == "sppo_hard":
            v = (uc - 1 / (2 * beta)) ** 2 + (ur + 1 / (2 * beta)) ** 2
        elif name == "apo_zero":
            v = 1 - _sig(beta * uc) + _sig(beta * ur)
        elif name == "apo_down":
            v = _sig(beta * uc) + 1 - _sig(beta * (uc - ur))
        elif name == "discopop":
            m = _sig(x / opts.get("discopop_tau", 0.05))
            v = (1 - m) * F.softplus(-x) + m * torch.exp(-x)
        elif name == "sft":
            v = nll
        elif name == "sigmoid_norm":
            v = F.softplus(-beta * (sc / nc - sr / nr))
        elif name == "simpo":
            m = beta * (mean_logp[b] - mean_logp[b + B]) - opts.get("simpo_gamma", 0.5)
            v = (1 - eps) * F.softplus(-m) + eps * F.softplus(m)
        elif name == "cpo":
            m = beta * (pi[b] - pi[b + B])
            v = (1 - eps) * F.softplus(-m) + eps * F.softplus(m) + opts.get("cpo_alpha", 1.0) * nll
        elif name == "orpo":
            def log_odds(a):
                return a - torch.log(1 - torch.exp(a))
            v = nll + beta * F.softplus(-(log_odds(mean_logp[b]) - log_odds(mean_logp[b + B])))
        else:
            raise AssertionError(name)
        out.append(v)
    return torch.stack(out)


def expected_loss(hidden, weight, labels, opts, *, ref_hidden=None, ref_weight=None, ref_logps=None):
    """The loss of ``opts`` (LossConfig fields) in float64, differentiable w.r.t. hidden and weight."""
    logp, lssp, _, _, mask = _token_stats(hidden, weight, labels)
    beta = opts.get("beta", 0.1)
    types = opts.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else list(types)
    weights = opts.get("loss_weights") or [1.0] * len(types)
    rows = labels.shape[0]
    B = rows // 2
    n = [int(mask[s].sum()) for s in range(rows)]
    pi = _sequence_logps(logp, mask, opts)
    if ref_hidden is not None:
        with torch.no_grad():
            rho = _sequence_logps(_token_stats(ref_hidden, ref_weight, labels)[0], mask, opts)
    elif ref_logps is not None:
        rho = ref_logps.double()
    else:
        rho = torch.zeros(rows, dtype=torch.float64)
    mean_logp = torch.stack([logp[s].sum() / max(n[s], 1) for s in range(rows)])
    nll = -logp[:B].sum() / max(sum(n[:B]), 1)
    pair_w = torch.ones(B, dtype=torch.float64)
    if opts.get("use_weighting"):
        with torch.no_grad():
            w = torch.stack([torch.exp(sum((logp[s, t] - lssp[s, t]) for t in range(labels.shape[1]) if mask[s, t])
                                       / max(n[s], 1)) for s in range(rows)])
            pair_w = w[:B] * w[B:]
    total = 0.0
    for name, wt in zip(types, weights):
        total = total + wt * (_pair_losses(name, beta, opts, pi, rho, n, mean_logp, nll) * pair_w).mean()
    return total


# --- the comparison ---------------------------------------------------------------------------------------------

def _check(backend, opts, *, ref="hidden", seed=0, batch=None):
    """dpo_loss with ``opts`` against :func:`expected_loss`: loss and gradients w.r.t. hidden and weight."""
    hidden, weight, labels, ref_hidden, ref_weight = batch or _batch(backend, seed)
    dtype = _dtype(backend)
    # The expectation is computed from the very values the backend sees.
    hidden, weight, ref_hidden, ref_weight = (t.to(dtype).double() for t in (hidden, weight, ref_hidden, ref_weight))
    refs = {}
    if ref == "hidden":
        refs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    elif ref == "logps":
        mask = labels != IGNORE
        refs = dict(ref_logps=_sequence_logps(_token_stats(ref_hidden, ref_weight, labels)[0], mask, {}).detach())
    elif ref == "free":
        refs = dict(reference_free=True)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    want = expected_loss(h, w, labels, opts, **refs)
    want_gh, want_gw = torch.autograd.grad(want, (h, w))
    assert want_gh.abs().max() > 0 and want_gw.abs().max() > 0, "a test whose gradient vanishes checks nothing"

    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    ours = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k != "ref_logps" else v) for k, v in refs.items()}
    out = fastdpo.dpo_loss(h, w, labels, backend=backend, **ours, **opts)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert out.loss.dtype == dtype
    assert abs(out.loss.item() - want.item()) <= tol * max(1.0, abs(want.item())), (out.loss.item(), want.item())
    assert rel_err(gh, want_gh) <= tol, rel_err(gh, want_gh)
    assert rel_err(gw, want_gw) <= tol, rel_err(gw, want_gw)
    return out, want


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type(backend, loss_type):
    _check(backend, dict(loss_type=loss_type, **TYPE_OPTIONS[loss_type]))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("f_div", [dict(f_divergence_type="forward_kl"), dict(f_divergence_type="js_divergence"),
                                   dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
                                   dict(f_divergence_type="reverse_kl")],
                         ids=lambda d: d["f_divergence_type"])
def test_f_divergence(backend, f_div):
    # sigmoid reads the score difference, ipo the length-normalised scores: both places the scores enter.
    _check(backend, dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.05], **f_div))


def test_alpha_divergence_at_one_is_reverse_kl():
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    args = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, backend="torch")
    a = fastdpo.dpo_loss(hidden, weight, labels, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0,
                         **args).loss
    b = fastdpo.dpo_loss(hidden, weight, labels, **args).loss
    c = fastdpo.dpo_loss(hidden, weight, labels, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5,
                         **args).loss
    assert torch.equal(a, b) and abs(c.item() - b.item()) > 1e-6


@pytest.mark.parametrize("backend", backend_params())
def test_weighted_mix(backend):
    # MPO-style: sigmoid + bco_pair + sft, with robust smoothing mixed in to share label_smoothing.
    out, want = _check(backend, dict(loss_type=["sigmoid", "bco_pair", "sft", "robust"],
                                     loss_weights=[0.8, 0.2, 1.0, -0.3], label_smoothing=0.1))
    assert torch.allclose(out.losses.mean(), out.loss)


@pytest.mark.parametrize("backend", backend_params())
def test_ld_alpha(backend):
    out, _ = _check(backend, dict(ld_alpha=0.3))
    hidden, weight, labels, _, _ = _batch(backend)
    plain = _token_stats(hidden, weight, labels)[0].sum(-1)
    ours = torch.cat([out.chosen_logps, out.rejected_logps]).double()
    # Every pair has completions of different lengths, so the tail weighting moves one of its two π.
    B = labels.shape[0] // 2
    moved = ((ours - plain).abs() > 0.1).view(2, B).any(0)
    assert moved.all(), (ours, plain)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_ld_alpha_ends(alpha):
    _check("torch", dict(ld_alpha=alpha, loss_type="ipo"))


def test_ld_alpha_one_is_plain_dpo():
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    args = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, backend="torch")
    a = fastdpo.dpo_loss(hidden, weight, labels, ld_alpha=1.0, **args).loss
    b = fastdpo.dpo_loss(hidden, weight, labels, **args).loss
    assert abs(a.item() - b.item()) <= 1e-12


def test_ld_alpha_with_precomputed_reference_takes_it_as_given():
    _check("torch", dict(ld_alpha=0.5), ref="logps")


@pytest.mark.parametrize("backend", backend_params())
def test_use_weighting(backend):
    out, want = _check(backend, dict(use_weighting=True, loss_type=["sigmoid", "sft"]))
    hidden, weight, labels, ref_hidden, ref_weight = _batch(backend)
    unweighted = expected_loss(hidden, weight, labels, {"loss_type": ["sigmoid", "sft"]}, ref_hidden=ref_hidden,
                               ref_weight=ref_weight)
    assert abs(want.item() - unweighted.item()) > 1e-3 * abs(unweighted.item())


def test_average_log_prob():
    _check("torch", dict(average_log_prob=True, beta=2.0))
    _check("torch", dict(average_log_prob=True, beta=2.0), ref="logps")


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo", ["simpo", "sft"]], ids=str)
def test_reference_free_types_need_no_reference(loss_type):
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    opts = dict(loss_type=loss_type, backend="torch")
    none = fastdpo.dpo_loss(hidden, weight, labels, **opts)
    free = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, **opts)
    with_ref = fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, **opts)
    assert torch.equal(none.loss, free.loss)
    assert abs(with_ref.loss.item() - none.loss.item()) <= 1e-12 * abs(none.loss.item())
    # The reference still enters the logged rewards β·(π − ρ).
    assert not torch.equal(with_ref.chosen_rewards, none.chosen_rewards)
    _check("torch", dict(loss_type=loss_type), ref="none")


def test_reference_still_required_when_a_type_reads_it():
    hidden, weight, labels, _, _ = _batch("torch")
    with pytest.raises(ValueError, match="no reference"):
        fastdpo.dpo_loss(hidden, weight, labels, loss_type=["simpo", "sigmoid"], backend="torch")


@pytest.mark.parametrize("loss_type", ["orpo", "ipo", "sft", "simpo"])
def test_empty_completion_gives_finite_loss(loss_type):
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    labels = labels.clone()
    labels[1] = IGNORE
    h = hidden.clone().requires_grad_()
    out = fastdpo.dpo_loss(h, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, loss_type=loss_type,
                           backend="torch")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all()
    assert h.grad[1].abs().max() == 0
    _check("torch", dict(loss_type=loss_type), batch=(hidden, weight, labels, ref_hidden, ref_weight))


# --- metrics ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
def test_extra_metrics(backend):
    hidden, weight, labels, ref_hidden, ref_weight = _batch(backend)
    dtype = _dtype(backend)
    hidden, weight, ref_hidden, ref_weight = (t.to(dtype) for t in (hidden, weight, ref_hidden, ref_weight))
    B = labels.shape[0] // 2
    # Make about half of the chosen targets the argmax, so that the accuracy is neither 0 nor 1.
    argmax = (hidden.double() @ weight.double().t()).argmax(-1)
    labels = labels.clone()
    take = (labels != IGNORE) & (torch.arange(labels.shape[1]) % 2 == 0)
    take[B:] = False
    labels[take] = argmax[take]
    _, _, entropy, top1, mask = _token_stats(hidden.double(), weight.double(), labels)
    want_entropy = (entropy * mask).sum() / mask.sum()
    want_acc = (top1[:B] & mask[:B]).sum() / mask[:B].sum()
    assert 0 < want_acc < 1

    args = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, backend=backend)
    plain = fastdpo.dpo_loss(hidden, weight, labels, **args)
    assert "entropy" not in plain.metrics and "mean_token_accuracy" not in plain.metrics
    out = fastdpo.dpo_loss(hidden, weight, labels, extra_metrics=True, **args)
    assert abs(out.metrics["entropy"].item() - want_entropy.item()) <= 1e-5 * want_entropy.item()
    assert out.metrics["mean_token_accuracy"].item() == pytest.approx(want_acc.item(), abs=1e-6)
    assert set(plain.metrics) < set(out.metrics)
    assert out.loss.item() == plain.loss.item()


def test_missing_head_extras_are_a_clear_error():
    from fastdpo.losses import compute_dpo_loss

    hidden, weight, labels, _, _ = _batch("torch")
    stats = fastdpo.token_stats(hidden, weight, labels, backend="torch")
    mask = labels != IGNORE
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        compute_dpo_loss(stats, mask, LossConfig(use_weighting=True), reference_free=True)
    with pytest.raises(ValueError, match="extra_metrics=True needs"):
        compute_dpo_loss(stats, mask, LossConfig(extra_metrics=True), reference_free=True)


def test_trl_named_metrics():
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    out = fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.2,
                           backend="torch")
    logp, _, _, _, mask = _token_stats(hidden, weight, labels)
    ref_logp = _token_stats(ref_hidden, ref_weight, labels)[0]
    B = labels.shape[0] // 2
    pi, rho = logp.sum(-1), ref_logp.sum(-1)
    rc, rr = 0.2 * (pi[:B] - rho[:B]), 0.2 * (pi[B:] - rho[B:])
    want = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
            "rewards/accuracies": (rc > rr).double().mean(), "logps/chosen": pi[:B].mean(),
            "logps/rejected": pi[B:].mean()}
    for k, v in want.items():
        # The accuracy is a float32 fraction, as TRL logs it.
        tol = 1e-7 if k == "rewards/accuracies" else 1e-12
        assert out.metrics[k].item() == pytest.approx(v.item(), rel=1e-9, abs=tol), k
    assert {"logits/chosen", "logits/rejected"} <= set(out.metrics)


# --- configuration -------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(loss_type="dpo"), ValueError, "unknown loss_type 'dpo'"),
    (dict(loss_type=[]), ValueError, "at least one loss type"),
    (dict(loss_type=3), TypeError, "loss_type"),
    (dict(loss_type=["sigmoid", None]), TypeError, "loss_type entries"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights must have one weight"),
    (dict(loss_weights=[1.0, 2.0]), ValueError, "loss_weights must have one weight"),
    (dict(loss_weights="1"), TypeError, "loss_weights"),
    (dict(loss_weights=[float("nan")]), TypeError, "loss_weights"),
    (dict(loss_type="exo_pair"), ValueError, "exo_pair.*label_smoothing"),
    (dict(label_smoothing=float("nan")), TypeError, "label_smoothing"),
    (dict(discopop_tau="0.1"), TypeError, "discopop_tau"),
    (dict(loss_type="ipo", beta=0.0), ValueError, r"beta must be non-zero.*\['ipo'\] divide by"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
    (dict(f_divergence_type=None), ValueError, "f_divergence_type must be one of"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf")), TypeError,
     "f_alpha_divergence_coef"),
    (dict(use_weighting=True, loss_type="aot"), ValueError, "use_weighting"),
    (dict(use_weighting=True, loss_type=["sigmoid", "aot_unpaired"]), ValueError, "use_weighting"),
    (dict(use_weighting=1), TypeError, "use_weighting"),
    (dict(extra_metrics="yes"), TypeError, "extra_metrics"),
    (dict(average_log_prob=None), TypeError, "average_log_prob"),
    (dict(ld_alpha="half"), TypeError, "ld_alpha"),
    (dict(ld_alpha=0.5, average_log_prob=True), ValueError, "average_log_prob=True and ld_alpha"),
    (dict(average_log_prob=True, loss_type="ipo"), ValueError, "length twice"),
    (dict(average_log_prob=True, loss_type=["sigmoid", "sigmoid_norm"]), ValueError, "length twice"),
    (dict(beta=0.0), ValueError, "beta must be non-zero"),
    (dict(beta="0.1"), TypeError, "beta"),
    (dict(beta=True), TypeError, "beta"),
    (dict(loss_type="cpo", cpo_alpha=float("inf")), TypeError, "cpo_alpha"),
    (dict(loss_type="simpo", simpo_gamma=float("nan")), TypeError, "simpo_gamma"),
]
# f-divergences with every loss type they do not apply to (TRL rejects the same ones).
BAD_CONFIGS += [(dict(loss_type=t, f_divergence_type=f, **TYPE_OPTIONS[t]), ValueError, "applies only to loss types")
                for t in ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                          "simpo", "cpo", "orpo")
                for f in ("forward_kl", "js_divergence", "alpha_divergence")]


@pytest.mark.parametrize("kwargs,error,match", BAD_CONFIGS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_invalid_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossConfig(**kwargs)


def test_invalid_config_raised_at_build_time_everywhere():
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    with pytest.raises(ValueError, match="exo_pair"):
        fastdpo.FusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="loss_weights"):
        fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, backend="torch",
                         loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(TypeError, match="unexpected keyword"):
        LossConfig(rpo_alpha=1.0)


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_accepted_on_every_listed_type(f):
    for t in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"):
        LossConfig(loss_type=t, f_divergence_type=f, **TYPE_OPTIONS[t])


def test_config_normalises_lists():
    cfg = LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1, 0.5)
    assert cfg.loss_types == ("sigmoid", "sft") and hash(cfg) == hash(LossConfig(loss_type=("sigmoid", "sft"),
                                                                                   loss_weights=(1, 0.5)))
    assert LossConfig().loss_types == ("sigmoid",) and LossConfig().weights == (1.0,)
    assert LossConfig(loss_type=["simpo", "sft"]).needs_reference is False
    assert LossConfig(loss_type=["simpo", "apo_zero"]).needs_reference is True


def test_module_form():
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    opts = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], ld_alpha=0.5, extra_metrics=True)
    mod = fastdpo.FusedLinearDPOLoss(beta=0.2, backend="torch", **opts)
    a = mod(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    b = fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.2,
                         backend="torch", **opts)
    assert torch.equal(a.loss, b.loss) and "entropy" in a.metrics


def test_reference_implementation_shares_the_family():
    from fastdpo.reference import reference_dpo_loss

    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    opts = dict(loss_type=["discopop", "nca_pair"], use_weighting=True, extra_metrics=True)
    a = reference_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, **opts)
    want = expected_loss(hidden, weight, labels, opts, ref_hidden=ref_hidden, ref_weight=ref_weight)
    assert abs(a.loss.item() - want.item()) <= 1e-9 * abs(want.item())
    assert "mean_token_accuracy" in a.metrics


# --- parity with TRL 1.16's own _compute_loss ------------------------------------------------------------------

class _FakeOutputs:
    pass


class _FakeModel:
    """Stands in for a causal LM patched with TRL's fused head: returns per-token statistics of the
    labels from our float64 logits, shaped ``[2B, T]`` (TRL's shifted sequence length)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, hidden, weight):
        self.hidden, self.weight = hidden, weight

    def __call__(self, *, labels, **_):
        logp, lssp, entropy, top1, _ = _token_stats(self.hidden, self.weight, labels[:, 1:])
        out = _FakeOutputs()
        z = self.hidden @ self.weight.t()
        out.log_probs, out.log_sum_sq_probs, out.entropy, out.is_top1 = logp, lssp, entropy, top1
        out.mean_logits = z.mean(-1).detach()
        return out


def _trl_loss(opts, hidden, weight, labels, ref_hidden, ref_weight):
    from collections import defaultdict
    from contextlib import nullcontext
    from types import SimpleNamespace

    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    rows, T = labels.shape
    # TRL's inputs carry one more position (the first prompt token) and shift it away.
    input_ids = torch.zeros(rows, T + 1, dtype=torch.long)
    input_ids[:, 1:] = labels.clamp(min=0)
    completion_mask = torch.zeros(rows, T + 1, dtype=torch.long)
    completion_mask[:, 1:] = (labels != IGNORE).long()
    types = opts.get("loss_type", "sigmoid")
    types = [types] if isinstance(types, str) else list(types)
    model = _FakeModel(hidden, weight)
    trainer = SimpleNamespace(
        model=model, ref_model=_FakeModel(ref_hidden, ref_weight), beta=opts.get("beta", 0.1),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                    autocast=nullcontext),
        aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=opts.get("ld_alpha"),
        f_divergence_type=opts.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=opts.get("f_alpha_divergence_coef", 0.5), loss_types=types,
        loss_weights=opts.get("loss_weights") or [1.0] * len(types), label_smoothing=opts.get("label_smoothing", 0.0),
        use_weighting=opts.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=opts.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}
    ref_c, ref_r = trl_dpo.DPOTrainer.compute_ref_log_probs(trainer, trainer.ref_model, inputs)
    inputs.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    return trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False), trainer._metrics["train"]


TRL_CASES = [dict(loss_type=t, **TYPE_OPTIONS[t]) for t in TRL_LOSS_TYPES] + [
    dict(loss_type=["sigmoid", "ipo"], f_divergence_type="forward_kl"),
    dict(loss_type=["hinge", "sigmoid_norm"], f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.4),
    dict(loss_type=["robust", "apo_down"], label_smoothing=0.2, use_weighting=True),
    # TRL's alpha-divergence clamp table has no float64 entry, so that one is covered by the formulas above only.
]


@pytest.mark.parametrize("opts", TRL_CASES, ids=str)
def test_same_numbers_as_trl(opts):
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    want, trl_metrics = _trl_loss(opts, h, w, labels, ref_hidden, ref_weight)
    want_gh, want_gw = torch.autograd.grad(want, (h, w))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fastdpo.dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, backend="torch",
                           extra_metrics=True, **opts)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    # TRL builds exo_pair's ε as a float32 tensor, so its log(1−ε) and log ε carry float32 rounding.
    rel = 1e-7 if "exo_pair" in str(opts) else 1e-10
    assert out.loss.item() == pytest.approx(want.item(), rel=rel, abs=1e-12)
    assert rel_err(gh, want_gh) <= rel * 10 and rel_err(gw, want_gw) <= rel * 10
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):
        assert out.metrics[name].item() == pytest.approx(trl_metrics[name][-1], rel=1e-6, abs=1e-6), name


# --- what TRL 1.16 accepts, fastdpo accepts ----------------------------------------------------------------------

def _grid():
    """DPOConfig loss options TRL's DPOTrainer accepts, including values it ignores or that lie outside a loss's
    meaningful range: every TRL loss type with label smoothing across and beyond [0, 1], a negative β, LD-DPO's α
    outside [0, 1], and options that only other loss types read."""
    cases = []
    for t in TRL_LOSS_TYPES:
        base = {k: v for k, v in TYPE_OPTIONS[t].items() if k != "label_smoothing"}
        for eps in (-0.2, 0.3, 0.5, 0.7, 1.0, 1.5):
            cases.append(dict(loss_type=t, label_smoothing=eps, **base))
        cases.append(dict(loss_type=t, beta=-0.2, **TYPE_OPTIONS[t]))
        cases.append(dict(loss_type=t, ld_alpha=1.7, **TYPE_OPTIONS[t]))
    cases += [dict(ld_alpha=-0.4), dict(discopop_tau=0.3), dict(f_alpha_divergence_coef=0.2),
              dict(loss_type="discopop", discopop_tau=-0.5), dict(loss_type="discopop", discopop_tau=0.0)]
    return cases


def test_every_option_trl_accepts_is_accepted_with_its_numbers():
    """For every case of the grid, LossConfig accepts what TRL computes, and the loss and its
    gradients are TRL's own (including TRL's inf/NaN where an out-of-range ε makes the loss undefined)."""
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    warned = 0
    for opts in _grid():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = LossConfig(**opts)
        warned += bool(caught)
        h = hidden.clone().requires_grad_()
        want, _ = _trl_loss(opts, h, weight, labels, ref_hidden, ref_weight)
        got = fastdpo.dpo_loss(h, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, backend="torch",
                               config=config).loss
        # TRL builds exo_pair's ε as a float32 tensor.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, equal_nan=True, msg=str(opts))
        if torch.isfinite(want):
            want_g, = torch.autograd.grad(want, h)
            got_g, = torch.autograd.grad(got, h)
            scale = want_g.nan_to_num().abs().max()
            torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-6 * scale, equal_nan=True, msg=str(opts))
    assert warned >= len(_grid()) - 2 * len(TRL_LOSS_TYPES), "the ignored or out-of-range values should warn"


WARN_CONFIGS = [
    (dict(label_smoothing=0.1), "label_smoothing=0.1 is ignored by loss types \\['sigmoid'\\]"),
    (dict(loss_type=["hinge", "ipo"], label_smoothing=0.2), "label_smoothing=0.2 is ignored"),
    (dict(loss_type="robust", label_smoothing=0.5), "should lie in \\[0.0, 0.5\\)"),
    (dict(loss_type="exo_pair", label_smoothing=1.0), "infinite or NaN"),
    (dict(loss_type="aot", label_smoothing=1.5), "should lie in \\[0, 1\\]"),
    (dict(loss_type="simpo", label_smoothing=-0.1), "should lie in \\[0, 1\\]"),
    (dict(ld_alpha=1.5), "ld_alpha=1.5 is outside"),
    (dict(ld_alpha=0.5, loss_type="simpo"), "ld_alpha is ignored by loss types \\['simpo'\\]"),
    (dict(ld_alpha=0.5, loss_type=["sigmoid", "orpo"]), "ld_alpha is ignored by loss types \\['orpo'\\]"),
    (dict(beta=-1.0), "beta=-1.0 < 0"),
    (dict(discopop_tau=0.2), "discopop_tau=0.2 is ignored"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau should be > 0"),
    (dict(loss_type="sigmoid", simpo_gamma=1.0), "simpo_gamma=1.0 is ignored"),
    (dict(loss_type="simpo", cpo_alpha=0.5), "cpo_alpha=0.5 is ignored"),
    (dict(loss_type="cpo", cpo_alpha=-1.0), "cpo_alpha=-1.0 < 0"),
    (dict(f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef=0.3 is ignored"),
]


@pytest.mark.parametrize("kwargs,match", WARN_CONFIGS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_ignored_or_out_of_range_options_warn(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        LossConfig(**kwargs)


def test_meaningful_options_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in LOSS_TYPES:
            LossConfig(loss_type=t, **TYPE_OPTIONS[t])
        LossConfig(loss_type=["cpo", "simpo"], label_smoothing=0.1, ld_alpha=None)
        LossConfig(loss_type="robust", label_smoothing=0.49)
        LossConfig(ld_alpha=1.0, loss_type=["sigmoid", "ipo"])


@pytest.mark.parametrize("opts", [dict(ld_alpha=1.5), dict(ld_alpha=0.5, loss_type=["sigmoid", "orpo"]),
                                  dict(loss_type="cpo", cpo_alpha=-0.5), dict(beta=-0.2, loss_type="apo_down")],
                         ids=str)
def test_accepted_options_compute_the_formula(opts):
    with pytest.warns(UserWarning):
        _check("torch", opts, ref="hidden" if opts.get("loss_type") != "cpo" else "none")


# --- CPO/SimPO label smoothing, nll_loss, ORPO's metrics -------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", ["cpo", "simpo", ["simpo", "sft"]], ids=str)
def test_cpo_simpo_label_smoothing(backend, loss_type):
    opts = dict(loss_type=loss_type, **({"cpo_alpha": 0.7} if loss_type == "cpo" else {"simpo_gamma": 0.3}))
    out, _ = _check(backend, dict(label_smoothing=0.2, **opts), ref="none")
    hidden, weight, labels = (t.to(_dtype(backend)) if t.is_floating_point() else t for t in _batch(backend)[:3])
    unsmoothed = fastdpo.dpo_loss(hidden, weight, labels, backend=backend, reference_free=True, **opts)
    assert abs(out.loss.item() - unsmoothed.loss.item()) > 1e-3, "the smoothing should change the loss"


def _logits_and_mask(hidden, weight, labels):
    z = hidden.double() @ weight.double().t()
    return z, labels != IGNORE


class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cpo_and_simpo_match_trl_cpo_trainer(loss_type, eps):
    """fastdpo's ``cpo`` / ``simpo`` against TRL's ``CPOTrainer.cpo_loss`` (+ its NLL term for ``cpo``), on sequence
    log-probs and a cross-entropy computed here from float64 logits as CPOTrainer computes them."""
    from types import SimpleNamespace

    cpo_mod = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    hidden, weight, labels, _, _ = _batch("torch")
    B = labels.shape[0] // 2
    h = hidden.clone().requires_grad_()
    z, mask = _logits_and_mask(h, weight, labels)
    logsm = torch.log_softmax(z, -1)
    token = logsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    logps = token.sum(-1) / (mask.sum(-1) if loss_type == "simpo" else 1)
    fake = SimpleNamespace(alpha=0.0, beta=0.4, label_smoothing=eps, loss_type=loss_type, simpo_gamma=0.3,
                           accelerator=_Accel)
    losses, _, _ = cpo_mod.CPOTrainer.cpo_loss(fake, logps[:B], logps[B:])
    nll = F.cross_entropy(z[:B].reshape(-1, z.shape[-1]), labels[:B].reshape(-1), ignore_index=IGNORE)
    want = losses.mean() + (0.6 * nll if loss_type == "sigmoid" else 0.0)
    ours_type = "cpo" if loss_type == "sigmoid" else "simpo"
    h2 = hidden.clone().requires_grad_()
    option = {"cpo_alpha": 0.6} if ours_type == "cpo" else {"simpo_gamma": 0.3}
    out = fastdpo.dpo_loss(h2, weight, labels, reference_free=True, backend="torch", loss_type=ours_type, beta=0.4,
                           label_smoothing=eps, **option)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert rel_err(torch.autograd.grad(out.loss, h2)[0], torch.autograd.grad(want, h)[0]) <= 1e-10
    if ours_type == "cpo":
        assert out.metrics["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-12)
    else:
        assert "nll_loss" not in out.metrics


def test_orpo_metrics_match_trl_orpo_trainer():
    """``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen`` as TRL's ORPOTrainer defines and names them."""
    from types import SimpleNamespace

    orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    hidden, weight, labels, _, _ = _batch("torch")
    B = labels.shape[0] // 2
    z, mask = _logits_and_mask(hidden, weight, labels)
    token = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    avg = token.sum(-1) / mask.sum(-1)
    fake = SimpleNamespace(beta=0.25, accelerator=_Accel)
    losses, _, _, log_odds_ratio, log_odds_chosen = orpo_mod.ORPOTrainer.odds_ratio_loss(fake, avg[:B], avg[B:])
    nll = F.cross_entropy(z[:B].reshape(-1, z.shape[-1]), labels[:B].reshape(-1), ignore_index=IGNORE)
    out = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, backend="torch", loss_type="orpo", beta=0.25)
    # TRL computes the odds ratio in float32.
    assert out.loss.item() == pytest.approx((nll - losses.mean()).item(), rel=1e-6)
    assert out.metrics["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-12)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(log_odds_ratio.item(), rel=1e-6)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(log_odds_chosen.item(), rel=1e-6)
    # Independently, in float64: the mean log σ of the log odds ratio, and its mean.
    lo = (avg[:B] - avg[B:]) - (torch.log1p(-avg[:B].exp()) - torch.log1p(-avg[B:].exp()))
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(lo.mean().item(), rel=1e-10)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(_log_sig(lo).mean().item(), rel=1e-10)


@pytest.mark.parametrize("loss_type, logged", [("sft", True), (["sigmoid", "sft"], True), ("cpo", True),
                                               ("orpo", True), ("sigmoid", False), ("simpo", False)], ids=str)
def test_nll_loss_metric(loss_type, logged):
    hidden, weight, labels, ref_hidden, ref_weight = _batch("torch")
    B = labels.shape[0] // 2
    out = fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, backend="torch",
                           loss_type=loss_type)
    assert ("nll_loss" in out.metrics) is logged
    if logged:
        logp, _, _, _, mask = _token_stats(hidden, weight, labels)
        want = -logp[:B].sum() / mask[:B].sum()
        assert out.metrics["nll_loss"].item() == pytest.approx(want.item(), rel=1e-12)
    # As TRL's CPOTrainer: with cpo_alpha = 0 the NLL term is off and logged as 0.
    off = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, backend="torch", loss_type="cpo",
                           cpo_alpha=0.0)
    assert off.metrics["nll_loss"].item() == 0.0


# --- beta together with a LossConfig ------------------------------------------------------------------------------

def test_beta_that_differs_from_the_config_raises():
    """A ``beta`` keyword that disagrees with ``config.beta`` raises, also at its default value; one that agrees,
    or none, gives the config's loss."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    config = fastdpo.LossConfig(beta=0.3)
    with pytest.raises(ValueError, match="beta=5.0 differs from config.beta=0.3"):
        fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, beta=5.0, config=config, backend="torch")
    # Also when the keyword is the default value: it was given, and it disagrees.
    with pytest.raises(ValueError, match="beta"):
        fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, beta=0.1, config=config, backend="torch")
    same = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, beta=0.3, config=config, backend="torch")
    alone = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, config=config, backend="torch")
    want = reference_dpo_loss(hidden.double(), weight.double(), labels, reference_free=True, beta=0.3)
    assert torch.equal(same.loss, alone.loss)
    assert abs(alone.loss.item() - want.loss.item()) < 1e-5
    default = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, backend="torch")
    want = reference_dpo_loss(hidden.double(), weight.double(), labels, reference_free=True, beta=0.1)
    assert abs(default.loss.item() - want.loss.item()) < 1e-5


def test_module_takes_a_config_and_refuses_a_different_beta():
    """FusedLinearDPOLoss takes a LossConfig and gives dpo_loss's result with it; a different beta, a config that
    is not a LossConfig, or a config together with loss options is refused."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    config = fastdpo.LossConfig(beta=0.4, loss_type="ipo")
    module = fastdpo.FusedLinearDPOLoss(config=config, backend="torch")
    want = fastdpo.dpo_loss(hidden, weight, labels, reference_free=True, config=config, backend="torch")
    assert torch.equal(module(hidden, weight, labels, reference_free=True).loss, want.loss)
    with pytest.raises(ValueError, match="beta=0.1 differs from config.beta=0.4"):
        fastdpo.FusedLinearDPOLoss(0.1, config=config)
    with pytest.raises(TypeError, match="config must be a fastdpo.LossConfig"):
        fastdpo.FusedLinearDPOLoss(config={"beta": 0.4})
    with pytest.raises(ValueError, match="not both"):
        fastdpo.FusedLinearDPOLoss(config=config, loss_type="sigmoid")
