"""Input checks of the public API (``dpo_loss``, ``fused_logprobs``, ``token_stats``, ``sequence_logprobs``,
``FusedLinearDPOLoss``): small integer label dtypes are widened, bad inputs raise a named TypeError/ValueError
rather than crash, the tensor on the wrong device is named, and the label range check."""

import pytest
import torch

import fastdpo
from fastdpo.reference import reference_dpo_loss, reference_token_stats
from fdtest import backend_params, make_batch

# ---- small integer label dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.int32])
def test_small_integer_labels_are_widened(backend, dtype):
    """Labels in int8, int16, uint8 (ignore_index 255) or int32 give the log-probs and loss of int64 labels."""
    hidden, weight, labels = make_batch(dtype=torch.float32, V=37)
    if dtype in (torch.uint8,):
        labels = torch.where(labels < 0, torch.zeros_like(labels), labels)  # no -100 in uint8
        ignore_index = 255
        labels[:, :2] = 255
    else:
        ignore_index = -100
    want = reference_token_stats(hidden.double(), weight.double(), labels, ignore_index=ignore_index)["logp"]
    got = fastdpo.fused_logprobs(hidden, weight, labels.to(dtype), ignore_index=ignore_index, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    out = fastdpo.dpo_loss(hidden, weight, labels.to(dtype), ignore_index=ignore_index, reference_free=True,
                           backend=backend)
    ref = reference_dpo_loss(hidden.double(), weight.double(), labels, ignore_index=ignore_index,
                             reference_free=True)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5


# ---- named errors ------------------------------------------------------------------------------------------------

def _call(backend="torch", **overrides):
    hidden, weight, labels = make_batch(dtype=torch.float32)
    args = dict(hidden=hidden, weight=weight, labels=labels, reference_free=True, backend=backend)
    args.update(overrides)
    return fastdpo.dpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    (dict(weight=None, ref_hidden=torch.randn(4, 9, 19), ref_weight=torch.randn(53, 19), reference_free=False),
     TypeError, "weight must be a torch.Tensor"),
    (dict(config={"beta": 0.1}), TypeError, "config must be a fastdpo.LossConfig"),
    (dict(config=fastdpo.LossConfig, beta=None), TypeError, "config must be a fastdpo.LossConfig"),
    (dict(reference_free="False"), TypeError, "reference_free must be a bool"),
    (dict(reference_free=1), TypeError, "reference_free must be a bool"),
    (dict(bias=torch.arange(53)), TypeError, "bias must be a floating tensor"),
    (dict(bias=torch.zeros(52)), ValueError, r"bias must have shape \[53\]"),
    (dict(bias=torch.zeros(54)), ValueError, r"bias must have shape \[53\]"),
    (dict(ref_hidden=torch.randn(4, 9, 19), ref_weight=torch.randn(53, 19), ref_bias=torch.zeros(52),
          reference_free=False), ValueError, r"ref_bias must have shape \[53\]"),
    (dict(bias=torch.ones(53, dtype=torch.bool)), TypeError, "bias must be a floating tensor"),
    (dict(logit_scale=1e300, temperature=1e-300), ValueError, "logit_scale / temperature must be finite"),
    (dict(logit_scale=float("inf")), TypeError, "logit_scale"),
    (dict(hidden=torch.randn(4, 9, 0), weight=torch.randn(53, 0)), ValueError, "H >= 1"),
    (dict(weight=torch.randn(0, 19)), ValueError, "V >= 1"),
    (dict(ref_logps=torch.zeros(4, device="meta"), reference_free=False), ValueError,
     r"ref_logps must be on one device with .* \(cpu\)"),
])
@pytest.mark.parametrize("backend", backend_params())
def test_bad_input_gets_a_named_error(backend, overrides, error, words):
    """Each bad argument to dpo_loss raises a TypeError/ValueError that names it, rather than crash or be
    ignored."""
    if "config" in overrides:
        overrides.setdefault("beta", None)
    with pytest.raises(error, match=words):
        _call(backend=backend, **overrides)


@pytest.mark.parametrize("backend", backend_params())
def test_flags_must_be_bools(backend):
    """A string such as "False" is truthy: every on/off argument takes only a bool."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    with pytest.raises(TypeError, match="extras must be a bool"):
        fastdpo.token_stats(hidden, weight, labels, extras="False", backend=backend)
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        fastdpo.token_stats(hidden, weight, labels, check_labels=0, backend=backend)
    with pytest.raises(TypeError, match="average must be a bool"):
        fastdpo.sequence_logprobs(hidden, weight, labels, average="no", backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_unchecked_out_of_range_target_gives_nan_not_a_finite_value(backend):
    """With the range check off (as under torch.compile) a target outside [0, V) matches no column: its log-prob
    must be NaN, not the finite −logsumexp, and the other tokens stay right."""
    hidden, weight, labels = make_batch(dtype=torch.float32, seed=9)
    V = weight.shape[0]
    labels[0, 4], labels[1, 5] = V, -7
    stats = fastdpo.token_stats(hidden, weight, labels, check_labels=False, backend=backend)
    assert torch.isnan(stats["logp"][0, 4]) and torch.isnan(stats["logp"][1, 5])
    good = labels.clone()
    good[0, 4] = good[1, 5] = -100
    want = reference_token_stats(hidden.double(), weight.double(), good)["logp"]
    keep = good != -100
    torch.testing.assert_close(stats["logp"][keep].double(), want[keep], rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_zero_sized_head_in_the_per_token_api(backend):
    """An empty hidden size or vocabulary is refused by name in fused_logprobs, as is an integer ref_bias in
    dpo_loss."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="H >= 1"):
        fastdpo.fused_logprobs(hidden[..., :0], weight[:, :0], labels, backend=backend)
    with pytest.raises(ValueError, match="V >= 1"):
        fastdpo.fused_logprobs(hidden, weight[:0], labels, backend=backend)
    with pytest.raises(TypeError, match="ref_bias must be a floating tensor"):
        fastdpo.dpo_loss(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight,
                         ref_bias=torch.zeros(weight.shape[0], dtype=torch.int64), backend=backend)


