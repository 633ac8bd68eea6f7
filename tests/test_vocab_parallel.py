"""The vocabulary-parallel head (each rank holds a slice of the vocabulary) on 2 and 3 gloo ranks on CPU, against
one process.

Each spawned group runs every case at once (spawning costs seconds): the ranks hold uneven rows of the head
(the 3-rank ranges are not in rank order), pass the same hidden states and labels, and save what they got; the
test process compares it with the same call on the whole vocabulary in one process. Exact ties of the maximal
logit across two ranks check that the first argmax is the global one.
"""

import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdpo
from fastdpo import VocabParallel
from fdtest import make_batch, rel_err

V, H, H_REF, T = 53, 19, 13, 9
# Each rank's [start, stop): uneven, and for 3 ranks not in rank order.
SPLITS = {2: [(0, 20), (20, 53)], 3: [(30, 53), (0, 11), (11, 30)]}
# Row TIE_B is a copy of row TIE_A (held by another rank in both splits): a tie whose first argmax is TIE_A.
TIE_A, TIE_B = 5, 40
LOSS_OPTIONS = dict(beta=0.2, use_weighting=True, extra_metrics=True)


def _inputs(dtype=torch.float64):
    hidden, weight, labels = make_batch(pairs=2, T=T, H=H, V=V, dtype=torch.float64, seed=11)
    g = torch.Generator().manual_seed(12)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    ref_hidden = torch.randn(4, T, H_REF, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(V, H_REF, generator=g, dtype=torch.float64) * (3.0 / H_REF ** 0.5)
    ref_bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    # Token (0, 4) points along row TIE_A, which row TIE_B copies: its maximal logit is tied across two ranks.
    weight[TIE_A] = hidden[0, 4] * (8.0 / hidden[0, 4].norm() ** 2)
    weight[TIE_B], bias[TIE_B] = weight[TIE_A], bias[TIE_A]
    hidden[0, 5] = hidden[0, 4]
    hidden[2, 6] = hidden[0, 4]
    labels[0, 4], labels[0, 5], labels[2, 6] = TIE_A, TIE_B, TIE_A
    # Some chosen tokens labelled with their argmax, so that the accuracy is not 0.
    z = hidden @ weight.T + bias
    labels[1, 3:6] = z[1, 3:6].argmax(-1)
    cast = {k: v.to(dtype) for k, v in dict(hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden,
                                            ref_weight=ref_weight, ref_bias=ref_bias).items()}
    return cast, labels


def _leaves(tensors):
    return {k: v.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) for k, v in tensors.items()}


def _dpo(t, labels, backend, **kw):
    """dpo_loss with a reference head and every metric; returns the outputs and the gradients."""
    out = fastdpo.dpo_loss(t["hidden"], t["weight"], labels, bias=t["bias"], ref_hidden=t["ref_hidden"],
                           ref_weight=t["ref_weight"], ref_bias=t["ref_bias"], softcap=7.0, backend=backend,
                           **LOSS_OPTIONS, **kw)
    out.loss.backward()
    result = {"loss": out.loss.detach(), "chosen_logps": out.chosen_logps.detach(),
              "rejected_logps": out.rejected_logps.detach(), "ref_chosen_logps": out.ref_chosen_logps,
              "ref_rejected_logps": out.ref_rejected_logps}
    result.update({f"metric:{k}": v.detach() for k, v in out.metrics.items()})
    result.update({f"grad:{k}": t[k].grad for k in ("hidden", "weight", "bias")})
    return result


def _stats(t, labels, backend, **kw):
    """token_stats with the extras; the gradients of a weighted sum of the log-probs."""
    out = fastdpo.token_stats(t["hidden"], t["weight"], labels, bias=t["bias"], logit_scale=0.7, backend=backend,
                              extras=True, **kw)
    coef = torch.linspace(-1.0, 2.0, labels.numel(), dtype=out["logp"].dtype).view(labels.shape)
    (out["logp"] * coef).sum().backward()
    result = {k: v.detach() for k, v in out.items()}
    result.update({f"grad:{k}": t[k].grad for k in ("hidden", "weight", "bias")})
    return result


def _rows(t, start, stop):
    """This rank's rows of the heads (the hidden states whole)."""
    return {k: (v[start:stop] if k in ("weight", "bias", "ref_weight", "ref_bias") else v) for k, v in t.items()}


