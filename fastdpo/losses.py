"""The DPO loss family: functions of the four sequence log-probs.

Everything here runs on ``[2B]`` / ``[2B, T]`` tensors after the fused kernels have produced the
per-token log-probs, so autograd through these few ops yields the one coefficient per token that the
kernel backward consumes. Any loss written here therefore works on every backend unchanged.

Notation (per pair ``b``; ``c`` chosen, ``r`` rejected):

- ``π_c, π_r``: policy sequence log-probs (sum over the completion tokens, or their mean with
  ``average_log_prob``, or LD-DPO's shared-plus-``ld_alpha``-tail sum with ``ld_alpha``).
- ``ρ_c, ρ_r``: the same for the reference (0 without one).
- ``u_c = π_c − ρ_c``, ``u_r = π_r − ρ_r``: the log-ratios.
- ``s_c = f'(u_c)``, ``s_r = f'(u_r)``: the f-divergence scores (``s = u`` for the default reverse KL);
  ``Δ = s_c − s_r``.
- ``|c|, |r|``: completion lengths (labelled tokens), ``ā_c, ā_r``: per-token mean policy log-probs.
- ``NLL``: mean negative log-prob of all chosen completion tokens of the batch.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ._packing import Sequences
from ._validate import finite

__all__ = ["LossConfig", "DPOOutput", "compute_dpo_loss", "LOSS_TYPES", "TRL_LOSS_TYPES", "F_DIVERGENCE_TYPES",
           "F_DIVERGENCE_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES"]

TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPES = TRL_LOSS_TYPES + ("simpo", "cpo", "orpo")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterization leaves a β·log Z(x) term that cancels only in the chosen−rejected score
# difference, so only the losses built on Δ have an f-divergence form (the same set TRL 1.16 accepts).
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                     "sft"})
# Loss types whose value does not depend on ρ: a mix made only of these needs no reference.
REFERENCE_FREE_LOSS_TYPES = frozenset({"simpo", "cpo", "orpo", "sft"})
# Loss types defined on per-token mean log-probs ā whatever ``average_log_prob``/``ld_alpha`` say.
_MEAN_LOGP_LOSS_TYPES = frozenset({"simpo", "orpo"})
_LABEL_SMOOTHING_LOSS_TYPES = frozenset({"exo_pair", "robust", "aot", "aot_unpaired", "cpo", "simpo"})
# Loss types that divide by β: β = 0 is undefined for them (TRL 1.16 fails on it with a ZeroDivisionError).
_DIVIDE_BY_BETA_LOSS_TYPES = frozenset({"ipo", "sppo_hard"})
# The types that read each option which only some types use, for the "ignored" warnings.
_OPTION_READERS = {"discopop_tau": frozenset({"discopop"}), "simpo_gamma": frozenset({"simpo"}),
                   "cpo_alpha": frozenset({"cpo"})}
_LENGTH_NORMALISED_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})
_SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# The exp() of the α-divergence score is clamped here, as TRL does for fp32, so it stays finite.
_ALPHA_EXP_CLAMP = 80.0


class _Pairs:
    """The ``[B]`` quantities the loss formulas read; see the module docstring for the notation."""

    def __init__(self, **values):
        self.__dict__.update(values)


# --- the loss types -------------------------------------------------------------------------------------------
# Each maps (pairs, config) -> per-pair loss [B]. They follow TRL 1.16 DPOTrainer._compute_loss line by line
# where TRL has the type, so that the same config gives the same numbers.

def _sigmoid(p, cfg):
    """DPO (arXiv 2305.18290): ``−log σ(β·Δ)``."""
    return -F.logsigmoid(cfg.beta * p.delta)


def _hinge(p, cfg):
    """SLiC (arXiv 2305.10425): ``max(0, 1 − β·Δ)``."""
    return torch.relu(1 - cfg.beta * p.delta)


def _ipo(p, cfg):
    """IPO (arXiv 2310.12036, eq. 17), length-normalised as TRL: ``(s_c/|c| − s_r/|r| − 1/(2β))²``."""
    return (p.chosen_scores / p.chosen_len - p.rejected_scores / p.rejected_len - 1 / (2 * cfg.beta)) ** 2


def _exo_pair(p, cfg):
    """EXO-pref (arXiv 2402.00856, eq. 16) with ε = ``label_smoothing``:
    ``σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)``."""
    x = cfg.beta * p.delta
    eps = cfg.label_smoothing
    return (torch.sigmoid(x) * (F.logsigmoid(x) - _log(1 - eps, math.log1p(-eps) if eps < 1 else None))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - _log(eps)))


def _log(x, value=None):
    """``log x`` as a Python float, −inf at 0 and NaN below (as torch gives them: ε outside (0, 1) is accepted, as
    TRL accepts it), where ``math.log`` raises; ``value`` is an accurate form of it for ``x > 0``."""
    if x > 0:
        return math.log(x) if value is None else value
    return -math.inf if x == 0 else math.nan


def _nca_pair(p, cfg):
    """NCA (arXiv 2402.05369): ``−log σ(βu_c) − ½ log σ(−βu_c) − ½ log σ(−βu_r)``."""
    rc, rr = cfg.beta * p.chosen_logratios, cfg.beta * p.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def _robust(p, cfg):
    """Robust DPO (arXiv 2403.00409) with flip rate ε = ``label_smoothing``:
    ``(−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)``."""
    x = cfg.beta * p.delta
    eps = cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _bco_pair(p, cfg):
    """BCO, paired form (arXiv 2404.04656): ``−log σ(βu_c) − log σ(−βu_r)``."""
    return -F.logsigmoid(cfg.beta * p.chosen_logratios) - F.logsigmoid(-cfg.beta * p.rejected_logratios)


def _sppo_hard(p, cfg):
    """SPPO with hard labels (arXiv 2405.00675): ``(u_c − 1/(2β))² + (u_r + 1/(2β))²``."""
    return (p.chosen_logratios - 0.5 / cfg.beta) ** 2 + (p.rejected_logratios + 0.5 / cfg.beta) ** 2


def _smoothed_logsigmoid(x, eps):
    """Conservative DPO's smoothed logistic loss: ``−(1−ε)·log σ(x) − ε·log σ(−x)``."""
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def _smoothed_sigmoid(delta, cfg):
    return _smoothed_logsigmoid(cfg.beta * delta, cfg.label_smoothing)


