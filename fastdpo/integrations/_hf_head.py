"""The head runner: one forward of a causal LM whose lm-head module computes fastdpo's per-token statistics of the
shifted labels (padded or packed), so that the logits never exist. See :mod:`fastdpo.integrations.transformers`."""

from __future__ import annotations

from .. import functional
from .._options import IGNORE_INDEX
from ._hf_model import HeadOutput, add_hidden_states_forward, call_lm_head, head_transform, unwrap_causal_lm
from ._hf_packing import check_packable


class _TokenStatsHead:
    """``fn`` of :func:`call_lm_head`: fastdpo's per-token statistics of the shifted labels.

    ``layout``: ``"shift"`` (the backbone's ``[B, T, H]``: drop the last position), ``"shifted"`` (hidden states
    already aligned with ``targets``) or ``"packed"`` (a ``[1, L, H]`` packed row, ``targets`` ``[L]``). A plain
    callable (not a dataclass or container), so that wrappers that walk a forward's arguments leave it and its label
    tensor alone.
    """

    def __init__(self, targets, layout, options):
        self.targets, self.layout, self.options = targets, layout, options

    def __call__(self, hidden, weight, bias):
        if self.layout == "shift":
            hidden = hidden[:, :-1]
        elif self.layout == "packed":
            hidden = hidden.reshape(-1, hidden.shape[-1])
        stats = functional.token_stats(hidden, weight, self.targets.to(hidden.device), bias=bias,
                                       names={"targets": "labels"}, **self.options)
        # FSDP2 warns about views returned by a unit's forward (an in-place op on one would skip its backward hook);
        # these are per-token ([B, T-1] or [L]), so owning copies cost nothing.
        return {name: value.clone() if value._base is not None else value for name, value in stats.items()}


def model_head_output(model, labels, *, packed=None, hidden_states=None, temperature=1.0, extras=False,
                      ignore_index=IGNORE_INDEX, backend="auto", memory="lean", **model_kwargs) -> HeadOutput:
    """:func:`causal_lm_token_stats` without the input checks, as the :class:`HeadOutput` of one forward.

    ``model_kwargs`` go to the model's forward; with ``output_router_logits=True`` the MoE router logits come back
    in ``router_logits``, from the same forward that computed the statistics (``head``). With ``packed`` (a
    :class:`PackedBatch`; ``labels`` unused) the backbone runs on the packed row and ``head`` holds ``[L]`` stats
    of ``packed.targets``.
    """
    lm = unwrap_causal_lm(model)
    options = dict(ignore_index=ignore_index, temperature=temperature, backend=backend, extras=extras, memory=memory,
                   **head_transform(lm))
    if packed is not None:
        check_packable(model, device=packed.input_ids.device)
        model_kwargs = {**model_kwargs, **packed.backbone_kwargs()}
        fn = _TokenStatsHead(packed.targets, "packed", options)
    elif hidden_states is not None:
        return HeadOutput(head=call_lm_head(lm, hidden_states[:, :-1],
                                            _TokenStatsHead(labels[:, 1:], "shifted", options)))
    else:
        fn = _TokenStatsHead(labels[:, 1:], "shift", options)
    add_hidden_states_forward(lm)
    # Through `model(...)`, so that every wrapper (DDP, FSDP, DeepSpeed, PEFT, accelerate) sees one ordinary forward.
    return model(**model_kwargs, fastdpo_head=fn)


def model_token_stats(model, labels, **kwargs) -> dict:
    """:func:`causal_lm_token_stats` without the input checks; see :func:`model_head_output`."""
    return model_head_output(model, labels, **kwargs).head
