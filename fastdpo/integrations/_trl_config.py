"""A TRL ``DPOConfig`` as the :class:`fastdpo.LossConfig` that computes the loss it asks for
(:func:`loss_config_from_dpo_config`). Imported by :mod:`fastdpo.integrations.trl` once it has checked TRL's
version."""

from __future__ import annotations

import dataclasses

from trl import DPOConfig

from ..losses import LossConfig

# DPOConfig fields that define the loss; the trainer maps each onto the LossConfig field of the same name.
DPO_LOSS_FIELDS = ("beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type",
                   "f_alpha_divergence_coef", "ld_alpha", "use_weighting", "discopop_tau")


def _dpo_config_defaults() -> dict:
    defaults = {}
    for f in dataclasses.fields(DPOConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _normalize(name, value):
    if name == "loss_type":
        if isinstance(value, str):
            value = [value]
        value = list(value)
    if name == "loss_weights" and value is not None:
        value = [float(v) for v in value]
    return value


def loss_config_from_dpo_config(args: DPOConfig | None) -> LossConfig:
    """The :class:`fastdpo.LossConfig` that computes the loss a ``DPOConfig`` asks for.

    Raises:
        ValueError: naming the DPOConfig field, when an option is set that fastdpo's loss does not support.
    """
    defaults = _dpo_config_defaults()
    supported = {f.name for f in dataclasses.fields(LossConfig)}
    kwargs = {}
    for name in DPO_LOSS_FIELDS:
        value = _normalize(name, getattr(args, name) if args is not None else defaults[name])
        default = _normalize(name, defaults[name])
        if name in supported:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        elif value != default:
            raise ValueError(f"DPOConfig.{name}={value!r} is not supported by fastdpo's loss (fastdpo.LossConfig has "
                             f"no {name!r}); leave it at its default {default!r} or use trl's DPOTrainer")
    try:
        return LossConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"DPOConfig: fastdpo cannot compute this loss: {err}") from err
