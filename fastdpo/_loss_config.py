"""The options of the DPO loss (:class:`LossConfig`), checked when a config is built, and the sets of loss types
that the checks (and the loss) read. The loss types themselves are in :mod:`fastdpo.losses`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

from ._validate import flag, is_real, number

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


# --- the checks ------------------------------------------------------------------------------------------

def _warn(message):
    # stacklevel 5: past a check of __post_init__, __post_init__ and the dataclass __init__, at the caller that
    # built the config.
    warnings.warn(message, UserWarning, stacklevel=5)


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
        self._store_python_numbers()
        types = self._check_loss_types()
        used = set(types)
        # What TRL 1.16's DPOTrainer refuses is refused here too; what it accepts is accepted, with a warning where
        # the value is ignored or outside its loss's meaningful range.
        self._check_beta(used)
        self._check_label_smoothing(types, used)
        self._check_f_divergence(used)
        self._check_length_options(used)
        self._check_type_options(used)

    def _store_python_numbers(self):
        # NumPy scalars are numbers too; stored as Python floats so that the config compares, hashes and prints
        # the same whatever the caller's scalar type (bools are refused by the number checks below).
        for f in fields(self):
            value = getattr(self, f.name)
            if is_real(value) and type(value) not in (int, float):
                object.__setattr__(self, f.name, float(value))

    def _check_loss_types(self) -> tuple:
        """``loss_type`` (stored as a tuple when a list was given) and ``loss_weights``; returns the types."""
        number("beta", self.beta)
        types = self._normalise_loss_type(self.loss_type)
        object.__setattr__(self, "loss_type", types if isinstance(self.loss_type, (list, tuple)) else types[0])
        if self.loss_weights is not None:
            if isinstance(self.loss_weights, (str, bytes)) or not hasattr(self.loss_weights, "__len__"):
                raise TypeError(f"loss_weights must be a list of numbers, got {self.loss_weights!r}")
            weights = tuple(number("each of loss_weights", w) for w in self.loss_weights)
            if len(weights) != len(types):
                raise ValueError(f"loss_weights must have one weight per loss type: got {len(weights)} weights for "
                                 f"{len(types)} loss types {list(types)}")
            object.__setattr__(self, "loss_weights", weights)
        return types

    def _check_beta(self, used):
        if self.beta == 0:
            divide = used & _DIVIDE_BY_BETA_LOSS_TYPES
            raise ValueError(f"beta must be non-zero, got {self.beta!r}: every reward β·(π − ρ) would be 0, so the "
                             f"loss is constant" + (f" and {sorted(divide)} divide by β" if divide else ""))
        if self.beta < 0:
            _warn(f"beta={self.beta!r} < 0 rewards the rejected completions over the chosen ones")

    def _check_label_smoothing(self, types, used):
        number("label_smoothing", self.label_smoothing)
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

    def _check_f_divergence(self, used):
        if not isinstance(self.f_divergence_type, str) or self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got "
                             f"{self.f_divergence_type!r}")
        number("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        if self.f_divergence_type != "reverse_kl" and not used <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies only to loss types "
                             f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, not to {sorted(used - F_DIVERGENCE_LOSS_TYPES)}; "
                             f"use f_divergence_type='reverse_kl' with these")
        if self.f_divergence_type != "alpha_divergence" and self.f_alpha_divergence_coef != 0.5:
            _warn(f"f_alpha_divergence_coef={self.f_alpha_divergence_coef!r} is ignored: it applies to "
                  f"f_divergence_type='alpha_divergence' only")

    def _check_length_options(self, used):
        """The flags, and the two length corrections ``average_log_prob`` and ``ld_alpha`` (and WPO's weights)."""
        for name in ("average_log_prob", "use_weighting", "extra_metrics"):
            flag(name, getattr(self, name))
        number("ld_alpha", self.ld_alpha, allow_none=True)
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

    def _check_type_options(self, used):
        """The options that only one loss type reads: checked, and a warning where no chosen type reads them."""
        number("discopop_tau", self.discopop_tau)
        if "discopop" in used and self.discopop_tau <= 0:
            _warn(f"loss_type 'discopop': discopop_tau should be > 0, got {self.discopop_tau!r}")
        number("simpo_gamma", self.simpo_gamma)
        number("cpo_alpha", self.cpo_alpha)
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
            if name not in LOSS_TYPES:
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
