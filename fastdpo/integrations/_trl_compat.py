"""Which TRL versions :mod:`fastdpo.integrations.trl` runs on, and the TRL internals it relies on.

fastdpo overrides methods of TRL's ``DPOTrainer`` and replaces TRL's per-token fused head, so it depends on TRL
internals that a release may rename. The versions CI tests (:data:`TRL_TESTED`) are accepted silently; an older
TRL is refused at import; a newer one is accepted with a warning, and :func:`require_trl_internals` checks, when
the trainer is built or the patch applied, that every internal it needs is still there with the parameters fastdpo
passes, naming what is missing otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import warnings

#: The TRL versions CI runs the integration tests against; the ``fastdpo[trl]`` extra asks for the same lower bound.
TRL_TESTED = ">=1.15,<1.17"
_TRL_MINIMUM = "1.15"

# The TRL internals fastdpo calls or overrides, as (module, attribute path, leading parameter names): the parameters
# TRL's callers (or fastdpo) pass positionally, in order; None where only the attribute's presence matters.
_CHUNKED_FORWARD = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                    "final_logit_softcapping", "logit_scale", "outputs")
PATCH_INTERNALS = (
    ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction.forward", _CHUNKED_FORWARD),
    ("trl.kernels", "ChunkedLogProbFunction", None),
    ("trl.trainer.utils", "_ChunkedLogProbFunction", None),
    ("trl.trainer.utils", "add_fused_lm_head", ("model",)),
    ("trl.trainer.utils", "maybe_gather_lm_head_ctx", ("params",)),
)
TRAINER_INTERNALS = (
    # FastDPOTrainer reads train_dataset and peft_config from the positional arguments by their position.
    ("trl", "DPOTrainer.__init__", ("self", "model", "ref_model", "args", "data_collator", "train_dataset",
                                    "eval_dataset", "processing_class", "compute_metrics", "callbacks", "optimizers",
                                    "quantization_config", "peft_config")),
    ("trl", "DPOTrainer._compute_loss", ("self", "model", "inputs", "return_outputs")),
    ("trl", "DPOTrainer.compute_ref_log_probs", ("self", "model", "inputs")),
    ("trl", "DPOTrainer._precompute_ref_logps", ("self", "dataset", "name", "batch_size")),
    ("trl", "DPOTrainer._tag_names", None),
    ("trl.trainer.utils", "use_adapter", ("model", "adapter_name")),
    ("trl.models.utils", "disable_gradient_checkpointing", ("model", "gradient_checkpointing_kwargs")),
)
# DPOConfig fields the trainer reads besides the loss fields (which fastdpo.integrations.trl passes in).
TRAINER_CONFIG_FIELDS = ("padding_free", "router_aux_loss_coef", "precompute_ref_log_probs",
                         "gradient_checkpointing_kwargs")

_warned: set = set()
_ABSENT = object()


def _version(spec):
    from packaging.version import Version

    return Version(spec)


def check_trl_version(version: str | None = None) -> str:
    """Check TRL (``version``, or the installed one) against the tested range :data:`TRL_TESTED`.

    Raises ``ImportError`` when TRL is missing, its version cannot be parsed, or it is older than the tested range
    (fastdpo relies on internals that older releases lack). A version newer than the range gets one warning per
    version; whether its internals still fit is checked by :func:`require_trl_internals` when they are used.
    Returns the checked version.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    if version is None:
        try:
            version = importlib.metadata.version("trl")
        except importlib.metadata.PackageNotFoundError as err:
            raise ImportError("fastdpo.integrations.trl needs TRL: pip install 'fastdpo[trl]'") from err
    try:
        parsed = _version(version)
    except InvalidVersion as err:
        raise ImportError(f"cannot parse the TRL version {version!r}") from err
    if parsed in SpecifierSet(TRL_TESTED, prereleases=True):
        return version
    if parsed < _version(_TRL_MINIMUM):
        raise ImportError(f"fastdpo.integrations.trl needs trl>={_TRL_MINIMUM} (tested: trl{TRL_TESTED}), found "
                          f"trl {version}: pip install 'fastdpo[trl]'")
    if version not in _warned:
        _warned.add(version)
        warnings.warn(f"fastdpo.integrations.trl is tested with trl{TRL_TESTED}, found trl {version}: the TRL "
                      f"internals it relies on are checked when FastDPOTrainer is built or patch_trl() applied",
                      UserWarning, stacklevel=2)
    return version


def optional_module(name: str):
    """The module ``name``, or None where it cannot be imported (a TRL release that moved it)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _resolve(module_name, path):
    obj = optional_module(module_name)
    if obj is None:
        return None, f"module {module_name}"
    for part in path.split("."):
        # Read without running descriptors; a static or class method is checked as its plain function.
        obj = inspect.getattr_static(obj, part, _ABSENT)
        if obj is _ABSENT:
            return None, f"{module_name}.{path}"
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
    return obj, None


def _signature_mismatch(obj, expected):
    """None when ``obj`` takes ``expected`` as its leading positional parameters, else what it takes."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return "no inspectable signature"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, name in enumerate(expected):
        kind = params[i].kind if i < len(params) else None
        if kind is inspect.Parameter.VAR_POSITIONAL:
            return None  # a wrapper's *args takes whatever positional arguments follow
        if kind not in positional or params[i].name != name:
            return f"parameters {[p.name for p in params]}, expected {list(expected)} first"
    return None


def missing_trl_internals(internals, config_fields=()) -> list[str]:
    """What of ``internals`` (see :data:`PATCH_INTERNALS`) and of ``DPOConfig``'s ``config_fields`` the installed TRL
    lacks or has with other parameters, one line each; empty when everything fits."""
    problems = []
    for module_name, path, expected in internals:
        obj, missing = _resolve(module_name, path)
        if missing is not None:
            problems.append(f"{missing} is missing")
        elif expected is not None:
            mismatch = _signature_mismatch(obj, expected)
            if mismatch:
                problems.append(f"{module_name}.{path} has {mismatch}")
    if config_fields:
        from trl import DPOConfig

        fields = {f.name for f in dataclasses.fields(DPOConfig)}
        problems.extend(f"trl.DPOConfig.{name} is missing" for name in config_fields if name not in fields)
    return problems


def require_trl_internals(what: str, internals, config_fields=()) -> None:
    """Raise ``ImportError`` naming every TRL internal that ``what`` (e.g. ``"FastDPOTrainer"``) needs and the
    installed TRL lacks or has with other parameters."""
    problems = missing_trl_internals(internals, config_fields)
    if problems:
        version = importlib.metadata.version("trl")
        raise ImportError(f"{what} cannot run on trl {version} (tested: trl{TRL_TESTED}); the TRL internals it relies "
                          f"on changed:\n  " + "\n  ".join(problems))
