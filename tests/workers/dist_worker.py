"""Worker of ``tests/test_distributed.py``: every data-parallel wrapping on CPU gloo ranks against one process.

``run(world_size, out_path)`` spawns ``world_size`` processes that share one gloo process group and run every case
of :data:`CASES` in turn; rank 0 writes ``{case: result}`` as JSON to ``out_path``. A result is either
``{"error": traceback}``, ``{"skip": reason}`` or the numbers the test asserts on.

Averaging convention: the global batch holds ``P`` pairs; rank ``r`` takes pairs ``[r·P/W, (r+1)·P/W)`` (its chosen
rows and the matching rejected rows). Each rank's loss is the mean over its own pairs, and DDP, FSDP and ZeRO
average gradients over the ranks, so with the same number of pairs per rank the gradients equal those of one process
computing the mean loss over the whole global batch.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

V, HIDDEN, LAYERS = 101, 32, 2
PAIRS, T = 4, 9  # global batch: 4 pairs = 8 rows of 9 tokens
BETA = 0.5


# --- the tiny model and the batch ------------------------------------------------------------------------------

def make_model(tied=False, dtype=torch.float64, seed=0):
    """A 2-layer Llama (hidden 32, vocabulary 101), its head scaled up so that the logits are peaked."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                      tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.to(dtype)


def make_pair(tied=False, dtype=torch.float64):
    """(policy, reference) in ``dtype``: the reference is the policy with perturbed weights, frozen."""
    policy = make_model(tied, torch.float64)
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05 * p.abs().mean())
    # Parameters only: FSDP's mixed precision casts parameters, never buffers (the rotary frequencies stay fp64).
    for p in [*policy.parameters(), *reference.parameters()]:
        p.data = p.data.to(dtype)
    return policy, reference.requires_grad_(False).eval()