def _aot(p, cfg):
    """AOT, paired (arXiv 2406.05882): sort ``π_c − π_r`` and ``ρ_c − ρ_r`` across the batch, ``d`` their
    difference rank by rank; ``−(1−ε)·log σ(βd) − ε·log σ(−βd)``. The per-pair losses are in sorted order."""
    policy, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    ref, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(policy - ref, cfg)


def _aot_unpaired(p, cfg):
    """AOT, unpaired (arXiv 2406.05882): sort ``u_c`` and ``u_r`` across the batch separately, then as ``aot``."""
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_sigmoid(chosen - rejected, cfg)


def _apo_zero(p, cfg):
    """APO-zero (arXiv 2408.06266, eq. 7): ``1 − σ(βu_c) + σ(βu_r)``."""
    return 1 - torch.sigmoid(cfg.beta * p.chosen_logratios) + torch.sigmoid(cfg.beta * p.rejected_logratios)


def _apo_down(p, cfg):
    """APO-down (arXiv 2408.06266, eq. 8): ``σ(βu_c) + 1 − σ(β(u_c − u_r))``."""
    return (torch.sigmoid(cfg.beta * p.chosen_logratios)
            + 1 - torch.sigmoid(cfg.beta * (p.chosen_logratios - p.rejected_logratios)))