class _CountCollectives:
    """Records (name, op, shape) of every all_reduce/all_gather/broadcast while active."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                                             "broadcast")}
        for name, fn in self.saved.items():
            def wrapper(tensor, *args, _fn=fn, _name=name, **kwargs):
                op = kwargs.get("op", args[0] if args and _name == "all_reduce" else None)
                shape = tuple(tensor[0].shape) if isinstance(tensor, list) else tuple(tensor.shape)
                self.calls.append((_name, str(op).split(".")[-1], shape))
                return _fn(tensor, *args, **kwargs)
            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _expect_error(fn, kind, text):
    """True when ``fn`` raises ``kind`` with ``text`` in its message, else what happened."""
    try:
        fn()
    except kind as err:
        return text in str(err) or str(err)
    return "no error"


def _with_label(labels, value):
    bad = labels.clone()
    bad[1, 7] = value
    return bad


def _tiny_llama(path):
    """A 2-layer Llama (vocabulary 53, untied head) saved at ``path``; 4 heads, 2 kv heads: TP=2 splits them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(21)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float64).save_pretrained(path)


def _llama_batch():
    g = torch.Generator().manual_seed(22)
    ids = torch.randint(0, V, (4, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    return ids, labels


def _llama_dpo(model):
    """causal_lm_dpo_loss with the model as its own reference, every metric; loss, metrics and gradients."""
    from fastdpo.integrations.transformers import causal_lm_dpo_loss

    ids, labels = _llama_batch()
    out = causal_lm_dpo_loss(model, ids, labels, ref_model=model, backend="torch", beta=0.3, use_weighting=True)
    out.loss.backward()
    res = {"loss": out.loss.detach(), "chosen_logps": out.chosen_logps.detach()}
    res.update({f"metric:{k}": v.detach() for k, v in out.metrics.items()})
    for name, p in model.named_parameters():
        grad = p.grad
        if name == "lm_head.weight" and type(grad).__name__ == "DTensor":
            res["lm_head_grad_is_dtensor"] = True
            grad = grad.to_local()
        elif type(grad).__name__ == "DTensor":
            grad = grad.full_tensor()  # only to compare the backbone's gradients, not in the loss path
        res[f"grad:{name}"] = grad
    return res


def _worker(rank, world, port, out_dir, llama_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start, stop = SPLITS[world][rank]
    vp = VocabParallel(start, stop)
    res = {}
    t64, labels = _inputs()
    # float64, torch backend: the loss with a reference head and every metric, and the per-token statistics.
    res["dpo_torch"] = _dpo(_leaves(_rows(t64, start, stop)), labels, "torch", vocab_parallel=vp)
    res["stats_torch"] = _stats(_leaves(_rows(t64, start, stop)), labels, "torch", vocab_parallel=vp)
    # The other entry points.
    r = _leaves(_rows(t64, start, stop))
    seq = fastdpo.sequence_logprobs(r["hidden"], r["weight"], labels, bias=r["bias"], average=True,
                                    backend="torch", vocab_parallel=vp)
    tok = fastdpo.fused_logprobs(r["hidden"], r["weight"], labels, bias=r["bias"], backend="torch",
                                 vocab_parallel=VocabParallel(start, stop, vocab_size=V))
    (seq.sum() + tok.sum()).backward()
    res["entry"] = {"seq": seq.detach(), "tok": tok.detach(), "grad:hidden": r["hidden"].grad,
                    "grad:weight": r["weight"].grad}
    module = fastdpo.FusedLinearDPOLoss(softcap=7.0, backend="torch", vocab_parallel=vp, **LOSS_OPTIONS)
    r = _leaves(_rows(t64, start, stop))
    out = module(r["hidden"], r["weight"], labels, bias=r["bias"], ref_hidden=r["ref_hidden"],
                 ref_weight=r["ref_weight"], ref_bias=r["ref_bias"])
    res["module"] = {"loss": out.loss.detach()}
    # Triton through the interpreter, fp32.
    t32, _ = _inputs(torch.float32)
    res["dpo_triton"] = _dpo(_leaves(_rows(t32, start, stop)), labels, "triton", vocab_parallel=vp)
    res["stats_triton"] = _stats(_leaves(_rows(t32, start, stop)), labels, "triton", vocab_parallel=vp)
    # A DTensor weight and bias sharded on dim 0 over a 1-D mesh (transformers' colwise lm-head).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    d = dict(t64)
    d["weight"], d["bias"] = (torch.nn.Parameter(distribute_tensor(t64[k], mesh, [Shard(0)]))
                              for k in ("weight", "bias"))
    d["ref_weight"], d["ref_bias"] = (distribute_tensor(t64[k], mesh, [Shard(0)]) for k in ("ref_weight", "ref_bias"))
    d["hidden"] = t64["hidden"].clone().requires_grad_(True)
    got = _dpo(d, labels, "torch")
    got["grad:weight"] = d["weight"].grad.to_local()
    got["grad:bias"] = d["bias"].grad.to_local()
    got["grad_is_dtensor"] = type(d["weight"].grad).__name__
    res["dpo_dtensor"] = got
    # The collectives of one head call (vocab_size given: no check of the split).
    r = _leaves(_rows(t64, start, stop))
    with _CountCollectives() as fwd:
        tok = fastdpo.token_stats(r["hidden"], r["weight"], labels, bias=r["bias"], backend="torch", extras=True,
                                  vocab_parallel=VocabParallel(start, stop, vocab_size=V))["logp"]
    with _CountCollectives() as bwd:
        tok.sum().backward()
    res["collectives"] = {"forward": fwd.calls, "backward": bwd.calls}
    r32 = _leaves(_rows(t32, start, stop))
    with _CountCollectives() as fwd:
        tok = fastdpo.token_stats(r32["hidden"], r32["weight"], labels, backend="triton", extras=True,
                                  vocab_parallel=VocabParallel(start, stop, vocab_size=V))["logp"]
    with _CountCollectives() as bwd:
        tok.sum().backward()
    res["collectives_triton"] = {"forward": fwd.calls, "backward": bwd.calls}
    # No labelled token: no collective is needed, none may hang.
    empty = {}
    for backend, tt in (("torch", t64), ("triton", t32)):
        r0 = _leaves(_rows(tt, start, stop))
        tok = fastdpo.token_stats(r0["hidden"], r0["weight"], torch.full_like(labels, -100), backend=backend,
                                  extras=True, vocab_parallel=vp)["logp"]
        tok.sum().backward()
        empty[backend] = (tok.abs().sum().item(), r0["hidden"].grad.abs().sum().item(),
                          r0["weight"].grad.abs().sum().item())
    res["no_labels"] = empty
    # Labels that differ on one rank only where a position-weighted sum cannot see it (flat positions 3 and 4,
    # weights 4 and 5: +5·4 − 4·5 = 0), or only at the first position.
    same_sum = labels.clone().view(-1)
    same_sum[3], same_sum[4] = (15, 16) if rank == 1 else (10, 20)
    first = labels.clone()
    first[0, 0] = 8 if rank == 1 else 7  # labelled on every rank: the same count of labelled tokens
    # Ranges that tile [1, V) but not [0, V): the rank holding row 0 gives it up.
    start1 = max(start, 1)
    # Errors that every rank raises alike.
    res["errors"] = {
        "labels_same_weighted_sum": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], r["weight"], same_sum.view(labels.shape), backend="torch",
                                           vocab_parallel=vp), ValueError, "same labels"),
        "labels_differ_at_0": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], r["weight"], first, backend="torch", vocab_parallel=vp),
            ValueError, "same labels"),
        "not_from_0": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], r["weight"][start1 - start:], labels, backend="torch",
                                           vocab_parallel=VocabParallel(start1, stop)),
            ValueError, "must tile the vocabulary"),
        "labels_differ": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], r["weight"], _with_label(labels, rank),
                                           backend="torch", vocab_parallel=vp), ValueError, "same labels"),
        "gap": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], r["weight"][: stop - start - (start == 0)], labels,
                                           backend="torch",
                                           vocab_parallel=VocabParallel(start, stop - (start == 0))),
            ValueError, "must tile the vocabulary"),
        "replicated_dtensor": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], distribute_tensor(t64["weight"], mesh, [Replicate()]),
                                           labels, backend="torch"), ValueError, "sharded on dim 0"),
        "dtensor_and_vocab_parallel": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], d["weight"], labels, backend="torch", vocab_parallel=vp),
            ValueError, "do not pass vocab_parallel"),
        "label_range": _expect_error(
            lambda: fastdpo.fused_logprobs(r["hidden"], r["weight"], _with_label(labels, V),
                                           backend="torch", vocab_parallel=vp), ValueError, f"[0, {V})"),
    }
    if llama_path is not None:
        # transformers' own tensor parallelism (tp_plan="auto": the lm-head is 'colwise', a DTensor sharded on
        # dim 0) loaded on the gloo ranks; the head is never gathered.
        from transformers import AutoModelForCausalLM

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        model = AutoModelForCausalLM.from_pretrained(llama_path, tp_plan="auto", dtype=torch.float64)
        res["llama_tp"] = _llama_dpo(model)
        res["llama_tp"]["lm_head_placements"] = str(model.lm_head.weight.placements)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def spawned(request):
    """What every rank of one spawned group saved, with its world size."""
    world = request.param
    with tempfile.TemporaryDirectory() as out_dir:
        llama_path = None
        if world == 2:
            llama_path = os.path.join(out_dir, "llama")
            _tiny_llama(llama_path)
        mp.spawn(_worker, args=(world, _free_port(), out_dir, llama_path), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
        reference = None
        if llama_path is not None:
            from transformers import AutoModelForCausalLM

            reference = _llama_dpo(AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float64))
        yield world, ranks, reference


