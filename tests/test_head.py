"""The head interface: one dispatch, the options as one string across the custom ops, the fused engine's
compaction saved for its backward, and ``backend="auto"`` choosing by measurement (timings injected here)."""

import json
import math

import pytest
import torch

import fastdpo
from fastdpo import head
from fastdpo._options import HeadOptions
from fastdpo.head import auto, ops
from fdtest import backend_params, make_batch, rel_err


@pytest.fixture
def dispatched(monkeypatch):
    """Every engine the custom ops dispatch to, as ``(backend, memory)``."""
    seen = []
    real = ops.dispatch

    def spy(backend, memory):
        seen.append((backend, memory))
        return real(backend, memory)

    monkeypatch.setattr(ops, "dispatch", spy)
    return seen


@pytest.mark.parametrize("opts", [HeadOptions(), HeadOptions(memory=1e-5, scale=0.0),
                                  HeadOptions(ignore_index=7, softcap=2.5, scale=-1 / 3, backend="triton", extras=True,
                                              vocab_start=11, vocab_total=97, group="g;name=1", memory=math.inf)])
def test_options_cross_the_op_boundary_as_one_string(opts):
    text = opts.encode()
    assert isinstance(text, str)
    assert HeadOptions.decode(text) == opts


@pytest.mark.parametrize("text", ["", "ignore_index=-100", "nonsense;" * 9,
                                  HeadOptions().encode().replace("scale=1.0", "scale=x")])
def test_a_malformed_options_string_is_refused(text):
    with pytest.raises(ValueError, match="options"):
        HeadOptions.decode(text)


@pytest.mark.parametrize("call", [
    lambda: fastdpo.fused_logprobs(*make_batch()[:2], make_batch()[2], backend="cuda"),
    lambda: fastdpo.FusedLinearDPOLoss(backend="fused_v2"),
    lambda: head.dispatch("auto", 0.0),
])
def test_unknown_backend_is_refused_with_the_choices(call):
    with pytest.raises(ValueError, match=r"backend must be one of .*'torch'"):
        call()


def test_every_backend_name_has_a_lean_and_a_fast_engine():
    assert head.BACKENDS == ("auto", *head.ENGINES)
    for name in head.ENGINES:
        lean, fast = head.dispatch(name, 0.0), head.dispatch(name, math.inf)
        assert (lean.backend, fast.backend, lean.keeps, fast.keeps) == (name, name, False, True)
        assert head.dispatch(name, 0.5) is fast


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("memory", ["lean", "fast", 1e-6], ids=["lean", "fast", "budget"])
def test_public_api_reaches_the_engine_through_the_op(backend, memory, dispatched):
    hidden, weight, labels = make_batch(seed=4)
    h = hidden.requires_grad_()
    fastdpo.dpo_loss(h, weight, labels, reference_free=True, backend=backend, memory=memory).loss.backward()
    want = head.resolve_memory(memory)
    assert dispatched == [(backend, want), (backend, want)]  # forward, then backward


def test_fused_backward_reuses_the_forward_compaction(monkeypatch):
    """The stable sort of the labelled rows runs once per forward+backward, and the gradients stay exact."""
    if not fastdpo._validate.interpreting():
        pytest.skip("TRITON_INTERPRET is off")
    from fastdpo import _triton_backend
    from fastdpo.reference import reference_token_stats

    calls = []
    real = _triton_backend.compaction_order
    monkeypatch.setattr(_triton_backend, "compaction_order", lambda *a: calls.append(1) or real(*a))
    hidden, weight, labels = make_batch(seed=6)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = torch.autograd.grad(reference_token_stats(hd, wd, labels)["logp"], (hd, wd), g)
    for memory in ("lean", "fast"):
        calls.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = fastdpo.fused_logprobs(h, w, labels, backend="triton", memory=memory)
        got = torch.autograd.grad(logp, (h, w), g.float())
        assert len(calls) == 1, memory  # sorted in the forward only
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5, memory


