"""One process: the lm-head called as a module from the model's forward (the mechanism the wrappers rely on)."""

import copy

import pytest
import torch

import fastdpo
from fastdpo.integrations import transformers as fx

transformers = pytest.importorskip("transformers")

from workers import dist_worker  # noqa: E402


def test_head_fn_runs_inside_the_head_forward_with_its_weight():
    model = dist_worker.make_model()
    ids, labels, attention = dist_worker.global_batch()
    fx.add_hidden_states_forward(model)
    seen = []

    def hook(module, args, kwargs):
        seen.append(module)

    handle = model.lm_head.register_forward_pre_hook(hook, with_kwargs=True)
    out = model(input_ids=ids, attention_mask=attention,
                fastdpo_head=lambda hidden, weight, bias: (hidden.shape, weight, bias))
    handle.remove()
    assert seen == [model.lm_head], "the head must be called as a module (its hooks are the wrappers' hooks)"
    shape, weight, bias = out.head
    assert shape == (ids.shape[0], ids.shape[1], dist_worker.HIDDEN) and weight is model.lm_head.weight and bias is None
    # Without the keyword the head and the model behave as plain transformers ones: logits out.
    logits = model(input_ids=ids, attention_mask=attention).logits
    assert logits.shape == (*ids.shape, dist_worker.V)


def test_token_stats_through_the_model_forward_match_logits():
    model = dist_worker.make_model()
    ids, labels, attention = dist_worker.global_batch()
    ours = fx.causal_lm_token_stats(model, ids, labels, attention, extras=True, backend="torch")
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    expected = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(ours["logp"], expected, atol=1e-12, rtol=1e-12)
    assert all(v._base is None for v in ours.values()), "no views out of a wrapped forward"


def test_deep_copy_runs_its_own_forward():
    """The forwards the helpers install keep no closure over the original module: a deep copy (a reference model)
    runs itself, not the module it was copied from."""
    model = dist_worker.make_model()
    ids, labels, attention = dist_worker.global_batch()
    fx.causal_lm_logprobs(model, ids, labels, attention, backend="torch")  # installs both forwards
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(0.5)
        twin.model.norm.weight.mul_(2.0)
    ours = fx.causal_lm_logprobs(twin, ids, labels, attention, backend="torch")
    hidden = twin.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    expected = fastdpo.fused_logprobs(hidden, twin.lm_head.weight, labels[:, 1:], backend="torch")
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(twin(input_ids=ids, attention_mask=attention).logits,
                       twin.lm_head(twin.model(input_ids=ids, attention_mask=attention).last_hidden_state))


def test_unwrap_wrappers_and_peft():
    model = dist_worker.make_model()

    class DistributedDataParallel(torch.nn.Module):  # stands in for the wrapper, matched by name
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert fx.unwrap_wrappers(DistributedDataParallel(model)) is model
    assert fx.unwrap_causal_lm(DistributedDataParallel(model)) is model
