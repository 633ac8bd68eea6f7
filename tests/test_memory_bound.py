"""No ``[tokens, vocab]`` tensor ever exists on the fused paths: every tensor the forward and the
backward create is recorded (a TorchDispatchMode sees each op's outputs) and the largest is bounded."""

import pytest
import torch

import fastdpo
from fastdpo import _torch_backend
from fastdpo.bench.memory import LargestTensor, LiveBytes
from fastdpo.kernels.config import KernelConfig, use_config
from fdtest import backend_params, make_batch


@pytest.mark.parametrize("backend", backend_params())
def test_no_tokens_by_vocab_tensor(backend, monkeypatch):
    pairs, T, H, V = (2, 16, 8, 3001) if backend == "triton" else (4, 64, 16, 40001)
    hidden, weight, labels = make_batch(pairs=pairs, T=T, H=H, V=V, dtype=torch.float32)
    ref_hidden = torch.randn_like(hidden)
    N = labels.numel()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", 4 * V)  # 4 tokens a chunk: chunking must happen
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


def test_torch_backend_bf16_step_peak_under_twice_the_weight(monkeypatch):
    """A bf16 step (policy and reference through one head, forward and backward) holds less than
    2x the weight's bytes above its inputs: no fp32 copy of the [V, H] weight nor an fp32 [V, H] accumulator, only a
    chunk of either (the chunk sizes shrunk here in the proportions of a 128k-vocabulary head)."""
    V, H = 4099, 64
    hidden, weight, labels = make_batch(pairs=2, T=33, H=H, V=V, dtype=torch.bfloat16, seed=3)
    monkeypatch.setattr(_torch_backend, "VOCAB_CHUNK", 512)
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", 4 * 512)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    ref_hidden = torch.randn(hidden.shape, dtype=torch.bfloat16)
    with LiveBytes() as meter:
        out = fastdpo.dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=w, backend="torch")
        out.loss.backward()
        del out
    weight_bytes = w.numel() * w.element_size()
    assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()
    assert meter.peak < 2 * weight_bytes, f"peak {meter.peak / weight_bytes:.2f}x the weight"