def _discopop(p, cfg):
    """DiscoPOP (arXiv 2406.08414, eq. 5), ``x = βΔ``, ``m = σ(x/τ)``: ``(1−m)·(−log σ(x)) + m·e^(−x)``."""
    x = cfg.beta * p.delta
    m = torch.sigmoid(x / cfg.discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


def _sft(p, cfg):
    """The NLL of the chosen completions (RPO's term, arXiv 2404.19733): ``NLL`` for every pair."""
    return p.nll.expand(p.delta.shape[0])


def _sigmoid_norm(p, cfg):
    """Length-normalised DPO, as TRL: ``−log σ(β·(s_c/|c| − s_r/|r|))``."""
    return -F.logsigmoid(cfg.beta * (p.chosen_scores / p.chosen_len - p.rejected_scores / p.rejected_len))


def _simpo(p, cfg):
    """SimPO (Meng et al., arXiv 2405.14734, eq. 6), no reference, length-normalised, target margin γ, with
    ``x = β·(ā_c − ā_r) − γ`` (γ = ``simpo_gamma``): ``−(1−ε)·log σ(x) − ε·log σ(−x)``, ε = ``label_smoothing``
    (TRL's CPOTrainer with ``loss_type="simpo"``; ε = 0 is the paper's loss)."""
    return _smoothed_logsigmoid(cfg.beta * (p.chosen_mean_logps - p.rejected_mean_logps) - cfg.simpo_gamma,
                                cfg.label_smoothing)


def _cpo(p, cfg):
    """CPO (Xu et al., arXiv 2401.08417, eq. 7), no reference, with ``x = β·(π_c − π_r)``:
    ``−(1−ε)·log σ(x) − ε·log σ(−x) + α·NLL`` with α = ``cpo_alpha``, ε = ``label_smoothing`` (TRL's CPOTrainer
    with ``loss_type="sigmoid"``; ε = 0 is the paper's loss)."""
    return (_smoothed_logsigmoid(cfg.beta * (p.chosen_logps - p.rejected_logps), cfg.label_smoothing)
            + cfg.cpo_alpha * p.nll)


def _log1mexp(x):
    """``log(1 − eˣ)`` for ``x < 0``, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo_log_odds(p):
    """``log odds(ā_c) − log odds(ā_r)`` with ``log odds(a) = a − log(1 − eᵃ)``; ā is clamped just below 0 so
    that a completion without tokens (ā = 0) stays finite."""
    tiny = torch.finfo(p.chosen_mean_logps.dtype).eps
    ac = p.chosen_mean_logps.clamp(max=-tiny)
    ar = p.rejected_mean_logps.clamp(max=-tiny)
    return (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))


def _orpo(p, cfg):
    """ORPO (Hong et al., arXiv 2403.07691, eqs. 6-7), no reference, λ = β as in TRL's ORPOTrainer:
    ``NLL − β·log σ(log odds(ā_c) − log odds(ā_r))`` (see :func:`_orpo_log_odds`)."""
    return p.nll - cfg.beta * F.logsigmoid(_orpo_log_odds(p))


_PAIR_LOSSES = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo, "cpo": _cpo, "orpo": _orpo,
}
assert tuple(_PAIR_LOSSES) == LOSS_TYPES


def _f_scores(logratios, cfg):
    """``f'(u)`` of the configured f-divergence (f-DPO, arXiv 2309.16240), as TRL computes it."""
    kind = cfg.f_divergence_type
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(cfg.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a1 = cfg.f_alpha_divergence_coef - 1.0
        return torch.expm1(torch.clamp(a1 * logratios, max=_ALPHA_EXP_CLAMP)) / a1
    # reverse KL, and the α → 1 limit of the α-divergence, which is reverse KL too.
    return logratios


# --- the configuration ------------------------------------------------------------------------------------------

def _check_number(name, value, *, low=None, high=None, low_open=False, high_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def _warn(message):
    # stacklevel 4: past __post_init__ and the dataclass __init__, at the caller that built the config.
    warnings.warn(message, UserWarning, stacklevel=4)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """Options of the DPO loss, named as in TRL's ``DPOConfig`` (plus SimPO, CPO and ORPO).

    Every combination is checked when the config is built. Those TRL 1.16's DPOTrainer refuses (and those of
    fastdpo's own options that contradict each other) raise a ``ValueError`` naming the option; those TRL accepts
    are accepted too, with a ``UserWarning`` where an option is ignored by every chosen loss type or lies outside
    its loss's meaningful range (TRL ignores such values silently, or logs a warning).

    Attributes:
        beta: temperature of the implicit reward ``β·(π − ρ)``; non-zero (β < 0 warns; β = 0 is refused: the loss
            would be constant, and ``ipo``/``sppo_hard`` divide by β). For ``ipo`` it is IPO's τ, for ``orpo`` the
            weight λ of the odds-ratio term (as in TRL's ORPOConfig).
        loss_type: one name of ``LOSS_TYPES`` or a list of them (stored as a tuple). The loss is
            ``Σ_i loss_weights[i] · mean_b loss_i(b)``; see each type's formula in this module.
        loss_weights: one weight per loss type; default all 1.
        label_smoothing: ε of ``exo_pair`` (needs ε > 0; meaningful in (0, 1)), ``robust`` (the flip rate,
            meaningful in [0, 0.5)), ``aot``, ``aot_unpaired``, ``cpo`` and ``simpo`` (conservative smoothing
            ``−(1−ε)·log σ(x) − ε·log σ(−x)`` as in TRL's CPOTrainer). Ignored, with a warning, by the other loss
            types (as TRL 1.16's DPOTrainer ignores it for ``sigmoid``, ``hinge``, ...).
        discopop_tau: τ of ``discopop``; meaningful > 0 (others warn).
        f_divergence_type: ``reverse_kl`` (standard DPO), ``forward_kl`` (``f'(t) = 1 − 1/t``),
            ``js_divergence`` (``f'(t) = log(2t/(t+1))``) or ``alpha_divergence``
            (``f'(t) = (t^(α−1) − 1)/(α−1)``, exponent clamped at 80); anything but ``reverse_kl`` needs all loss
            types in ``F_DIVERGENCE_LOSS_TYPES``.
        f_alpha_divergence_coef: α of ``alpha_divergence`` (within 1e-6 of 1 means reverse KL).
        average_log_prob: ``π`` (and ``ρ`` when computed here) is the per-token mean over the completion instead
            of the sum. Not with ``ipo``/``sigmoid_norm`` (they already divide by the length) nor ``ld_alpha``.
        ld_alpha: LD-DPO (arXiv 2409.06411): the tokens of each completion beyond the shorter completion of
            its pair count with weight ``ld_alpha``: ``π = Σ_{t ≤ min(|c|,|r|)} logp_t + α·Σ_{t >} logp_t``. The
            paper's range is [0, 1]; other values are accepted with a warning, as TRL accepts them. Applied to the
            policy and to a reference computed in the same call; precomputed ``ref_logps`` are taken as given.
            Ignored (with a warning) by ``simpo``/``orpo``.
        use_weighting: WPO (arXiv 2406.11827, eq. 2): every per-pair loss is multiplied by ``w_c·w_r`` with
            ``w = exp(mean_t(logp_t − log Σ_v p_v²))`` over the completion, without gradient. Not with the sorting
            ``aot``/``aot_unpaired`` (the weights would no longer line up with their pairs).
        simpo_gamma: SimPO's target reward margin γ (``simpo_gamma`` as in TRL's CPOConfig).
        cpo_alpha: weight of CPO's NLL term (``cpo_alpha`` as in TRL's CPOConfig).
        extra_metrics: have the head compute, and the metrics report, ``entropy`` (mean over all completion
            tokens) and ``mean_token_accuracy`` (fraction of chosen completion tokens that are the argmax). They are
            also reported whenever the head computed its extras anyway (``use_weighting``, the integrations).
    """

    beta: float = 0.1
    loss_type: str | tuple = "sigmoid"
    loss_weights: tuple | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    average_log_prob: bool = False
    ld_alpha: float | None = None
    use_weighting: bool = False
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    extra_metrics: bool = False

    def __post_init__(self):
        # NumPy scalars are numbers too; stored as Python floats so that the config compares, hashes and prints
        # the same whatever the caller's scalar type (bools are refused by _check_number below).
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value) not in (int, float):
                object.__setattr__(self, f.name, float(value))
        _check_number("beta", self.beta)
        types = self._normalise_loss_type(self.loss_type)
        object.__setattr__(self, "loss_type", types if isinstance(self.loss_type, (list, tuple)) else types[0])
        if self.loss_weights is not None:
            if isinstance(self.loss_weights, (str, bytes)) or not hasattr(self.loss_weights, "__len__"):
                raise TypeError(f"loss_weights must be a list of numbers, got {self.loss_weights!r}")
            weights = tuple(self.loss_weights)
            for w in weights:
                _check_number("each of loss_weights", w)
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(types):
                raise ValueError(f"loss_weights must have one weight per loss type: got {len(weights)} weights for "
                                 f"{len(types)} loss types {list(types)}")
            object.__setattr__(self, "loss_weights", weights)
        used = set(types)

        # What TRL 1.16's DPOTrainer refuses is refused here too; what it accepts is accepted, with a warning where
        # the value is ignored or outside its loss's meaningful range.
        if self.beta == 0:
            divide = used & _DIVIDE_BY_BETA_LOSS_TYPES
            raise ValueError(f"beta must be non-zero, got {self.beta!r}: every reward β·(π − ρ) would be 0, so the "
                             f"loss is constant" + (f" and {sorted(divide)} divide by β" if divide else ""))
        if self.beta < 0:
            _warn(f"beta={self.beta!r} < 0 rewards the rejected completions over the chosen ones")
        _check_number("label_smoothing", self.label_smoothing)
        eps = self.label_smoothing
        if eps != 0 and not used & _LABEL_SMOOTHING_LOSS_TYPES:
            _warn(f"label_smoothing={eps!r} is ignored by loss types {list(types)}; it applies to "
                  f"{sorted(_LABEL_SMOOTHING_LOSS_TYPES)} only")
        if "exo_pair" in used and eps == 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3), got 0")
        if "exo_pair" in used and not 0 < eps < 1:
            _warn(f"loss_type 'exo_pair' with label_smoothing={eps!r} outside (0, 1): its loss is infinite or NaN")
        if "robust" in used and not 0 <= eps < 0.5:
            _warn(f"loss_type 'robust': label_smoothing (the label flip rate) should lie in [0.0, 0.5), got {eps!r}")
        smoothed = used & {"aot", "aot_unpaired", "cpo", "simpo"}
        if smoothed and not 0 <= eps <= 1:
            _warn(f"loss types {sorted(smoothed)}: label_smoothing should lie in [0, 1], got {eps!r}")
        _check_number("discopop_tau", self.discopop_tau)
        if "discopop" in used and self.discopop_tau <= 0:
            _warn(f"loss_type 'discopop': discopop_tau should be > 0, got {self.discopop_tau!r}")

        if not isinstance(self.f_divergence_type, str) or self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got "
                             f"{self.f_divergence_type!r}")
        _check_number("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        if self.f_divergence_type != "reverse_kl" and not used <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies only to loss types "
                             f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, not to {sorted(used - F_DIVERGENCE_LOSS_TYPES)}; "
                             f"use f_divergence_type='reverse_kl' with these")
        if self.f_divergence_type != "alpha_divergence" and self.f_alpha_divergence_coef != 0.5:
            _warn(f"f_alpha_divergence_coef={self.f_alpha_divergence_coef!r} is ignored: it applies to "
                  f"f_divergence_type='alpha_divergence' only")

        for name in ("average_log_prob", "use_weighting", "extra_metrics"):
            _check_bool(name, getattr(self, name))
        _check_number("ld_alpha", self.ld_alpha, allow_none=True)
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            _warn(f"ld_alpha={self.ld_alpha!r} is outside LD-DPO's [0, 1]: the tokens beyond the shorter completion "
                  f"count {'more than the shared ones' if self.ld_alpha > 1 else 'negatively'}")
        if self.average_log_prob and used & _LENGTH_NORMALISED_LOSS_TYPES:
            raise ValueError(f"average_log_prob=True with loss types {sorted(used & _LENGTH_NORMALISED_LOSS_TYPES)} "
                             f"would divide by the completion length twice: they already normalise by it")
        if self.average_log_prob and self.ld_alpha is not None:
            raise ValueError("average_log_prob=True and ld_alpha are two different length corrections; use one")
        if self.ld_alpha is not None and used & _MEAN_LOGP_LOSS_TYPES:
            _warn(f"ld_alpha is ignored by loss types {sorted(used & _MEAN_LOGP_LOSS_TYPES)}: they always use "
                  f"per-token mean log-probs")
        if self.use_weighting and used & _SORTING_LOSS_TYPES:
            raise ValueError(f"use_weighting=True is not supported with loss types {sorted(used & _SORTING_LOSS_TYPES)}"
                             f": they sort the batch, which would misalign the per-pair weights")
        _check_number("simpo_gamma", self.simpo_gamma)
        _check_number("cpo_alpha", self.cpo_alpha)
        if "cpo" in used and self.cpo_alpha < 0:
            _warn(f"loss_type 'cpo': cpo_alpha={self.cpo_alpha!r} < 0 pushes the chosen completions' likelihood down")
        defaults = {f.name: f.default for f in fields(self)}
        for name, readers in _OPTION_READERS.items():
            if getattr(self, name) != defaults[name] and not used & readers:
                _warn(f"{name}={getattr(self, name)!r} is ignored: it applies to loss types {sorted(readers)} only")

    @staticmethod
    def _normalise_loss_type(loss_type):
        names = (loss_type,) if isinstance(loss_type, str) else loss_type
        if not isinstance(names, (list, tuple)):
            raise TypeError(f"loss_type must be a loss name or a list of them, got {loss_type!r}")
        if not names:
            raise ValueError("loss_type must name at least one loss type, got an empty list")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"loss_type entries must be strings, got {name!r}")
            if name not in _PAIR_LOSSES:
                raise ValueError(f"unknown loss_type {name!r}; expected one of {list(LOSS_TYPES)}")
        return tuple(names)

    @property
    def loss_types(self) -> tuple:
        """The loss types as a tuple, even when a single name was given."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def weights(self) -> tuple:
        """``loss_weights``, or 1.0 for every loss type."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_reference(self) -> bool:
        """False when every loss type is independent of the reference (``REFERENCE_FREE_LOSS_TYPES``)."""
        return not set(self.loss_types) <= REFERENCE_FREE_LOSS_TYPES

    @property
    def needs_token_extras(self) -> bool:
        """Whether the per-token extras (entropy, ``log Σp²``, top-1) must be computed by the head."""
        return self.use_weighting or self.extra_metrics


