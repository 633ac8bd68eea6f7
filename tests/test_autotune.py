"""The fused kernels' autotuner, without a GPU: its search with injected timings, the disk cache, the switch, and
that timing trials leave the results of the real launch unchanged (through the interpreter at a tiny shape)."""

import dataclasses
import json
import math

import pytest
import torch

from fastdpo import _triton_backend
from fastdpo._options import HeadOptions
from fastdpo.kernels import autotune, logprob_bwd, logprob_fwd
from fastdpo.kernels import config as C

KEY = autotune.TuneKey("Test GPU 80GB", "bfloat16", 4096, 4096, 128256, bias=True)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    monkeypatch.delenv(autotune.ENV_BUDGET, raising=False)
    autotune.forget()
    yield tmp_path / "cache"
    autotune.forget()


@pytest.fixture
def base(monkeypatch):
    """The sm_90 bf16 default on a 132-SM GPU (the tests run the kernels under the interpreter)."""
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "interpret", False)
    return C.default_config(torch.bfloat16, (9, 0), sm_count=132)


def fake_measure(calls=None):
    """Injected timings: deeper pipelines, BLOCK_K 128, the 2-CTA grad-hidden, 4 x SMs and 8192 chunks win."""
    def measure(phase, cfg):
        if calls is not None:
            calls.append((phase, cfg))
        if phase == "forward":
            return 10.0 - cfg.fwd_stages - (cfg.fwd_block_k == 128) + abs(cfg.min_programs - 4 * 132) / 1000
        return (20.0 - cfg.dlogits_stages - 2 * (cfg.dlogits_block_k == 128) - (cfg.gh_block_m == 64)
                - (cfg.vocab_chunk == 8192))
    return measure


def test_space_starts_at_the_default_and_spans_what_is_tuned(base):
    assert base.min_programs == C.MIN_PROGRAMS_PER_SM * 132
    space = dict(C.tuning_space(base, sm_count=132))
    assert list(space) == ["fwd", "min_programs", "dlogits", "gh", "vocab_chunk"]
    for family, cands in space.items():
        assert dataclasses.replace(base, **cands[0]) == base, family  # the default is timed first
    for prefix in ("fwd", "dlogits"):
        got = {(c[f"{prefix}_block_k"], c[f"{prefix}_stages"]) for c in space[prefix]}
        assert got == {(k, s) for k in (64, 128) for s in (3, 4, 5)}
    assert [c["min_programs"] for c in space["min_programs"]] == [528, 264, 1056]
    assert all(p % 132 == 0 for c in space["min_programs"] for p in c.values())
    assert [c.get("vocab_chunk", base.vocab_chunk) for c in space["vocab_chunk"]] == [4096, 8192]
    assert space["gh"][1] == C.GH_TWO_CTAS
    assert all("fwd_block_v" not in c for cands in space.values() for c in cands)
    assert "vocab_chunk" not in dict(C.tuning_space(base, 132, tune_chunk=False))
    # Within a block's shared memory (227 KiB on sm_90): BLOCK_K 128 fits 3 stages of 128x128 bf16 tiles, not 4.
    fits = dict(C.tuning_space(base, 132, shared_limit=232448, itemsize=2))
    assert {(c.get("fwd_block_k", 64), c.get("fwd_stages", 3)) for c in fits["fwd"]} == {
        (64, 3), (64, 4), (64, 5), (128, 3)}
    assert all(C.shared_bytes(dataclasses.replace(base, **c), f, 2) <= 232448 for f in ("fwd", "dlogits", "gh")
               for c in fits[f])
    assert C.shared_bytes(base, "fwd", 2) == 96 * 1024  # what the compiled forward allocates (compile guard)


def test_search_picks_the_fastest_of_each_family(base):
    best, rows = autotune.search(base, C.tuning_space(base, 132), fake_measure(), budget=math.inf)
    assert (best.fwd_stages, best.fwd_block_k, best.dlogits_stages, best.dlogits_block_k) == (5, 128, 5, 128)
    assert best.gh_block_m == C.GH_TWO_CTAS["gh_block_m"] and best.vocab_chunk == 8192
    assert best.min_programs == 528 and best.fwd_block_v == base.fwd_block_v
    assert len(rows) == sum(len(c) for _, c in C.tuning_space(base, 132)) and all(r[2] is not None for r in rows)


def test_search_ties_keep_the_default_and_failures_are_rows(base):

    def measure(phase, cfg):
        if cfg.fwd_stages == 5:
            raise RuntimeError("out of resources: shared memory")
        return 1.0

    best, rows = autotune.search(base, C.tuning_space(base, 132), measure, budget=math.inf)
    assert best == base
    failed = [r for r in rows if r[2] is None]
    assert failed and all("out of resources" in r[3] for r in failed)