def _reference(kind, dtype=torch.float64, backend="torch"):
    """The same call on the whole vocabulary in one process."""
    t, labels = _inputs(dtype)
    if kind == "dpo":
        return _dpo(_leaves(t), labels, backend)
    return _stats(_leaves(t), labels, backend)


def _compare(got, ref, start, stop, tol):
    for key, want in ref.items():
        have = got[key]
        if key in ("grad:weight", "grad:bias"):
            want = want[start:stop]
        assert have.shape == want.shape, key
        if want.dtype == torch.bool:
            assert torch.equal(have, want), key
        else:
            assert torch.isfinite(have).all(), key
            assert rel_err(have, want) <= tol, (key, rel_err(have, want))


def test_torch_float64_matches_one_process(spawned):
    world, ranks, _ = spawned
    dpo, stats = _reference("dpo"), _reference("stats")
    assert stats["is_top1"][0, 4] and not stats["is_top1"][0, 5] and stats["is_top1"][1, 3:6].all()
    assert dpo["metric:mean_token_accuracy"] > 0
    for rank, res in enumerate(ranks):
        start, stop = SPLITS[world][rank]
        _compare(res["dpo_torch"], dpo, start, stop, 1e-12)
        _compare(res["stats_torch"], stats, start, stop, 1e-12)
        assert res["module"]["loss"].item() == pytest.approx(dpo["loss"].item(), rel=1e-12)


