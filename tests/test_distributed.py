"""fastdpo under every data-parallel wrapper, on 2 CPU gloo ranks, against one process on the whole global batch.

One spawned run (``tests/workers/dist_worker.py``) executes every case on a shared process group; each test below
asserts on one case's numbers. A tiny Llama (2 layers, hidden 32, vocabulary 101) and a global batch of 4 pairs, 2
per rank. Averaging convention: each rank's loss is the mean over its own pairs and the wrappers average gradients
over ranks, which equals one process's mean over the whole batch (same number of pairs on every rank).
"""

import pytest

pytest.importorskip("transformers")

from workers import dist_worker  # noqa: E402

WORLD = 2
# float64 everywhere except where stated: the same sums in another order, so ~1e-15 relative is expected.
FP64_TOL = 1e-12


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return dist_worker.run(WORLD, str(tmp_path_factory.mktemp("dist") / "results.json"))


def case(results, name):
    result = results[name]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, f"{name} failed on a rank:\n{result.get('error')}"
    return result


def assert_matches_one_process(result, tol=FP64_TOL, n_params=20):
    assert result["n_params"] >= n_params
    assert result["max_rel_err"] < tol, f"worst parameter {result['worst']}: {result['max_rel_err']:.3g}"
    assert result["mean_loss"] == pytest.approx(result["one_process_loss"], rel=tol, abs=tol)


@pytest.mark.parametrize("name", ["ddp", "fsdp1_orig_params", "fsdp1_flat_params", "fsdp1_head_unit",
                                  "fsdp2_layers_root", "fsdp2_accelerate_tail", "fsdp2_tied",
                                  "fsdp2_tied_accelerate_tail"])
def test_wrapper_gives_one_process_gradients(results, name):
    """causal_lm_dpo_loss(wrapped_model, ..., ref_model=wrapped_ref): every gradient as in one process (fp64)."""
    assert_matches_one_process(case(results, name))


def test_ddp_find_unused_parameters(results):
    """Regression: DDP(find_unused_parameters=True) raised "Expected to mark a variable ready only once" because the
    head ran outside the model's forward (DDP marked it unused, then its gradient arrived)."""
    assert_matches_one_process(case(results, "ddp_find_unused"))


def test_fsdp2_head_in_its_own_unit(results):
    """Regression: the lm-head in its own FSDP2 unit is gathered by its own hooks and its gradient reduce-scattered."""
    assert_matches_one_process(case(results, "fsdp2_head_unit"))


def test_fsdp2_mixed_precision(results):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on accelerate's wrapping.

    Exact check: one process doing what each rank does in bf16 (its half of the batch, parameters cast to bf16),
    gradients averaged in fp32, gives the same gradients. Whole-batch check: against the fp64 gradients, the error is
    that of one bf16 process on the whole batch (both compute every product in bf16; the ranks round half-batch
    gradients where one process rounds the whole batch's), so it must stay within 2x that error; and it is far above
    fp32 resolution, so the head really computed in bf16.
    """
    result = case(results, "fsdp2_mixed_precision")
    assert result["emulated_norm_rel_err"] < 1e-6
    assert 1e-4 < result["norm_rel_err"] < 2 * result["one_process_bf16_norm_rel_err"]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_deepspeed_zero(results, name):
    """DeepSpeed ZeRO-1/2/3 on CPU (gloo, no compiled ops), ZeRO-3 with every parameter partitioned (the worker
    checks that the heads hold no elements outside a forward). fp32, against one fp32 process: ZeRO-3 refuses fp64
    parameters and ZeRO-1/2 keep gradients in fp32, so the agreement is to fp32 rounding (observed ~4e-7)."""
    assert_matches_one_process(case(results, name), tol=1e-5)


@pytest.mark.parametrize("name", ["fsdp1_flat_params_padding_free", "fsdp2_accelerate_tail_padding_free",
                                  "zero3_padding_free"])
def test_padding_free_under_sharding(results, name):
    """padding_free=True under FSDP1 (flat parameters), FSDP2 and ZeRO-3 (every parameter partitioned): every rank
    runs the packing probe through its wrapper (a forward whose collectives must match across ranks), then the
    packed step gives one padded process's gradients. The model's eager attention computes its softmax in float32,
    which packed and padded rows round differently: agreement to ~1e-7, so 1e-5."""
    assert_matches_one_process(case(results, name), tol=1e-5)


def test_patch_trl_fsdp2_head_in_its_own_unit(results):
    """Regression: TRL's fused head under FSDP2 with the head in its own unit.

    Stock TRL reads the head as a DTensor and calls full_tensor(), whose backward is a local slice that FSDP2 never
    reduces: its head gradient is wrong (the worker reproduces this, so the case really exercises the bug). Under
    patch_trl() the head runs as a module and every gradient equals one process's.
    """
    stock = case(results, "trl_fsdp2_head_unit_stock")
    assert stock["head_rel_err"] > 0.1, "stock TRL should get the own-unit head gradient wrong"
    assert_matches_one_process(case(results, "trl_fsdp2_head_unit_patched"))


def test_ddp_peft_with_disabled_adapter_reference(results):
    """DDP(find_unused_parameters=True) over a LoRA policy, reference = the adapter disabled: every LoRA gradient."""
    assert_matches_one_process(case(results, "ddp_peft_disabled_adapter_ref"), n_params=8)


def test_ddp_with_precomputed_hidden_states_is_refused(results):
    raised = case(results, "ddp_hidden_states_refused")["raised"]
    assert raised is not None and "hidden_states" in raised and "DDP" in raised


def test_patch_trl_zero3(results):
    """TRL's fused head under patch_trl() with ZeRO-3 (head partitioned, transformers' ZeRO-3 flag on so TRL's own
    gather is armed): the head runs as a module and ZeRO-3's hooks fetch it; fp32, as for the other ZeRO cases."""
    assert_matches_one_process(case(results, "trl_zero3_patched"), tol=1e-5)


def test_patch_trl_too_late_refuses_full_tensor(results):
    """patch_trl() after TRL's fused head was added: the DTensor.full_tensor() weight is refused, not silently used."""
    raised = case(results, "trl_patched_too_late")["raised"]
    assert raised is not None and "patch_trl() before" in raised
