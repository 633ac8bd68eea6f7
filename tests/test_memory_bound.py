"""No ``[tokens, vocab]`` tensor ever exists on the fused paths: every tensor the forward and the
backward create is recorded (a TorchDispatchMode sees each op's outputs) and the largest is bounded."""

import weakref

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo import _torch_path
from fastdpo.kernels.config import KernelConfig, use_config
from fdtest import backend_params, make_batch


def _call(mode, func, args, kwargs):
    """Run ``func``; fastdpo's custom ops run their Python body with the mode active, so it sees inside them."""
    if func.namespace == "fastdpo":
        with mode:
            return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
    return func(*args, **kwargs)


class LargestTensor(TorchDispatchMode):
    """The size in bytes of the largest tensor any op allocates (outputs that alias an input, like
    in-place ops and the interpreter's copies back into its arguments, allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _call(self, func, args, kwargs or {})
        flat = list(args) + list((kwargs or {}).values())
        owned = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", backend_params())
def test_no_tokens_by_vocab_tensor(backend, monkeypatch):
    pairs, T, H, V = (2, 16, 8, 3001) if backend == "triton" else (4, 64, 16, 40001)
    hidden, weight, labels = make_batch(pairs=pairs, T=T, H=H, V=V, dtype=torch.float32)
    ref_hidden = torch.randn_like(hidden)
    N = labels.numel()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", 4 * V)  # 4 tokens a chunk: chunking must happen
    chunk = 256
    config = KernelConfig(fwd_block_m=16, fwd_block_v=64, fwd_block_k=16, dlogits_block_m=16, dlogits_block_v=64,
                          dlogits_block_k=16, gw_block_v=64, gw_block_h=16, gw_block_k=16, gh_block_m=16,
                          gh_block_h=16, gh_block_k=64, vocab_chunk=chunk, min_programs=8)
    with use_config(config), LargestTensor() as seen:
        out = fastdpo.dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=w, backend=backend)
        out.loss.backward()
    # The largest tensors allowed: the weight gradient [V, H], the hidden gradient [N, H], one logits chunk
    # (torch: 4 tokens x V) or the logit-gradient workspace (triton: N x vocab_chunk).
    bound = 4 * max(V * H, N * H, 4 * V if backend == "torch" else N * chunk)  # fp32 bytes
    assert seen.nbytes <= bound < N * V
    assert w.grad is not None and torch.isfinite(w.grad).all()


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside the mode: every new storage counts from the op that
    makes it until it is freed (a finalizer on the storage)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _call(self, func, args, kwargs or {})
        flat = list(args) + list((kwargs or {}).values())
        owned = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen and key not in owned and storage.nbytes():
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def test_torch_backend_bf16_step_peak_under_twice_the_weight(monkeypatch):
    """Issue 11 item 9: a bf16 step (policy and reference through one head, forward and backward) holds less than
    2x the weight's bytes above its inputs: no fp32 copy of the [V, H] weight nor an fp32 [V, H] accumulator, only a
    chunk of either (the chunk sizes shrunk here in the proportions of a 128k-vocabulary head)."""
    V, H = 4099, 64
    hidden, weight, labels = make_batch(pairs=2, T=33, H=H, V=V, dtype=torch.bfloat16, seed=3)
    monkeypatch.setattr(_torch_path, "VOCAB_CHUNK", 512)
    monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", 4 * 512)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    ref_hidden = torch.randn(hidden.shape, dtype=torch.bfloat16)
    with LiveBytes() as meter:
        out = fastdpo.dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=w, backend="torch")
        out.loss.backward()
        del out
    weight_bytes = w.numel() * w.element_size()
    assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()
    assert meter.peak < 2 * weight_bytes, f"peak {meter.peak / weight_bytes:.2f}x the weight"