# --- backend="auto" --------------------------------------------------------------------------------------------


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """``auto`` measures on CPU here (both engines run CPU tensors: Triton through the interpreter), with a cache
    under ``tmp_path`` and injected timings: ``times[label]`` seconds per iteration for the engine labelled so
    (``fused``, ``chunked``, ``-fast``); returns ``(times, measured)``, ``measured`` the labels each measurement
    timed."""
    if not fastdpo._validate.interpreting():
        pytest.skip("TRITON_INTERPRET is off")
    monkeypatch.setenv(auto.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(auto.ENV_BACKEND, raising=False)
    monkeypatch.setattr(auto, "MEASURED_DEVICES", ("cpu",))
    monkeypatch.setattr(auto, "_announced", False)
    auto.forget()
    times, measured = {}, []

    def fake_time(engine, opts, run, deadline, device):
        measured.append(engine.label)
        return times[engine.label]

    monkeypatch.setattr(auto, "_time", fake_time)
    yield times, measured
    auto.forget()


def _auto_call(dispatched, memory="lean", seed=0, pairs=2, dtype=torch.float32):
    """The engine an ``auto`` forward ran (``(backend, memory)``)."""
    hidden, weight, labels = make_batch(pairs=pairs, seed=seed, dtype=dtype)
    dispatched.clear()
    fastdpo.fused_logprobs(hidden.requires_grad_(), weight, labels, backend="auto", memory=memory)
    return dispatched[0]


@pytest.mark.parametrize("faster", ["fused", "chunked"])
def test_auto_picks_the_faster_engine_and_caches_it(faster, measuring, dispatched, caplog):
    times, measured = measuring
    times.update(fused=1.0, chunked=2.0) if faster == "fused" else times.update(fused=2.0, chunked=1.0)
    with caplog.at_level("WARNING", logger="fastdpo"):
        chosen = _auto_call(dispatched)
    assert chosen == ("triton" if faster == "fused" else "torch", 0.0)
    assert sorted(measured) == ["chunked", "fused"]
    assert sum("times its engines" in r.message for r in caplog.records) == 1
    entry, = json.loads(auto.cache_path().read_text())["choices"].values()
    assert entry["backend"] == chosen[0]
    # Reused in this process, and read back from the file by a new one; no second measurement.
    measured.clear()
    times.update(fused=times["chunked"], chunked=times["fused"])  # a new measurement would now pick the other
    assert _auto_call(dispatched, seed=1) == chosen
    auto.forget()
    assert _auto_call(dispatched, seed=2) == chosen
    assert measured == []


def test_auto_under_a_budget_may_run_lean(measuring, dispatched):
    times, measured = measuring
    times.update({"fused": 3.0, "fused-fast": 4.0, "chunked": 1.0, "chunked-fast": 2.0})
    assert _auto_call(dispatched, memory=0.25) == ("torch", 0.0)
    assert sorted(measured) == ["chunked", "chunked-fast", "fused", "fused-fast"]
    measured.clear()
    times["chunked-fast"] = 0.5
    assert _auto_call(dispatched, memory=0.5) == ("torch", 0.5)  # another memory mode: measured again


def test_fastdpo_backend_pins_the_engine(measuring, dispatched, monkeypatch):
    times, measured = measuring
    times.update(fused=1.0, chunked=2.0)
    monkeypatch.setenv(auto.ENV_BACKEND, "torch")
    assert _auto_call(dispatched) == ("torch", 0.0)
    assert measured == []
    monkeypatch.setenv(auto.ENV_BACKEND, "cuBLAS")
    with pytest.raises(ValueError, match="FASTDPO_BACKEND must be one of"):
        _auto_call(dispatched)


def test_a_corrupt_cache_file_is_ignored_with_a_warning(measuring, dispatched):
    times, measured = measuring
    times.update(fused=2.0, chunked=1.0)
    auto.cache_path().write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable engine cache"):
        assert _auto_call(dispatched) == ("torch", 0.0)
    assert measured and json.loads(auto.cache_path().read_text())["choices"]


def test_the_cache_key_separates_dtypes_buckets_and_modes(measuring, dispatched):
    times, measured = measuring
    times.update(fused=1.0, chunked=2.0)
    key = auto.cache_key
    base = dict(device_name="card", dtype=torch.bfloat16, hidden_size=4096, vocab=128256, tokens=3000, memory=0.0,
                extras=False, softcap=False)
    assert key(**base) == key(**{**base, "tokens": 4096})  # one power-of-two bucket
    for change in ({"tokens": 4097}, {"dtype": torch.float16}, {"memory": math.inf}, {"extras": True},
                   {"hidden_size": 2048}, {"vocab": 32000}, {"device_name": "other"}, {"softcap": True}):
        assert key(**base) != key(**{**base, **change}), change
    # Through calls: a second bucket is measured once more, the first is not.
    _auto_call(dispatched, pairs=2)
    _auto_call(dispatched, pairs=5)
    _auto_call(dispatched, pairs=2, seed=3)
    assert len(measured) == 4 and len(json.loads(auto.cache_path().read_text())["choices"]) == 2


def test_auto_on_cpu_is_the_chunked_engine_without_measuring(monkeypatch, dispatched):
    monkeypatch.delenv(auto.ENV_BACKEND, raising=False)
    monkeypatch.setattr(auto, "_time", lambda *a: pytest.fail("measured on CPU"))
    assert _auto_call(dispatched) == ("torch", 0.0)


def test_auto_measurement_under_torch_compile_fullgraph(measuring, dispatched, monkeypatch):
    """The choice is made once while the step is traced and enters the graph as a constant."""
    times, measured = measuring
    times.update(fused=2.0, chunked=1.0)
    fake_time = auto._time
    ran = []

    def run_then_time(engine, opts, run, deadline, device):
        # The measurement runs real tensors while the step is being traced.
        assert not isinstance(torch.empty(1), torch._subclasses.FakeTensor)
        run()
        ran.append(engine.label)
        return fake_time(engine, opts, run, deadline, device)

    monkeypatch.setattr(auto, "_time", run_then_time)
    torch._dynamo.reset()
    hidden, weight, labels = make_batch(seed=8)

    def step(h, w):
        return fastdpo.fused_logprobs(h, w, labels, backend="auto").sum()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(h, w), (h, w))
    assert sorted(measured) == sorted(ran) == ["chunked", "fused"]
    assert {b for b, _ in dispatched} == {"torch"}
    want = torch.autograd.grad(step(h, w), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_measure_runs_every_candidate_forward_and_backward():
    """The real timer on CPU: a finite time for each candidate (no figures asserted)."""
    if not fastdpo._validate.interpreting():
        pytest.skip("TRITON_INTERPRET is off")
    candidates = [("torch", 0.0), ("torch", math.inf), ("triton", 0.0), ("triton", math.inf)]
    seconds = auto.measure(candidates, torch.device("cpu"), torch.float32, 8, 16, 40, HeadOptions(extras=True))
    assert set(seconds) == set(candidates) and all(math.isfinite(t) and t > 0 for t in seconds.values())


def test_bench_names_the_engine_auto_ran(measuring):
    from types import SimpleNamespace

    from fastdpo.bench.competitors import FastDPO

    times, _ = measuring
    times.update(fused=2.0, chunked=1.0)
    hidden, weight, labels = make_batch()
    inp = SimpleNamespace(hidden=hidden, weight=weight, labels=labels)
    assert FastDPO("auto").choice(inp) == "auto: chunked"
    assert FastDPO("triton").choice(inp) == ""


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("backend", ["auto", "Torch", "cuda", ""])
def test_head_ops_refuse_an_unknown_backend(backend, device):
    """The custom ops take a resolved backend: anything else is refused, in the real and the fake (meta) kernel,
    forward and backward, instead of silently running the torch backend."""
    hidden, weight, labels = make_batch(dtype=torch.float32, device=device)
    h, t = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    options = HeadOptions(backend=backend).op_args()
    refused = rf"backend must be one of \['triton', 'torch'\] here \(resolve 'auto' first\), got '{backend}'"
    with pytest.raises(ValueError, match=refused):
        torch.ops.fastdpo.head_forward(h, weight, None, t, *options)
    lse = torch.zeros(h.shape[0], device=device)
    empty = lse.new_empty(0)
    with pytest.raises(ValueError, match=refused):
        torch.ops.fastdpo.head_backward(lse, h, weight, None, t, lse, lse, empty, empty, t, *options, True, True,
                                        False)