@dataclass
class DPOOutput:
    """What :func:`fastdpo.dpo_loss` returns.

    Attributes:
        loss: scalar loss, ``Σ_i weight_i · mean_b loss_i(b)``.
        chosen_logps, rejected_logps: ``[B]`` policy sequence log-probs ``π`` (differentiable).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs (zeros without a reference).
        chosen_rewards, rejected_rewards: ``[B]`` detached ``β·(π − ρ)``.
        losses: ``[B]`` per-pair losses ``Σ_i weight_i · loss_i(b)`` (so ``loss = losses.mean()``); ``aot``
            terms are in the batch's sorted order, not the pairs'.
        metrics: scalar tensors named as TRL's DPOTrainer logs them; with an ``sft``/``cpo``/``orpo`` term also
            ``nll_loss`` (the mean NLL of the chosen tokens, as TRL's CPO/ORPO trainers log it), with ``orpo`` also
            ``log_odds_ratio`` (mean ``log σ`` of the log odds ratio) and ``log_odds_chosen`` (mean log odds ratio),
            as TRL's ORPOTrainer names them.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    losses: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values.detach().to(torch.float32)
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), torch.zeros_like(values.sum()))


def _ld_weights(mask: torch.Tensor, alpha: float, dtype, seqs: Sequences) -> torch.Tensor:
    """LD-DPO token weights (the tokens' layout): 1 on the first ``min(|c|, |r|)`` completion tokens of each
    sequence, ``alpha`` on the rest (TRL's shared and tail masks), 0 off the completion."""
    position = seqs.cumsum(mask)
    lengths = seqs.sum(mask)
    B = seqs.pairs
    shared = seqs.per_token(torch.minimum(lengths[:B], lengths[B:]).repeat(2))
    tail = mask & (position > shared)
    return (mask & ~tail).to(dtype) + alpha * tail.to(dtype)


def _sequence(token_logps, counts, config, ld, seqs):
    if ld is not None:
        return seqs.sum(token_logps * ld)
    total = seqs.sum(token_logps)
    return total / counts if config.average_log_prob else total


def compute_dpo_loss(stats: dict, mask: torch.Tensor, config: LossConfig, *, ref_token_logps=None,
                     ref_logps=None, reference_free=False, cu_seqlens=None) -> DPOOutput:
    """The loss, rewards and metrics from per-token statistics of the policy (and reference).

    Args:
        stats: per-token tensors ``[2B, T]`` (``[L]`` packed) as produced by the fused head, 0 off the mask: ``logp``
            (differentiable), ``mean_logit``; ``log_sum_sq_probs`` with ``use_weighting``; ``entropy`` and
            ``is_top1`` with ``extra_metrics`` (when present they are reported in any case).
        mask: ``[2B, T]`` (``[L]`` packed) bool, the completion tokens.
        config: the loss options.
        ref_token_logps: ``[2B, T]`` reference per-token log-probs (0 off the mask), or None.
        ref_logps: ``[2B]`` precomputed reference sequence log-probs, used as given, or None.
        reference_free: no reference (``ρ = 0``); also what happens when neither reference is given.
        cu_seqlens: ``[2B+1]`` offsets when the per-token tensors are a packed ``[L]`` stream (chosen 1..B then
            rejected 1..B, see :mod:`fastdpo._packing`); per-sequence sums are then segment sums. Taken as checked.
    """
    logp = stats["logp"]
    dtype = logp.dtype
    seqs = Sequences(mask, cu_seqlens)
    B = seqs.pairs
    counts = seqs.sum(mask).to(dtype).clamp(min=1)
    ld = _ld_weights(mask, config.ld_alpha, dtype, seqs) if config.ld_alpha is not None else None
    pol = _sequence(logp, counts, config, ld, seqs)
    if ref_token_logps is not None and not reference_free:
        ref = _sequence(ref_token_logps.detach().to(dtype), counts, config, ld, seqs)
    elif ref_logps is not None and not reference_free:
        ref = ref_logps.detach().to(dtype)
    else:
        ref = torch.zeros_like(pol.detach())
    pc, pr = pol[:B], pol[B:]
    rc, rr = ref[:B], ref[B:]
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    chosen_scores, rejected_scores = _f_scores(chosen_ratio, config), _f_scores(rejected_ratio, config)
    types = config.loss_types
    used = set(types)
    pairs = _Pairs(
        chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
        chosen_logratios=chosen_ratio, rejected_logratios=rejected_ratio,
        chosen_scores=chosen_scores, rejected_scores=rejected_scores, delta=chosen_scores - rejected_scores,
        chosen_len=counts[:B], rejected_len=counts[B:], nll=None, chosen_mean_logps=None, rejected_mean_logps=None,
    )
    if used & {"sft", "cpo", "orpo"}:
        # Mean over all chosen tokens of the batch (TRL's sft, and the cross-entropy of CPO/ORPO), 0 without any.
        pairs.nll = -seqs.chosen(logp).sum() / seqs.chosen(mask).sum().clamp(min=1).to(dtype)
    if used & _MEAN_LOGP_LOSS_TYPES:
        means = seqs.sum(logp) / counts
        pairs.chosen_mean_logps, pairs.rejected_mean_logps = means[:B], means[B:]

    pair_weights = None
    if config.use_weighting:
        lssp = stats.get("log_sum_sq_probs")
        if lssp is None:
            raise ValueError("use_weighting=True needs stats['log_sum_sq_probs'] (compute the head with extras=True)")
        with torch.no_grad():
            aligned = seqs.sum((logp.detach() - lssp.to(dtype)) * mask) / counts
            w = torch.exp(aligned)
            pair_weights = w[:B] * w[B:]

    losses = None
    for name, weight in zip(types, config.weights):
        per_pair = _PAIR_LOSSES[name](pairs, config)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        losses = weight * per_pair if losses is None else losses + weight * per_pair
    loss = losses.mean()

    chosen_rewards = config.beta * chosen_ratio.detach()
    rejected_rewards = config.beta * rejected_ratio.detach()
    cmask, rmask = seqs.chosen(mask), seqs.rejected(mask)
    mean_logit = stats["mean_logit"]
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
        "logits/chosen": _masked_mean(seqs.chosen(mean_logit), cmask),
        "logits/rejected": _masked_mean(seqs.rejected(mean_logit), rmask),
    }
    if pairs.nll is not None:
        # As TRL's CPOTrainer, which skips (and logs 0 for) the NLL when its weight cpo_alpha is 0.
        nll_off = used == {"cpo"} and config.cpo_alpha == 0
        metrics["nll_loss"] = torch.zeros_like(pairs.nll.detach()) if nll_off else pairs.nll.detach()
    if "orpo" in used:
        # Named and defined as TRL's ORPOTrainer logs them: the mean log σ of the log odds ratio, and its mean.
        log_odds = _orpo_log_odds(pairs).detach()
        metrics["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
        metrics["log_odds_chosen"] = log_odds.mean()
    have_extras = stats.get("entropy") is not None and stats.get("is_top1") is not None
    if config.extra_metrics and not have_extras:
        raise ValueError("extra_metrics=True needs stats['entropy'] and stats['is_top1'] (compute the head with "
                         "extras=True)")
    # Reported whenever the head computed them (they cost nothing more then), not only when asked.
    if have_extras:
        metrics["entropy"] = _masked_mean(stats["entropy"], mask)
        metrics["mean_token_accuracy"] = _masked_mean(seqs.chosen(stats["is_top1"]), cmask)
    return DPOOutput(loss=loss, chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                     chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, losses=losses,
                     metrics=metrics)