def test_every_rank_returns_the_same(spawned):
    world, ranks, _ = spawned
    for key in ("loss", "metric:entropy", "metric:mean_token_accuracy", "metric:logits/chosen", "grad:hidden"):
        for res in ranks[1:]:
            assert torch.equal(res["dpo_torch"][key], ranks[0]["dpo_torch"][key]), key


def test_sequence_and_token_logprobs(spawned):
    world, ranks, _ = spawned
    t, labels = _inputs()
    r = _leaves(t)
    seq = fastdpo.sequence_logprobs(r["hidden"], r["weight"], labels, bias=r["bias"], average=True, backend="torch")
    tok = fastdpo.fused_logprobs(r["hidden"], r["weight"], labels, bias=r["bias"], backend="torch")
    (seq.sum() + tok.sum()).backward()
    ref = {"seq": seq.detach(), "tok": tok.detach(), "grad:hidden": r["hidden"].grad, "grad:weight": r["weight"].grad}
    for rank, res in enumerate(ranks):
        _compare(res["entry"], ref, *SPLITS[world][rank], 1e-12)


def test_triton_interpreter_matches_float64(spawned):
    """fp32 kernels against the float64 reference: logits over H=19 products and sums over V=53 terms in fp32
    carry ~1e-6 relative error (the one-process Triton run shows the same), so 2e-5 is a bound that still fails
    on a missing rank's contribution or a wrong rescaling (errors of order 1)."""
    world, ranks, _ = spawned
    dpo, stats = _reference("dpo"), _reference("stats")
    one_process = _reference("stats", torch.float32, "triton")
    _compare(one_process, stats, 0, V, 2e-5)
    for rank, res in enumerate(ranks):
        start, stop = SPLITS[world][rank]
        _compare(res["dpo_triton"], dpo, start, stop, 2e-5)
        _compare(res["stats_triton"], stats, start, stop, 2e-5)


