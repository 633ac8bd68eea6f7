"""The head is a torch.library custom op, so ``torch.compile(fullgraph=True)`` captures a
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
    torch.library.opcheck(torch.ops.fastdpo.head_forward.default, (h, w, None, labels.reshape(-1), *opts.op_args()),
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



def _packed(hidden, labels):
    """The padded batch as one packed stream: each row's first ``len`` tokens, and the ``[2B+1]`` offsets."""
    lengths = [hidden.shape[1] - (1 + r % 3) for r in range(hidden.shape[0])]
    h = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)])
    lab = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return h, lab, cu


def _grads_and_outputs(fn, leaves, *rest):
    params = [t.clone().requires_grad_() for t in leaves]
    outs = fn(*params, *rest)
    grads = torch.autograd.grad(outs[0], params)
    return [o.detach() for o in outs] + list(grads)


def _assert_all_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reference", ["ref_hidden", "ref_logps"])
@pytest.mark.parametrize("backend", backend_params())
def test_packed_loss_fullgraph(backend, reference):
    """The offsets' value check reads the data: it is skipped under compile, as the label check is."""
    torch._dynamo.reset()
    hidden, weight, bias, labels, ref_hidden = _inputs(seed=7)
    h, lab, cu = _packed(hidden, labels)
    ref_h, _, _ = _packed(ref_hidden, labels)
    ref_logps = torch.linspace(-9.0, -3.0, hidden.shape[0])

    def step(h, w, b, lab, cu):
        ref = dict(ref_hidden=ref_h, ref_weight=w) if reference == "ref_hidden" else dict(ref_logps=ref_logps)
        out = fastdpo.dpo_loss(h, w, lab, bias=b, cu_seqlens=cu, backend=backend, extra_metrics=True, **ref)
        seq = fastdpo.sequence_logprobs(h, w, lab, bias=b, cu_seqlens=cu, average=True, backend=backend)
        return out.loss + seq.sum(), out.metrics["rewards/margins"], out.metrics["entropy"], seq

    eager = _grads_and_outputs(step, (h, weight, bias), lab, cu)
    compiled = _grads_and_outputs(torch.compile(step, backend="aot_eager", fullgraph=True), (h, weight, bias), lab, cu)
    _assert_all_close(compiled, eager)


_HEAD_OPTIONS = {"defaults": {}, "options": dict(softcap=5.0, logit_scale=0.8, temperature=1.3, memory=1e-3)}


@pytest.mark.parametrize("options", list(_HEAD_OPTIONS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dynamic_shapes_fullgraph(packed, options):
    """``dynamic=True``: shapes and Python numbers are symbolic; two batch shapes run in one compiled graph."""
    torch._dynamo.reset()

    def step(h, w, b, lab, cu):
        out = fastdpo.dpo_loss(h, w, lab, bias=b, reference_free=True, cu_seqlens=cu, backend="torch",
                               **_HEAD_OPTIONS[options])
        return out.loss, out.chosen_logps

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for seed, T in ((1, 9), (2, 12)):
        hidden, weight, labels = make_batch(T=T, seed=seed)
        bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(seed))
        cu = None
        if packed:
            hidden, labels, cu = _packed(hidden, labels)
        _assert_all_close(_grads_and_outputs(compiled, (hidden, weight, bias), labels, cu),
                          _grads_and_outputs(step, (hidden, weight, bias), labels, cu))


# Every Python number the call checks, each given three values over three calls of one compiled function (the
# second change makes dynamo treat it as symbolic, where a value check like math.isfinite would end the graph).
_CHANGING = {
    "beta": [0.1, 0.25, 0.4],
    "softcap": [5.0, 7.5, 30.0],
    "logit_scale": [1.0, 0.7, 1.3],
    "temperature": [1.0, 0.9, 1.7],
    "memory": [1e-4, 2e-4, 1.0],
    "ignore_index": [-100, -1, -7],
    "label_smoothing": [0.1, 0.2, 0.3],
    "simpo_gamma": [0.5, 0.7, 0.9],
    "cpo_alpha": [1.0, 0.5, 2.0],
    "ld_alpha": [0.5, 0.6, 0.9],
    "f_alpha_divergence_coef": [0.5, 0.3, 0.7],
    "discopop_tau": [0.05, 0.1, 0.2],
}
_FIXED = {"label_smoothing": dict(loss_type=["robust", "simpo"]), "simpo_gamma": dict(loss_type="simpo"),
          "cpo_alpha": dict(loss_type="cpo"), "discopop_tau": dict(loss_type="discopop"),
          "f_alpha_divergence_coef": dict(f_divergence_type="alpha_divergence")}


@pytest.mark.parametrize("name", list(_CHANGING))
def test_changing_python_numbers_fullgraph(name):
    torch._dynamo.reset()
    hidden, weight, bias, labels, ref_hidden = _inputs(seed=4)

    def step(h, w, b, lab, value):
        out = fastdpo.dpo_loss(h, w, lab, bias=b, ref_hidden=ref_hidden, ref_weight=w, backend="torch",
                               **_FIXED.get(name, {}), **{name: value})
        return out.loss, out.chosen_rewards

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for value in _CHANGING[name]:
        lab = labels.masked_fill(labels == -100, value) if name == "ignore_index" else labels
        _assert_all_close(_grads_and_outputs(compiled, (hidden, weight, bias), lab, value),
                          _grads_and_outputs(step, (hidden, weight, bias), lab, value))


def test_module_fullgraph():
    torch._dynamo.reset()
    hidden, weight, bias, labels, ref_hidden = _inputs(seed=5)
    module = fastdpo.FusedLinearDPOLoss(beta=0.3, softcap=4.0, backend="torch", use_weighting=True)

    def step(h, w, b, lab):
        out = module(h, w, lab, bias=b, ref_hidden=ref_hidden, ref_weight=w)
        return out.loss, out.metrics["rewards/accuracies"]

    _assert_all_close(_grads_and_outputs(torch.compile(step, backend="aot_eager", fullgraph=True),
                                         (hidden, weight, bias), labels),
                      _grads_and_outputs(step, (hidden, weight, bias), labels))


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
    options = HeadOptions(backend=backend, memory=memory).op_args()
    outs = torch.ops.fastdpo.head_forward(h, weight, bias, y, *options)
    grad = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3))
    args = (grad, h, weight, bias, y, outs[5], outs[0], outs[6], outs[7], outs[8], *options, True, True, True)
    torch.library.opcheck(torch.ops.fastdpo.head_backward.default, args, test_utils=("test_schema", "test_faketensor"))