def test_search_stops_at_its_budget_with_the_best_so_far(base):
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    best, rows = autotune.search(base, C.tuning_space(base, 132), fake_measure(), budget=4.5, clock=clock)
    timed = [r for r in rows if r[2] is not None]
    assert len(timed) == 4 and all(r[0] == "fwd" for r in timed)
    assert best.fwd_stages == 5 and best.dlogits_stages == base.dlogits_stages  # later families not reached
    assert sum(r[3].startswith("skipped") for r in rows) == len(rows) - 4


def test_tuned_choice_is_cached_on_disk_and_reused(cache, base):
    calls = []
    first = autotune.tuned_config(KEY, base, fake_measure(calls), sm_count=132)
    assert first != base and calls
    (path,) = cache.iterdir()
    assert path.name.startswith("autotune-test-gpu-80gb-torch") and "triton" in path.name and "fastdpo" in path.name
    data = json.loads(path.read_text())
    entry = data["configs"][KEY.text()]
    assert C.KernelConfig(**entry["config"]) == first and entry["complete"] and entry["trials"]
    # Another process: nothing in memory, the file decides, nothing is timed.
    autotune.forget()
    calls.clear()
    assert autotune.tuned_config(KEY, base, fake_measure(calls), sm_count=132) == first and not calls
    # Another key is tuned on its own, into the same file.
    other = dataclasses.replace(KEY, tokens=8192)
    autotune.tuned_config(other, base, fake_measure(calls), sm_count=132)
    assert calls and set(json.loads(path.read_text())["configs"]) == {KEY.text(), other.text()}


def test_switched_off_the_default_is_used_and_nothing_is_timed(cache, monkeypatch, base):
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    calls = []
    assert autotune.tuned_config(KEY, base, fake_measure(calls), sm_count=132) is base
    assert not calls and not cache.exists()
    # Off means the default even where a choice is cached.
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    assert autotune.tuned_config(KEY, base, fake_measure(), sm_count=132) != base
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    assert autotune.tuned_config(KEY, base, fake_measure(calls), sm_count=132) is base and not calls
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "maybe")
    with pytest.raises(ValueError, match=autotune.ENV_AUTOTUNE):
        autotune.tuned_config(KEY, base, fake_measure(), sm_count=132)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": 99, "configs": {}}),
                                     json.dumps({"schema": 1, "configs": {KEY.text(): {"config": {"fwd_block_m": 3}}}}),
                                     json.dumps({"schema": 1, "configs": {KEY.text(): {"config": {"nope": 1}}}})])
def test_a_corrupt_cache_is_ignored_and_rewritten(cache, content, base):
    path = autotune.cache_path(KEY.device)
    cache.mkdir(parents=True)
    with open(path, "w") as f:
        f.write(content)
    calls = []
    best = autotune.tuned_config(KEY, base, fake_measure(calls), sm_count=132)
    assert calls and best != base
    assert C.KernelConfig(**json.loads(open(path).read())["configs"][KEY.text()]["config"]) == best


def test_the_first_tuning_is_announced_once(capsys, monkeypatch, base):
    monkeypatch.setattr(autotune, "_announced", False)
    autotune.tuned_config(KEY, base, fake_measure(), sm_count=132)
    autotune.tuned_config(dataclasses.replace(KEY, tokens=512), base, fake_measure(), sm_count=132)
    err = capsys.readouterr().err
    assert err.count("fastdpo: tuning the fused kernels") == 1 and autotune.ENV_AUTOTUNE in err


def test_without_tensors_to_time_the_default_is_returned(cache, base, monkeypatch):
    assert autotune.tuned_config(KEY, base, None) is base and not cache.exists()
    # The miss is remembered: later calls do not read the disk again.
    monkeypatch.setattr(autotune, "_read", lambda path: pytest.fail("the cache file was read again"))
    assert autotune.tuned_config(KEY, base, None) is base


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "soon"])
def test_budget_must_be_positive_seconds(monkeypatch, bad):
    monkeypatch.setenv(autotune.ENV_BUDGET, bad)
    with pytest.raises(ValueError, match=autotune.ENV_BUDGET):
        autotune.budget_s()


def test_token_bucket_is_a_power_of_two():
    assert [autotune.token_bucket(n) for n in (0, 1, 256, 257, 4096, 4097)] == [256, 256, 256, 512, 4096, 8192]