# ---- device mismatch: the meta device needs no GPU -----------------------------------------------------------------

@pytest.mark.parametrize("reference", ["ref_hidden", "ref_logps", "packed"])
@pytest.mark.parametrize("which", ["hidden", "weight", "labels", "bias", "ref_hidden", "ref_weight", "ref_bias",
                                   "ref_logps", "cu_seqlens"])
def test_device_mismatch_is_named(which, reference):
    """The one tensor on another device is the one the message names, whichever it is (hidden included)."""
    hidden, weight, labels = make_batch(dtype=torch.float32)
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=torch.zeros(weight.shape[0]))
    if reference == "ref_logps":
        args["ref_logps"] = torch.zeros(hidden.shape[0])
    else:
        args.update(ref_hidden=hidden.clone(), ref_weight=weight.clone(), ref_bias=torch.zeros(weight.shape[0]))
    if reference == "packed":
        rows, T = labels.shape
        args.update(hidden=hidden.reshape(rows * T, -1), labels=labels.reshape(-1),
                    ref_hidden=args["ref_hidden"].reshape(rows * T, -1), cu_seqlens=torch.arange(rows + 1) * T)
    if which not in args:
        pytest.skip(f"no {which} with {reference}")
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"^{which} must be on one device with .*\(cpu\), got {which} on meta"):
        fastdpo.dpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), backend="torch", **args)
    if which in ("hidden", "weight", "labels", "bias", "cu_seqlens") and reference != "ref_logps":
        seq = {k: args[k] for k in ("bias", "cu_seqlens") if k in args}
        h, w, lab = hidden, weight, labels
        if reference == "packed":
            h, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        moved = {"hidden": h, "weight": w, "labels": lab, **seq}
        moved[which] = moved[which].to("meta")
        with pytest.raises(ValueError, match=rf"^{which} must be on one device with .*\(cpu\), got {which} on meta"):
            fastdpo.sequence_logprobs(moved.pop("hidden"), moved.pop("weight"), moved.pop("labels"),
                                      backend="torch", **moved)
        tok = {"hidden": h, "weight": w, "targets": lab, "bias": args["bias"]}
        if which in ("hidden", "weight", "bias"):
            tok[which] = tok[which].to("meta")
        elif which == "labels":
            tok["targets"] = tok["targets"].to("meta")
        else:
            return
        name = "targets" if which == "labels" else which
        with pytest.raises(ValueError, match=rf"^{name} must be on one device with .*\(cpu\), got {name} on meta"):
            fastdpo.token_stats(tok.pop("hidden"), tok.pop("weight"), tok.pop("targets"), backend="torch", **tok)


def test_device_mismatch_without_a_majority_names_every_tensor():
    """With no device that most tensors share, the device check names every tensor with its device."""
    from fastdpo import _validate

    a, b = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=r"^a, b must be on one device, got a on cpu, b on meta$"):
        _validate.one_device(("a", a), ("b", b), ("c", None))
    _validate.one_device(("a", a), ("b", a.clone()), ("c", None))


# ---- the label range check ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
def test_check_labels_off_skips_only_the_gpu_sync(backend, monkeypatch):
    """``FASTDPO_CHECK_LABELS=0`` skips the range check where it costs a GPU host sync; CPU labels are read without
    one, so an out-of-range label (and bad packed offsets) still raise there."""
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    hidden, weight, labels = make_batch(dtype=torch.float32)
    for bad in (53, -3):
        wrong = labels.clone()
        wrong[1, 5] = bad
        with pytest.raises(ValueError, match=rf"labels must hold token ids in \[0, 53\).*found {bad}"):
            fastdpo.dpo_loss(hidden, weight, wrong, reference_free=True, backend=backend)
        with pytest.raises(ValueError, match=rf"targets must hold token ids in \[0, 53\).*found {bad}"):
            fastdpo.fused_logprobs(hidden, weight, wrong, backend=backend)
    rows, T = labels.shape
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length"):
        fastdpo.sequence_logprobs(hidden.reshape(rows * T, -1), weight, labels.reshape(-1),
                                  cu_seqlens=torch.arange(rows + 1) * (T - 1), backend=backend)


# ---- the module's options ----------------------------------------------------------------------------------------

def test_module_checks_head_options_when_built():
    """FusedLinearDPOLoss refuses bad head options at construction, as it refuses bad loss options."""
    for bad, error in ((dict(softcap="30"), TypeError), (dict(ignore_index=True), TypeError),
                       (dict(temperature=0), ValueError), (dict(backend="cuda"), ValueError),
                       (dict(logit_scale=1e300, temperature=1e-300), ValueError)):
        with pytest.raises(error, match=next(iter(bad))):
            fastdpo.FusedLinearDPOLoss(beta=0.1, **bad)