def global_batch():
    """``[2P, T]`` ids, unshifted labels (prompt and right padding ignored) and attention mask."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, V, (2 * PAIRS, T), generator=g)
    labels = ids.clone()
    attention = torch.ones_like(ids)
    labels[:, :3] = -100
    for row, pad in ((1, 2), (4, 3), (6, 1)):
        ids[row, T - pad:] = 0
        labels[row, T - pad:] = -100
        attention[row, T - pad:] = 0
    return ids, labels, attention


def local_rows(rank, world):
    """Rows of the global batch on ``rank``: its chosen rows, then the matching rejected rows."""
    per = PAIRS // world
    chosen = list(range(rank * per, (rank + 1) * per))
    return chosen + [PAIRS + i for i in chosen]


def local_batch(rank, world):
    rows = local_rows(rank, world)
    return tuple(x[rows] for x in global_batch())


def clean(name):
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(prefix, "")
    return name


def dpo_loss(model, ref, batch, padding_free=False):
    from fastdpo.integrations.transformers import causal_lm_dpo_loss

    ids, labels, attention = batch
    return causal_lm_dpo_loss(model, ids, labels, attention, ref_model=ref, beta=BETA, backend="torch",
                              padding_free=padding_free).loss


def one_process_grads(tied=False, dtype=torch.float64):
    """Loss and gradients of one process on the whole global batch."""
    policy, ref = make_pair(tied, dtype)
    loss = dpo_loss(policy, ref, global_batch())
    loss.backward()
    return loss.item(), {n: p.grad.to(torch.float64) for n, p in policy.named_parameters()}


def one_process_per_rank_grads(world, dtype):
    """One process emulating ``world`` ranks in ``dtype``: each rank's batch on its own, gradients averaged in fp32
    (what FSDP's mixed precision does with ``reduce_dtype=float32``)."""
    total = None
    for rank in range(world):
        policy, ref = make_pair(False, dtype)
        dpo_loss(policy, ref, local_batch(rank, world)).backward()
        grads = {n: p.grad.to(torch.float32) for n, p in policy.named_parameters()}
        total = grads if total is None else {n: total[n] + grads[n] for n in grads}
    return {n: (g / world).to(torch.float64) for n, g in total.items()}


def compare(grads, expected):
    """Largest gradient difference, relative to the largest gradient entry of that parameter."""
    if grads.keys() != expected.keys():
        raise AssertionError(f"parameter names differ: {sorted(grads.keys() ^ expected.keys())}")
    errors = {n: ((grads[n].to(torch.float64) - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-30))
              .item() for n in expected}
    worst = max(errors, key=errors.get)
    head = [v for n, v in errors.items() if "lm_head" in n or "embed_tokens" in n]
    return {"max_rel_err": errors[worst], "worst": worst, "n_params": len(errors),
            "head_rel_err": max(head) if head else None}


def norm_rel_err(grads, expected):
    """``||g − g_ref|| / ||g_ref||`` over all parameters together."""
    num = sum(((grads[n].to(torch.float64) - expected[n]) ** 2).sum() for n in expected)
    den = sum((expected[n] ** 2).sum() for n in expected)
    return (num / den).sqrt().item()


# --- the wrappers ----------------------------------------------------------------------------------------------

def case_ddp(rank, world, find_unused):
    from torch.nn.parallel import DistributedDataParallel as DDP

    policy, ref = make_pair()
    model = DDP(policy, find_unused_parameters=find_unused)
    grads = {}
    # Two steps on the same batch: DDP's "mark a variable ready only once" shows from the first backward on, and
    # the reducer must be ready for a second iteration.
    for _ in range(2):
        model.zero_grad()
        loss = dpo_loss(model, ref, local_batch(rank, world))
        loss.backward()
    grads = {clean(n): p.grad.clone() for n, p in model.named_parameters()}
    return loss, grads


def _fsdp1_layer_policy():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return ModuleWrapPolicy({LlamaDecoderLayer})


def case_fsdp1(rank, world, use_orig_params, head_unit=False, padding_free=False):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    policy, ref = make_pair()
    kw = dict(use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    wrap = _fsdp1_layer_policy()
    if head_unit:
        from torch.distributed.fsdp.wrap import CustomPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        wrap = CustomPolicy(lambda m: isinstance(m, LlamaDecoderLayer) or m is policy.lm_head)
    model = FSDP(policy, auto_wrap_policy=wrap, **kw)
    assert not head_unit or isinstance(policy.lm_head, FSDP)
    ref = FSDP(ref, auto_wrap_policy=_fsdp1_layer_policy(), **kw)
    loss = dpo_loss(model, ref, local_batch(rank, world), padding_free)
    loss.backward()
    if use_orig_params:
        with FSDP.summon_full_params(model, with_grads=True):
            grads = {clean(n): p.grad.clone() for n, p in model.named_parameters()}
    else:
        # Flat parameters: read the gradient back as the change made by one SGD step of size 1.
        with FSDP.summon_full_params(model):
            before = {clean(n): p.detach().clone() for n, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        with FSDP.summon_full_params(model):
            grads = {clean(n): before[clean(n)] - p.detach() for n, p in model.named_parameters()}
    return loss, grads


def fsdp2_wrap(model, mode, **kw):
    """``fully_shard`` as each wrapping does it (``kw``: e.g. ``mp_policy``, ``reshard_after_forward``)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if mode == "head_unit":  # the head in its own unit (what a size-based policy gives a large head)
        fully_shard(model.lm_head, **kw)
    elif mode == "tail":  # accelerate: the embedding, and [final norm, lm-head] resharded only after backward
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        if not tied:
            fully_shard(model.model.embed_tokens, **kw)
        tail = [model.model.norm, model.model.embed_tokens, model.lm_head] if tied else [model.model.norm,
                                                                                             model.lm_head]
        fully_shard(tail, **{**kw, "reshard_after_forward": False})
    fully_shard(model, **kw)
    return model


def fsdp2_grads(model):
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def case_fsdp2(rank, world, mode, tied=False, mp=False, padding_free=False):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mp:
        policy, ref = make_pair(tied, torch.float32)
        kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    else:
        policy, ref = make_pair(tied)
        kw = {}
    model = fsdp2_wrap(policy, mode, **kw)
    ref = fsdp2_wrap(ref, mode, reshard_after_forward=True, **kw)
    loss = dpo_loss(model, ref, local_batch(rank, world), padding_free)
    loss.backward()
    return loss, fsdp2_grads(model)


def case_zero(rank, world, stage, padding_free=False):
    from deepspeed.utils import safe_get_full_grad

    deepspeed = _deepspeed()
    # fp32: ZeRO-3 refuses fp64 parameters, and ZeRO-1/2 keep their gradients in fp32 whatever the parameters' dtype.
    policy, ref = make_pair(dtype=torch.float32)
    config = _zero_config(stage, world)
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=list(policy.parameters()), config=config)
    if stage == 3:
        ref, *_ = deepspeed.initialize(model=ref, config={k: v for k, v in config.items() if k != "optimizer"})
        # Outside a forward the heads hold no elements: only the modules' own hooks can gather them.
        for head in (engine.module.lm_head, ref.module.lm_head):
            assert head.weight.numel() == 0, "ZeRO-3 should have partitioned the lm-head"
    loss = dpo_loss(engine, ref, local_batch(rank, world), padding_free)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    return loss, grads


# --- TRL's fused head under patch_trl() --------------------------------------------------------------------------

TRL_COEF_SEED = 11


def trl_loss(model, rows):
    """A linear function of TRL's per-token log-probs on ``rows`` of the global batch (mean over the rows)."""
    ids, labels, attention = (x[rows] for x in global_batch())
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    coef = torch.randn(2 * PAIRS, T - 1, generator=torch.Generator().manual_seed(TRL_COEF_SEED), dtype=torch.float64)
    return (out.log_probs.to(torch.float64) * coef[rows]).sum() / len(rows)


def trl_one_process(dtype=torch.float64):
    import trl.trainer.utils as trl_utils

    from fastdpo.integrations.trl import patch_trl

    policy, _ = make_pair(dtype=dtype)
    with patch_trl(backend="torch"):
        trl_utils.add_fused_lm_head(policy)
        loss = trl_loss(policy, list(range(2 * PAIRS)))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in policy.named_parameters()}


def case_trl_fsdp2_head_unit(rank, world, patched):
    """TRL's fused head with the lm-head in its own FSDP2 unit: stock (wrong: ``full_tensor()``) or patched."""
    import trl.trainer.utils as trl_utils

    from fastdpo.integrations.trl import patch_trl, unpatch_trl

    policy, _ = make_pair()
    if patched:
        patch_trl(backend="torch")
    try:
        trl_utils.add_fused_lm_head(policy)
        model = fsdp2_wrap(policy, "head_unit")
        loss = trl_loss(model, local_rows(rank, world))
        loss.backward()
    finally:
        unpatch_trl()
    return loss, fsdp2_grads(model)


def _zero_config(stage, world):
    # Threshold 0: ZeRO-3 would otherwise keep parameters this small whole on every rank (never partitioned).
    return {"train_micro_batch_size_per_gpu": PAIRS // world, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}


def _deepspeed():
    import deepspeed

    # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce op; plain gloo collectives suffice here.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def case_trl_zero3(rank, world):
    """TRL's fused head under patch_trl() with ZeRO-3 on, as transformers sees it (TRL's own gather is armed)."""
    import trl.trainer.utils as trl_utils
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from fastdpo.integrations.trl import patch_trl

    deepspeed = _deepspeed()
    config = _zero_config(3, world)
    armed = HfDeepSpeedConfig(config)  # noqa: F841  (kept alive: makes is_deepspeed_zero3_enabled() true)
    policy, _ = make_pair(dtype=torch.float32)
    with patch_trl(backend="torch"):
        trl_utils.add_fused_lm_head(policy)
        engine, *_ = deepspeed.initialize(model=policy, model_parameters=list(policy.parameters()), config=config)
        assert engine.module.lm_head.weight.numel() == 0, "ZeRO-3 should have partitioned the lm-head"
        loss = trl_loss(engine, local_rows(rank, world))
        engine.backward(loss)
    return loss, {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}


def case_ddp_peft(rank, world):
    """DDP(find_unused_parameters=True) over a LoRA policy whose reference is the adapter disabled."""
    import peft
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastdpo.integrations.transformers import causal_lm_dpo_loss

    policy = make_lora()
    model = DDP(policy, find_unused_parameters=True)
    ids, labels, attention = local_batch(rank, world)
    loss = causal_lm_dpo_loss(model, ids, labels, attention, ref_model="disable_adapter", beta=BETA,
                              backend="torch").loss
    loss.backward()
    assert isinstance(policy, peft.PeftModel)
    return loss, {clean(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def make_lora():
    import peft

    policy, _ = make_pair()
    model = peft.get_peft_model(policy, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def peft_one_process():
    from fastdpo.integrations.transformers import causal_lm_dpo_loss

    model = make_lora()
    ids, labels, attention = global_batch()
    loss = causal_lm_dpo_loss(model, ids, labels, attention, ref_model="disable_adapter", beta=BETA,
                              backend="torch").loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def case_ddp_hidden_states_refused(rank, world):
    """Precomputed hidden states with a DDP model would run the head outside DDP's forward: refused."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastdpo.integrations.transformers import causal_lm_logprobs

    policy, _ = make_pair()
    model = DDP(policy)
    ids, labels, attention = local_batch(rank, world)
    hidden = policy.model(input_ids=ids, attention_mask=attention).last_hidden_state
    try:
        causal_lm_logprobs(model, ids, labels, attention, hidden_states=hidden)
    except ValueError as err:
        return {"raised": str(err)}
    return {"raised": None}


def case_trl_patched_too_late(rank, world):
    """patch_trl() after add_fused_lm_head, FSDP2 head unit: TRL's full_tensor() reaches fastdpo, which refuses."""
    import trl.trainer.utils as trl_utils

    from fastdpo.integrations.trl import patch_trl, unpatch_trl

    policy, _ = make_pair()
    trl_utils.add_fused_lm_head(policy)
    model = fsdp2_wrap(policy, "head_unit")
    try:
        with patch_trl(backend="torch"):
            trl_loss(model, local_rows(rank, world))
    except RuntimeError as err:
        return {"raised": str(err)}
    finally:
        unpatch_trl()
    return {"raised": None}


# --- the run -----------------------------------------------------------------------------------------------------

def unavailable(module):
    """Why ``module`` cannot be imported (None when it can): the cases that need an optional package skip."""
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a broken install raising anything at import
        return f"{module} cannot be imported: {type(err).__name__}: {err}"
    return None


CASES = {
    "ddp": lambda r, w: case_ddp(r, w, find_unused=False),
    "ddp_find_unused": lambda r, w: case_ddp(r, w, find_unused=True),
    "fsdp1_orig_params": lambda r, w: case_fsdp1(r, w, use_orig_params=True),
    "fsdp1_flat_params": lambda r, w: case_fsdp1(r, w, use_orig_params=False),
    "fsdp1_head_unit": lambda r, w: case_fsdp1(r, w, use_orig_params=True, head_unit=True),
    "fsdp2_layers_root": lambda r, w: case_fsdp2(r, w, "layers"),
    "fsdp2_accelerate_tail": lambda r, w: case_fsdp2(r, w, "tail"),
    "fsdp2_head_unit": lambda r, w: case_fsdp2(r, w, "head_unit"),
    "fsdp2_tied": lambda r, w: case_fsdp2(r, w, "layers", tied=True),
    "fsdp2_tied_accelerate_tail": lambda r, w: case_fsdp2(r, w, "tail", tied=True),
    "fsdp2_mixed_precision": lambda r, w: case_fsdp2(r, w, "tail", mp=True),
    "zero1": lambda r, w: case_zero(r, w, 1),
    "zero2": lambda r, w: case_zero(r, w, 2),
    "zero3": lambda r, w: case_zero(r, w, 3),
    # padding_free=True: the packing probe's forwards run through each wrapper on every rank (fresh models, so it
    # does run), then the packed step.
    "fsdp1_flat_params_padding_free": lambda r, w: case_fsdp1(r, w, use_orig_params=False, padding_free=True),
    "fsdp2_accelerate_tail_padding_free": lambda r, w: case_fsdp2(r, w, "tail", padding_free=True),
    "zero3_padding_free": lambda r, w: case_zero(r, w, 3, padding_free=True),
    "trl_fsdp2_head_unit_patched": lambda r, w: case_trl_fsdp2_head_unit(r, w, patched=True),
    "trl_fsdp2_head_unit_stock": lambda r, w: case_trl_fsdp2_head_unit(r, w, patched=False),
    "trl_patched_too_late": case_trl_patched_too_late,
    "trl_zero3_patched": case_trl_zero3,
    "ddp_peft_disabled_adapter_ref": case_ddp_peft,
    "ddp_hidden_states_refused": case_ddp_hidden_states_refused,
}


def _expected(name, cache):
    """The one-process results a case compares against (computed once per kind)."""
    if name == "trl_zero3_patched":
        key = "trl_fp32"
    elif name.startswith("trl_"):
        key = "trl"
    elif name.startswith("ddp_peft"):
        key = "peft"
    elif name == "fsdp2_mixed_precision":
        key = "bf16"
    elif name.startswith("zero"):
        key = "fp32"
    else:
        key = "tied" if "tied" in name else "untied"
    if key not in cache:
        if key == "trl":
            cache[key] = trl_one_process()
        elif key == "trl_fp32":
            cache[key] = trl_one_process(torch.float32)
        elif key == "peft":
            cache[key] = peft_one_process()
        elif key == "bf16":
            cache[key] = (one_process_grads(dtype=torch.bfloat16), one_process_grads(dtype=torch.float64),
                          one_process_per_rank_grads(dist.get_world_size(), torch.bfloat16))
        elif key == "fp32":
            cache[key] = one_process_grads(dtype=torch.float32)
        else:
            cache[key] = one_process_grads(tied=key == "tied")
    return cache[key]


def _run_case(name, rank, world, cache):
    needs = [m for m, needed in (("deepspeed", "zero" in name), ("trl", name.startswith("trl_"))) if needed]
    for module in needs:
        reason = unavailable(module)
        if reason:
            return {"skip": reason}
    out = CASES[name](rank, world)
    if isinstance(out, dict):
        return out
    loss, grads = out
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, loss.detach().to(torch.float64).reshape(()).contiguous())
    result = {"mean_loss": float(sum(x.item() for x in losses) / world)}
    if name == "fsdp2_mixed_precision":
        (loss_bf16, grads_bf16), (loss64, grads64), emulated = _expected(name, cache)
        result.update(one_process_loss=loss64, norm_rel_err=norm_rel_err(grads, grads64),
                      one_process_bf16_norm_rel_err=norm_rel_err(grads_bf16, grads64),
                      emulated_norm_rel_err=norm_rel_err(grads, emulated))
        result.update(compare(grads, grads64))
        return result
    expected_loss, expected = _expected(name, cache)
    result.update(one_process_loss=expected_loss, **compare(grads, expected))
    return result


def _worker(rank, world, port, out_path, names):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results, cache = {}, {}
    try:
        for name in names:
            try:
                results[name] = _run_case(name, rank, world, cache)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            # Keep the ranks in step: a case that failed on one rank must not leave the other in a collective.
            dist.barrier()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()


def run(world_size, out_path, names=None, port=None):
    """Spawn ``world_size`` gloo ranks that run ``names`` (default: every case); rank 0 writes the results."""
    import socket

    import torch.multiprocessing as mp

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp.spawn(_worker, args=(world_size, port, out_path, list(names or CASES)), nprocs=world_size, join=True)
    with open(out_path) as f:
        return json.load(f)


if __name__ == "__main__":
    selected = sys.argv[2:] or None
    print(json.dumps(run(2, sys.argv[1], selected), indent=1))