def test_dtensor_weight(spawned):
    world, ranks, _ = spawned
    dpo = _reference("dpo")
    per = -(-V // world)
    for rank, res in enumerate(ranks):
        got = dict(res["dpo_dtensor"])
        assert got.pop("grad_is_dtensor") == "DTensor"
        start, stop = rank * per, min(V, (rank + 1) * per)
        _compare(got, dpo, start, stop, 1e-12)


def test_collectives(spawned):
    """Forward: one all-reduce (max) of the [n] maxima, one all-reduce (sum) of the packed [5 + world, n] sums;
    backward: one all-reduce (sum) of the [n, H] hidden gradient. Nothing else, no [N, V] or [V, H] tensor."""
    world, ranks, _ = spawned
    _, labels = _inputs()
    n = int((labels != -100).sum())
    for res in ranks:
        c = res["collectives"]
        assert c["forward"] == [("all_reduce", "MAX", (n,)), ("all_reduce", "SUM", (5 + world, n))]
        assert c["backward"] == [("all_reduce", "SUM", (n, H))]
        # The Triton backend keeps the labelled count on the device: it reduces all N rows.
        c, N = res["collectives_triton"], labels.numel()
        assert c["forward"] == [("all_reduce", "MAX", (N,)), ("all_reduce", "SUM", (5 + world, N))]
        assert c["backward"] == [("all_reduce", "SUM", (N, H))]


def test_no_labelled_token(spawned):
    world, ranks, _ = spawned
    for res in ranks:
        assert res["no_labels"] == {"torch": (0.0, 0.0, 0.0), "triton": (0.0, 0.0, 0.0)}


def test_errors_on_every_rank(spawned):
    world, ranks, _ = spawned
    for res in ranks:
        assert res["errors"] == {"labels_differ": True, "gap": True, "label_range": True,
                                 "replicated_dtensor": True, "dtensor_and_vocab_parallel": True,
                                 "labels_same_weighted_sum": True, "labels_differ_at_0": True, "not_from_0": True}


def test_vocab_parallel_arguments():
    with pytest.raises(TypeError, match="start must be an int"):
        VocabParallel(0.0, 4)
    with pytest.raises(TypeError, match="stop must be an int"):
        VocabParallel(0, True)
    with pytest.raises(ValueError, match="0 <= start < stop"):
        VocabParallel(4, 4)
    with pytest.raises(ValueError, match="0 <= start < stop"):
        VocabParallel(-1, 4)
    with pytest.raises(ValueError, match="vocab_size must be >= stop"):
        VocabParallel(0, 4, vocab_size=3)
    with pytest.raises(TypeError, match="ProcessGroup"):
        VocabParallel(0, 4, group="world")
    with pytest.raises(TypeError, match="vocab_size must be an int or None"):
        VocabParallel(0, 4, vocab_size=4.0)
    # NumPy integers are integers; stored as Python ints.
    vp = VocabParallel(np.int64(3), np.int32(10), vocab_size=np.uint16(12))
    assert vp == VocabParallel(3, 10, vocab_size=12) and type(vp.start) is int and vp.rows == 7
    with pytest.raises(ValueError, match="0 <= start < stop"):
        VocabParallel(np.int64(5), np.int64(5))
    hidden, weight, labels = make_batch(V=V)
    with pytest.raises(TypeError, match="vocab_parallel must be a fastdpo.VocabParallel"):
        fastdpo.fused_logprobs(hidden, weight, labels, vocab_parallel=(0, V))
    with pytest.raises(TypeError, match="vocab_parallel must be a fastdpo.VocabParallel"):
        fastdpo.FusedLinearDPOLoss(vocab_parallel=(0, V))
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        fastdpo.fused_logprobs(hidden, weight[:7], labels.tolist(), vocab_parallel=VocabParallel(3, 10))
    with pytest.raises(ValueError, match=r"weight must hold this rank's rows \[3, 10\)"):
        fastdpo.fused_logprobs(hidden, weight, labels, vocab_parallel=VocabParallel(3, 10))
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastdpo.fused_logprobs(hidden, weight, labels, vocab_parallel=VocabParallel(0, V))


def test_transformers_tp_plan(spawned):
    """A Llama loaded with tp_plan="auto" on 2 gloo ranks: causal_lm_dpo_loss finds the DTensor lm-head
    (Shard(0)) and gives the one-process loss, metrics and gradients (its rows of the head's, every backbone
    parameter's)."""
    world, ranks, reference = spawned
    if reference is None:
        pytest.skip("the tiny Llama's 4 attention heads split over 2 ranks only")
    per = -(-V // world)
    for rank, res in enumerate(ranks):
        got = dict(res["llama_tp"])
        assert got.pop("lm_head_placements") == "(Shard(dim=0),)"
        assert got.pop("lm_head_grad_is_dtensor")
        assert set(got) == set(reference)
        _compare(got, {k: v for k, v in reference.items() if k != "grad:lm_head.weight"}, 0, V, 1e-12)
        want = reference["grad:lm_head.weight"][rank * per:(rank + 1) * per]
        assert rel_err(got["grad:lm_head.weight"], want) <= 1e-12
