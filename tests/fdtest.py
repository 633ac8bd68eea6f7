"""Helpers shared by the tests: the runnable backends, an odd-shape DPO batch, a relative error, options for
every loss type, NaN-poisoned allocations, the head's memory mode."""

import importlib.util
import os

import pytest
import torch

from fastdpo import _validate

BACKENDS = ["torch", "triton"]
# Options that make each loss type do something worth checking (non-zero smoothing, a margin, ...).
TYPE_OPTIONS = {
    "sigmoid": {}, "hinge": {}, "ipo": {}, "exo_pair": {"label_smoothing": 1e-3}, "nca_pair": {},
    "robust": {"label_smoothing": 0.1}, "bco_pair": {}, "sppo_hard": {}, "aot": {"label_smoothing": 0.05},
    "aot_unpaired": {"label_smoothing": 0.05}, "apo_zero": {}, "apo_down": {}, "discopop": {"discopop_tau": 0.3},
    "sft": {}, "sigmoid_norm": {}, "simpo": {"simpo_gamma": 0.3}, "cpo": {"cpo_alpha": 0.7}, "orpo": {},
}


def backend_params():
    """``backend`` values that can run the tests' CPU tensors: torch always, triton through the interpreter."""
    return [b if b == "torch" or _validate.interpreting()
            else pytest.param(b, marks=pytest.mark.skip(reason="TRITON_INTERPRET is off"))
            for b in BACKENDS]


def make_batch(pairs=2, T=9, H=19, V=53, *, dtype=torch.float32, seed=0, prompt=3, pad=2, logit_std=3.0,
               device="cpu"):
    """A random DPO batch at odd shapes: ``[2B, T, H]`` hidden, ``[V, H]`` weight, ``[2B, T]`` labels with
    a prompt (first ``prompt`` tokens) and right padding (last ``pad`` tokens of every other row) ignored."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (logit_std / H ** 0.5)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :prompt] = -100
    labels[1::2, T - pad:] = -100
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both vanish)."""
    a, b = a.double(), b.double()
    denom = b.abs().max().clamp(min=1e-30)
    return ((a - b).abs().max() / denom).item()


def poison_empty(monkeypatch):
    """Every new floating tensor from ``torch.empty``/``torch.empty_like`` starts as NaN (until ``monkeypatch``
    undoes it), so an element a kernel reads or returns without writing it shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def record_ref_logps(monkeypatch, module):
    """Patches ``module.compute_dpo_loss`` to record the ``ref_token_logps`` of each call; returns the record."""
    seen = []
    original = module.compute_dpo_loss

    def spy(stats, mask, config, *, ref_token_logps=None, **kwargs):
        seen.append(ref_token_logps)
        return original(stats, mask, config, ref_token_logps=ref_token_logps, **kwargs)

    monkeypatch.setattr(module, "compute_dpo_loss", spy)
    return seen


def record_head_memory(monkeypatch):
    """Patches ``fastdpo.head.ops.dispatch`` to record the ``memory`` of each call; returns the record."""
    from fastdpo.head import ops

    seen = []
    real = ops.dispatch
    monkeypatch.setattr(ops, "dispatch", lambda backend, memory: seen.append(memory) or real(backend, memory))
    return seen


def assert_same_as_lean(results):
    """``results`` maps memory ("lean", "fast", 1e-3) to ``(loss, grads)``: the other modes give lean's loss and
    gradients (float64 tolerances)."""
    lean_loss, lean_grads = results["lean"]
    for memory in ("fast", 1e-3):
        loss, grads = results[memory]
        torch.testing.assert_close(loss, lean_loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, lean_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def word_tokenizer(words):
    """A word-level tokenizer over ``words`` (ids from 3; 0 pad, 1 eos, 2 unk), built offline for tiny trainer runs."""
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def load_script(path):
    """The Python file at ``path`` (a script outside any package: a benchmark, the TRL-suite harness) as a module."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
