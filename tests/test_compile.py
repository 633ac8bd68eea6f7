"""Issue 11 items 1 and 7: the head is a torch.library custom op, so ``torch.compile(fullgraph=True)`` captures a
training step that calls ``dpo_loss``; double backward is refused with a named error on both backends."""

import pytest
import torch

import fastdpo
from fastdpo._options import HeadOptions
from fdtest import backend_params, make_batch


def _step(backend, memory="lean"):
    def step(hidden, weight, bias, labels, ref_hidden):
        out = fastdpo.dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=weight,
                               softcap=5.0, backend=backend, extra_metrics=True, memory=memory)
        return out.loss, out.metrics["rewards/margins"], out.metrics["entropy"]
    return step


def _inputs(seed=0):
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return (hidden, weight, torch.randn(weight.shape[0], generator=g), labels,
            torch.randn(hidden.shape, generator=g))


def _run(fn, hidden, weight, bias, labels, ref_hidden):
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    outs = fn(*params, labels, ref_hidden)
    grads = torch.autograd.grad(outs[0], params)
    return [o.detach() for o in outs], grads


def _compare(compiled, eager, atol):
    (got, got_g), (want, want_g) = compiled, eager
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("memory", ["lean", "fast"])
@pytest.mark.parametrize("backend", backend_params())
def test_compiled_step_aot_eager_fullgraph_equals_eager(backend, memory):
    torch._dynamo.reset()
    inputs = _inputs()
    step = _step(backend, memory)
    eager = _run(step, *inputs)
    compiled = _run(torch.compile(step, backend="aot_eager", fullgraph=True), *inputs)
    _compare(compiled, eager, atol=1e-6)


def test_compiled_step_inductor_fullgraph_equals_eager():
    torch._dynamo.reset()

    def step(hidden, weight, bias, labels, ref_hidden):
        return (fastdpo.dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=weight,
                                 backend="torch").loss,)

    inputs = _inputs(seed=3)
    eager = _run(step, *inputs)
    compiled = _run(torch.compile(step, backend="inductor", fullgraph=True), *inputs)
    _compare(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("memory", [0.0, float("inf"), 1e-5], ids=["lean", "fast", "budget"])
def test_head_ops_pass_opcheck(memory, backend):
    """Schema, fake (meta) implementation and autograd registration of the forward op, as torch checks them, for
    every engine in lean mode, fast mode and a budget (the fake implementation sizes what fast mode keeps and the
    saved compaction)."""
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=5)
    h = hidden.reshape(-1, hidden.shape[-1]).requires_grad_()
    w = weight.clone().requires_grad_()
    opts = HeadOptions(backend=backend, extras=True, memory=memory)
    torch.library.opcheck(torch.ops.fastdpo.head_forward.default, (h, w, None, labels.reshape(-1), opts.encode()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", backend_params())
def test_double_backward_is_refused(backend):
    """A gradient penalty through the head must not silently treat its gradient as a constant."""
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=2)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = fastdpo.dpo_loss(h, w, labels, reference_free=True, backend=backend).loss
    gh, gw = torch.autograd.grad(loss, (h, w), create_graph=True)
    # The first-order gradient itself is right.
    want = torch.autograd.grad(fastdpo.dpo_loss(h, w, labels, reference_free=True, backend=backend).loss, (h, w))
    torch.testing.assert_close(gw.detach(), want[1])
    assert gw.requires_grad and gh.requires_grad
    with pytest.raises(RuntimeError, match="fastdpo.*double backward.*create_graph"):
        (gw.pow(2).sum() + gh.pow(2).sum()).backward()
    logp = fastdpo.fused_logprobs(h, w, labels, backend=backend)
    (gw_only,) = torch.autograd.grad(logp.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="fastdpo"):
        torch.autograd.grad(gw_only.sum(), h)



@pytest.mark.parametrize("backend", backend_params())
def test_compiled_vocab_parallel_step_fullgraph_equals_eager(backend, tmp_path):
    """A vocabulary-parallel head (here one gloo rank holding every row) compiles into one graph: its process group
    reaches the ops by name although tracing skips the group's record."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        inputs = _inputs(seed=4)
        V = inputs[1].shape[0]

        def step(hidden, weight, bias, labels, ref_hidden):
            out = fastdpo.dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=weight,
                                   backend=backend, extra_metrics=True,
                                   vocab_parallel=fastdpo.VocabParallel(0, V, vocab_size=V))
            return out.loss, out.metrics["entropy"]

        compiled = _run(torch.compile(step, backend="aot_eager", fullgraph=True), *inputs)
        _compare(compiled, _run(step, *inputs), atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", backend_params())
def test_compiled_packed_step_fullgraph_equals_eager(backend):
    """Packed (padding-free) input compiles into one graph (the offsets' value check, a data-dependent guard, is
    skipped while tracing, as the label range check is)."""
    torch._dynamo.reset()
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=9)
    keep = torch.ones(labels.shape, dtype=torch.bool)
    keep[1::2, -2:] = False  # the padding of every other row
    lengths = keep.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    packed_h, packed_y = hidden[keep], labels[keep]
    g = torch.Generator().manual_seed(3)
    ref_h = torch.randn(packed_h.shape, generator=g)
    bias = torch.randn(weight.shape[0], generator=g)

    def step(hidden, weight, bias, labels, ref_hidden):
        out = fastdpo.dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=weight,
                               cu_seqlens=cu, backend=backend, extra_metrics=True)
        return out.loss, out.metrics["rewards/margins"]

    inputs = (packed_h, weight, bias, packed_y, ref_h)
    _compare(_run(torch.compile(step, backend="aot_eager", fullgraph=True), *inputs), _run(step, *inputs), atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("memory", [0.0, float("inf")], ids=["lean", "fast"])
def test_head_backward_op_passes_opcheck(memory, backend):
    """Schema and fake implementation of the backward op, on what the forward op saved (kept tiles, the fused
    engine's compaction order)."""
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=7)
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(2))
    options = HeadOptions(backend=backend, memory=memory).encode()
    outs = torch.ops.fastdpo.head_forward(h, weight, bias, y, options)
    grad = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3))
    args = (grad, h, weight, bias, y, outs[5], outs[0], outs[6], outs[7], outs[8], options, True, True, True)
    torch.library.opcheck(torch.ops.fastdpo.head_backward.default, args, test_utils=("test_schema", "test_faketensor"))