def _run(x, w, b, targets, opts, cfg):
    rows, tgt, nv, valid = _triton_backend._compact(targets, opts.ignore_index)
    stats = logprob_fwd.logprob_forward(x, w, b, rows, tgt, nv, softcap=opts.softcap, scale=opts.scale,
                                        extras=opts.extras, config=cfg)
    m = stats[0].amax(0)
    lse = torch.where(valid, m + torch.log((stats[1] * torch.exp(stats[0] - m)).sum(0)), torch.zeros_like(m))
    g = torch.where(valid, torch.linspace(-1.0, 1.0, x.shape[0]), torch.zeros_like(m))
    grads = logprob_bwd.logprob_backward(x, w, b, rows, tgt, nv, lse, g, softcap=opts.softcap, scale=opts.scale,
                                         needs=(True, True, True), config=cfg)
    return (torch.where(valid, lse, 0), *grads)


def test_timing_trials_leave_the_real_launch_unchanged(monkeypatch):
    """Each candidate is run twice by the tuner (warm-up and timed run) on the call's tensors; the middle vocabulary
    chunks' fp32 accumulator must not carry one trial into the next, nor into the real launch."""
    monkeypatch.setattr(autotune, "TRIAL_REPEATS", 1)
    monkeypatch.setattr(autotune, "TRIAL_WARMUP", 1)
    torch.manual_seed(0)
    N, H, V = 37, 40, 100  # V over several 24-column chunks (interpreter config)
    x = torch.randn(N, H)
    w = torch.randn(V, H) / H ** 0.5
    b = torch.randn(V)
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100
    opts = HeadOptions(backend="triton", softcap=30.0, scale=0.9)
    base = C.default_config(torch.float32)
    assert V > 2 * base.vocab_chunk
    before = _run(x, w, b, targets, opts, base)
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    measure = _triton_backend._measure(x, w, b, opts, _triton_backend._compact(targets, opts.ignore_index))
    space = [("fwd", [{}, {"fwd_stages": 4}]), ("gh", [{}, dict(C.GH_TWO_CTAS, gh_block_m=16, gh_block_k=16)]),
             ("vocab_chunk", [{}, {"vocab_chunk": 2 * base.vocab_chunk}])]
    chosen, rows = autotune.search(base, space, measure, budget=math.inf)
    assert all(r[2] is not None for r in rows), rows
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(b, b0)
    for got, want in zip(_run(x, w, b, targets, opts, base), before):
        assert torch.equal(got, want)  # bit-identical after the trials
    for got, want in zip(_run(x, w, b, targets, opts, chosen), before):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_partial_keep_never_changes_the_chunk_its_kept_columns_are_laid_out_by(base):
    calls = []
    best = autotune.tuned_config(dataclasses.replace(KEY, partial_keep=True), base, fake_measure(calls), sm_count=132)
    assert calls and {cfg.vocab_chunk for _, cfg in calls} == {base.vocab_chunk} == {best.vocab_chunk}
    assert {cfg.fwd_block_v for _, cfg in calls} == {base.fwd_block_v}


def test_tune_command_needs_a_gpu_and_a_whole_custom_head(capsys):
    from fastdpo.bench import cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["tune", "--shape", "gemma2-2b"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    for bad in (["tune", "--hidden", "64"], ["tune", "--shape", "llama3-8b", "--hidden", "64", "--vocab", "99",
                                               "--tokens", "8"], ["tune", "--dtype", "int8"]):
        with pytest.raises(SystemExit):
            cli.main(bad)
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        _triton_backend.tune_ahead(8, 16, 32, device="cpu")


def test_a_calls_key_holds_host_known_values_only():
    x, w = torch.empty(3000, 64, dtype=torch.bfloat16), torch.empty(1000, 64, dtype=torch.bfloat16)
    key = _triton_backend.tune_key("GPU", x, w, None, HeadOptions(backend="triton"))
    assert key == autotune.TuneKey("GPU", "bfloat16", 4096, 64, 1000)
    # Token counts in one power-of-two bucket share the choice; the flags that pick kernels do not.
    assert _triton_backend.tune_key("GPU", x[:2100], w, None, HeadOptions(backend="triton")) == key
    flagged = _triton_backend.tune_key("GPU", x, w, torch.empty(1000), HeadOptions(backend="triton", softcap=30.0,
                                                                                  extras=True, memory=0.5))
    assert (flagged.bias, flagged.softcap, flagged.extras, flagged.partial_keep) == (True, True, True, True)
    for memory in (0.0, float("inf")):  # lean and fast tune alike; only a partial budget pins the chunk
        opts = HeadOptions(backend="triton", memory=memory)
        assert not _triton_backend.tune_key("GPU", x, w, None, opts).partial_keep
    assert len({key.text(), flagged.text()}) == 2
