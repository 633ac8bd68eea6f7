"""fastdpo on transformers causal LMs: the helper against ``model(...).logits``, PEFT, a plain training loop.

Tiny models built from configs (2 layers, hidden 32, vocabulary 96), fp32 on CPU. The lm-heads are scaled
up so that the logits are peaked and Gemma-2's softcap actually bends them.
"""

import copy
import math

import pytest
import torch

import fastdpo
from fastdpo.integrations import transformers as fx
from fastdpo.reference import reference_dpo_loss
from fdtest import assert_same_as_lean, record_head_memory, record_ref_logps

transformers = pytest.importorskip("transformers")

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
SOFTCAP = 2.0


def make_model(kind, seed=0, head_scale=30.0):
    """A tiny causal LM of the given architecture, lm-head scaled so its logits have a std of a few units."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif kind == "gemma2":  # tied embeddings, final_logit_softcapping
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**COMMON, head_dim=8,
                                                                         final_logit_softcapping=SOFTCAP))
    elif kind == "cohere":  # logit_scale, tied
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.37))
    elif kind == "granite":  # logits_scaling (a divisor)
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=3.0))
    elif kind == "phi":  # lm-head bias
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**COMMON))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(head_scale)
        if head.bias is not None:
            head.bias.normal_(0, 1.0)
    return model.eval()


def make_batch(pairs=2, T=11, seed=0):
    """``[2B, T]`` ids, unshifted labels (prompt and right padding ignored) and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (2 * pairs, T), generator=g)
    labels = ids.clone()
    attention = torch.ones_like(ids)
    labels[:, :4] = -100
    for row in range(1, 2 * pairs, 2):  # padding on every other row
        ids[row, -3:] = 0
        labels[row, -3:] = -100
        attention[row, -3:] = 0
    return ids, labels, attention


def logits_token_stats(model, ids, labels, attention):
    """Per-token statistics of the shifted labels from the model's own materialized logits."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logsm.exp() * logsm).sum(-1) * mask
    top1 = (logits.argmax(-1) == targets) & mask
    return {"logp": logp, "mean_logit": logits.mean(-1) * mask, "entropy": entropy, "is_top1": top1}, logits


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere", "granite", "phi"])
def test_token_stats_match_model_logits(kind):
    model = make_model(kind)
    ids, labels, attention = make_batch()
    ours = fx.causal_lm_token_stats(model, ids, labels, attention, extras=True)
    theirs, logits = logits_token_stats(model, ids, labels, attention)
    for name in ("logp", "mean_logit", "entropy"):
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-5, rtol=1e-5, msg=f"{kind}: {name}")
    assert torch.equal(ours["is_top1"], theirs["is_top1"])
    assert logits.std() > 1.0, "the head should produce peaked logits"
    if kind == "gemma2":
        # The softcap is active: some raw logits lie well beyond what the cap lets through.
        raw = model.model(input_ids=ids, attention_mask=attention).last_hidden_state @ model.lm_head.weight.t()
        assert raw.abs().max() > 2 * SOFTCAP and logits.abs().max() <= SOFTCAP


@pytest.mark.parametrize("kind", ["gemma2", "phi", "cohere"])
def test_gradients_match_model_logits(kind):
    """The backward of the helper's log-probs reaches every parameter as through the materialized logits."""
    ids, labels, attention = make_batch(seed=1)
    coef = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(2))
    grads = []
    for use_fastdpo in (True, False):
        model = make_model(kind)
        if use_fastdpo:
            logp = fx.causal_lm_logprobs(model, ids, labels, attention)
        else:
            logp = logits_token_stats(model, ids, labels, attention)[0]["logp"]
        (logp * coef).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-5, rtol=1e-4, msg=name)


def test_head_spec_reads_tied_and_untied_heads():
    gemma, llama = make_model("gemma2"), make_model("llama")
    assert fx.lm_head_spec(gemma).weight is gemma.get_input_embeddings().weight
    assert fx.lm_head_spec(gemma).options() == {"softcap": SOFTCAP, "logit_scale": 1.0}
    assert fx.lm_head_spec(llama).weight is llama.lm_head.weight
    assert fx.lm_head_spec(make_model("granite")).logit_scale == pytest.approx(1 / 3)
    assert fx.lm_head_spec(make_model("phi")).bias is not None


@pytest.mark.parametrize("scale", [0.37, 3.0, -2.0, 0.0])
def test_scale_before_softcap_maps_exactly(scale):
    """Muse-Glimmer-style ``c·tanh(s·z/c)`` (scale first, as TRL orders it) equals fastdpo's order after mapping."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(7, 16, generator=g, dtype=torch.float64), torch.randn(V, 16, generator=g,
                                                                                       dtype=torch.float64)
    targets = torch.randint(0, V, (7,), generator=g)
    cap = 1.5
    z = cap * torch.tanh(scale * (hidden @ weight.t()) / cap)
    expected = torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    softcap, logit_scale = fx.to_fastdpo_transform(cap, scale)
    got = fastdpo.fused_logprobs(hidden, weight, targets, softcap=softcap, logit_scale=logit_scale, backend="torch")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_glimmer_like_config_is_composed():
    """A config with both a pre-softcap multiplier and a softcap: the helper matches the model's formula."""
    model = make_model("gemma2")
    model.config.output_multiplier = 0.5  # read as the pre-softcap scale, as TRL reads it
    ids, labels, attention = make_batch()
    ours = fx.causal_lm_logprobs(model, ids, labels, attention)
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    z = SOFTCAP * torch.tanh(0.5 * (hidden @ model.lm_head.weight.t()) / SOFTCAP)
    targets = labels[:, 1:]
    expected = torch.log_softmax(z, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_temperature_divides_the_transformed_logits():
    model = make_model("gemma2")
    ids, labels, attention = make_batch()
    ours = fx.causal_lm_logprobs(model, ids, labels, attention, temperature=0.7)
    _, logits = logits_token_stats(model, ids, labels, attention)
    targets = labels[:, 1:]
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, expected * (targets != -100), atol=2e-5, rtol=1e-5)


def test_hidden_states_forward_keeps_the_model_forward():
    model = make_model("llama")
    ids, labels, attention = make_batch()
    before = model(input_ids=ids, attention_mask=attention).logits
    fx.add_hidden_states_forward(model)
    fx.add_hidden_states_forward(model)  # idempotent
    after = model(input_ids=ids, attention_mask=attention).logits
    hidden = model(input_ids=ids, attention_mask=attention, fastdpo_hidden_states=True).last_hidden_state
    assert torch.equal(before, after)
    torch.testing.assert_close(hidden, model.model(input_ids=ids, attention_mask=attention).last_hidden_state)


# --- PEFT ------------------------------------------------------------------------------------------------------

def make_lora(kind="llama"):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(make_model(kind), lora)
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def test_peft_model_and_disabled_adapter_match_logits():
    model = make_lora()
    ids, labels, attention = make_batch()
    ours = fx.causal_lm_logprobs(model, ids, labels, attention)
    theirs = logits_token_stats(model, ids, labels, attention)[0]["logp"]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    with model.disable_adapter():
        ours_base = fx.causal_lm_logprobs(model, ids, labels, attention)
        theirs_base = logits_token_stats(model, ids, labels, attention)[0]["logp"]
    torch.testing.assert_close(ours_base, theirs_base, atol=2e-5, rtol=1e-5)
    assert (ours - ours_base).abs().max() > 1e-2, "the adapter should change the log-probs"


def test_dpo_loss_with_disabled_adapter_reference():
    model = make_lora()
    ids, labels, attention = make_batch()
    out = fx.causal_lm_dpo_loss(model, ids, labels, attention, ref_model=fx.DISABLE_ADAPTER, beta=0.2)
    out.loss.backward()
    policy = logits_token_stats(model, ids, labels, attention)[0]["logp"].sum(-1).detach()
    with model.disable_adapter():
        ref = logits_token_stats(model, ids, labels, attention)[0]["logp"].sum(-1)
    B = ids.shape[0] // 2
    delta = (policy[:B] - policy[B:]) - (ref[:B] - ref[B:])
    torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(0.2 * delta).mean(), atol=1e-5, rtol=1e-5)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert {"entropy", "mean_token_accuracy", "rewards/margins"} <= set(out.metrics)


# --- a plain PyTorch loop --------------------------------------------------------------------------------------

def _train(kind, use_fastdpo, steps=4):
    policy = make_model(kind).train()
    reference = copy.deepcopy(policy).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        ids, labels, attention = make_batch(seed=10 + step)
        if use_fastdpo:
            out = fx.causal_lm_dpo_loss(policy, ids, labels, attention, ref_model=reference, beta=0.5)
        else:
            # The naive reference: full logits from the same backbone hidden states and head transform.
            head = fx.lm_head_spec(policy)
            hidden = fx.backbone_hidden_states(policy, ids, attention)[:, :-1]
            with torch.no_grad():
                ref_hidden = fx.backbone_hidden_states(reference, ids, attention)[:, :-1]
            out = reference_dpo_loss(hidden, head.weight, labels[:, 1:], ref_hidden=ref_hidden,
                                     ref_weight=fx.lm_head_spec(reference).weight, beta=0.5, **head.options())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses, policy


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_plain_loop_matches_naive_reference(kind):
    fast_losses, fast_model = _train(kind, True)
    ref_losses, ref_model = _train(kind, False)
    assert fast_losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    initial = make_model(kind)
    moved = max((p - q).abs().max().item() for p, q in zip(fast_model.parameters(), initial.parameters()))
    assert moved > 1e-3, "the optimizer steps should have changed the weights"
    for (name, p), q in zip(fast_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=5e-5, rtol=1e-4, msg=name)


# --- errors ----------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = make_model("llama")
    ids, labels, attention = make_batch()
    with pytest.raises(ValueError, match="labels"):
        fx.causal_lm_logprobs(model, ids, labels[:, :-1], attention)
    with pytest.raises(TypeError, match="input_ids"):
        fx.causal_lm_logprobs(model, ids[0], labels, attention)
    with pytest.raises(ValueError, match="even number"):
        fx.causal_lm_dpo_loss(model, ids[:3], labels[:3], attention[:3], reference_free=True)
    with pytest.raises(ValueError, match="exactly one reference"):
        fx.causal_lm_dpo_loss(model, ids, labels, attention)
    with pytest.raises(ValueError, match="exactly one reference"):
        fx.causal_lm_dpo_loss(model, ids, labels, attention, ref_model=model, reference_free=True)
    with pytest.raises(ValueError, match="ref_model"):
        fx.causal_lm_dpo_loss(model, ids, labels, attention, ref_model="base")
    with pytest.raises(TypeError, match="PEFT"):
        fx.causal_lm_dpo_loss(model, ids, labels, attention, ref_model=fx.DISABLE_ADAPTER)
    with pytest.raises(ValueError, match="ref_logps"):
        fx.causal_lm_dpo_loss(model, ids, labels, attention, ref_logps=torch.zeros(3))
    with pytest.raises(TypeError, match="backbone"):
        fx.backbone_hidden_states(torch.nn.Linear(4, 4), ids)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fx.to_fastdpo_transform(-1.0, 1.0)


def test_prompt_learning_peft_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    ids, labels, attention = make_batch()
    with pytest.raises(TypeError, match="prompt-learning"):
        fx.causal_lm_logprobs(model, ids, labels, attention)


def test_hf_trainer_example_from_readme(tmp_path):
    """The README's Hugging Face Trainer subclass trains: a pair per example, chosen rows then rejected rows."""
    datasets = pytest.importorskip("datasets")

    class DPOLossTrainer(transformers.Trainer):
        def __init__(self, *args, ref_model, beta=0.1, **kwargs):
            super().__init__(*args, **kwargs)
            self.ref_model, self.beta = ref_model.eval().requires_grad_(False), beta

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = fx.causal_lm_dpo_loss(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"],
                                        ref_model=self.ref_model, beta=self.beta)
            return (out.loss, {"metrics": out.metrics}) if return_outputs else out.loss

    ids, labels, attention = make_batch(pairs=2)
    columns = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    dataset = datasets.Dataset.from_dict({k: [[v[i].tolist(), v[i + 2].tolist()] for i in range(2)]
                                          for k, v in columns.items()})

    def collate(rows):
        return {k: torch.tensor([r[k][0] for r in rows] + [r[k][1] for r in rows]) for k in rows[0]}

    model = make_model("llama").train()
    args = transformers.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none",
                                          use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3,
                                          disable_tqdm=True)
    losses = []

    class RecordingTrainer(DPOLossTrainer):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(loss.detach().item())
            return loss

    trainer = RecordingTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                               data_collator=collate)
    trainer.train()
    # Step 1: policy == reference, so the loss is log 2; step 2 (the same batch again) it has gone down.
    assert len(losses) == 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < losses[0]
    # The Trainer logs those losses (rounded to 4 decimals by transformers before 4.47).
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, abs=1e-4)


# --- what the trainer-level numbers depend on, against model(...).logits in float64 ------------------------------

def make_uneven_batch(pairs=2, T=12, seed=3):
    """Like :func:`make_batch`, but the two completions of every pair have different lengths (right padding of
    0..2B-1 tokens, in an order that differs inside each pair), and one ignored position inside a completion."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    ids = torch.randint(2, V, (rows, T), generator=g)
    labels = ids.clone()
    attention = torch.ones_like(ids)
    labels[:, :4] = -100
    pads = torch.randperm(rows, generator=g)
    while (pads[:pairs] == pads[pairs:]).any():
        pads = torch.randperm(rows, generator=g)
    for row, pad in enumerate(pads.tolist()):
        if pad:
            ids[row, -pad:] = 0
            labels[row, -pad:] = -100
            attention[row, -pad:] = 0
    labels[0, 6] = -100
    return ids, labels, attention


def _expected_from_logits(policy, reference, ids, labels, attention, opts):
    """Loss and metrics of ``opts`` written from both models' materialized logits, token by token, in float64."""
    beta = opts.get("beta", 0.1)
    logits = policy(input_ids=ids, attention_mask=attention).logits[:, :-1]
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, attention_mask=attention).logits[:, :-1]
    targets = labels[:, 1:]
    rows, steps = targets.shape
    B = rows // 2
    mask = targets != -100
    n = mask.sum(-1)

    def seq(z):
        logsm = torch.log_softmax(z, -1)
        out = []
        for s in range(rows):
            shared = min(int(n[s % B]), int(n[s % B + B]))
            total, k = z.new_zeros(()), 0
            for t in range(steps):
                if mask[s, t]:
                    k += 1
                    w = 1.0 if opts.get("ld_alpha") is None or k <= shared else opts["ld_alpha"]
                    total = total + w * logsm[s, t, targets[s, t]]
            out.append(total / n[s] if opts.get("average_log_prob") else total)
        return torch.stack(out)

    pi, rho = seq(logits), seq(ref_logits)
    u = pi - rho
    uc, ur, nc, nr = u[:B], u[B:], n[:B].double(), n[B:].double()
    kind = opts.get("loss_type", "sigmoid")
    if kind == "ipo":
        loss = ((uc / nc - ur / nr - 1 / (2 * beta)) ** 2).mean()
    elif kind == "sigmoid_norm":
        loss = torch.nn.functional.softplus(-beta * (uc / nc - ur / nr)).mean()
    else:
        loss = torch.nn.functional.softplus(-beta * (uc - ur)).mean()
    with torch.no_grad():
        logsm = torch.log_softmax(logits, -1)
        entropy = -(logsm.exp() * logsm).sum(-1)
        mean_logit = logits.mean(-1)
    metrics = {"entropy": entropy[mask].mean(), "logits/chosen": mean_logit[:B][mask[:B]].mean(),
               "logits/rejected": mean_logit[B:][mask[B:]].mean(), "logps/chosen": pi[:B].mean(),
               "logps/rejected": pi[B:].mean(), "rewards/margins": beta * (uc - ur).mean()}
    return loss, metrics


LENGTH_CASES = [dict(loss_type="ipo", beta=0.5), dict(loss_type="sigmoid_norm", beta=2.0),
                dict(average_log_prob=True, beta=2.0), dict(ld_alpha=0.3), dict(ld_alpha=1.6)]


@pytest.mark.filterwarnings("ignore:ld_alpha=1.6 is outside")
@pytest.mark.parametrize("opts", LENGTH_CASES, ids=str)
def test_length_dependent_losses_and_metrics_match_model_logits(opts):
    """ipo / sigmoid_norm / average_log_prob / ld_alpha read the completion lengths, and logits/* and entropy
    average over completion tokens: all through causal_lm_dpo_loss against the models' logits, in float64, on pairs
    whose two completions differ in length."""
    policy = make_model("phi").double()
    reference = make_model("phi", seed=1).double()
    ids, labels, attention = make_uneven_batch()
    out = fx.causal_lm_dpo_loss(policy, ids, labels, attention, ref_model=reference, backend="torch", **opts)
    grads = torch.autograd.grad(out.loss, list(policy.parameters()))
    want, metrics = _expected_from_logits(policy, reference, ids, labels, attention, opts)
    want_grads = torch.autograd.grad(want, list(policy.parameters()))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-10)
    for (name, _), g, w in zip(policy.named_parameters(), grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10 * w.abs().max().item(), msg=name)
    for name, value in metrics.items():
        # The token averages (entropy, logits/*) are reported in float32, as TRL reports them.
        low = name == "entropy" or name.startswith("logits/")
        assert out.metrics[name].item() == pytest.approx(value.item(), rel=1e-6 if low else 1e-9,
                                                         abs=2e-6 if low else 1e-12), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reference_head_that_differs_and_gets_no_gradient(backend, monkeypatch):
    """A reference model whose lm-head weight and bias differ from the policy's (Phi's biased head): ρ comes from
    its own head; its pass runs without autograd (its log-probs carry no graph, its parameters get no gradient)."""
    policy = make_model("phi")
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        reference.lm_head.weight.add_(torch.randn_like(reference.lm_head.weight) * 3.0)
        reference.lm_head.bias.add_(torch.randn_like(reference.lm_head.bias))
    seen = record_ref_logps(monkeypatch, fx)
    ids, labels, attention = make_uneven_batch()
    out = fx.causal_lm_dpo_loss(policy, ids, labels, attention, ref_model=reference, beta=0.3, backend=backend)
    out.loss.backward()
    assert seen[0].grad_fn is None and not seen[0].requires_grad
    assert all(p.grad is None for p in reference.parameters())
    policy64, reference64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    want, metrics = _expected_from_logits(policy64, reference64, ids, labels, attention, dict(beta=0.3))
    want.backward()
    assert abs(metrics["rewards/margins"].item()) > 0.1, "the two heads should give different log-probs"
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.metrics["rewards/margins"].item() == pytest.approx(metrics["rewards/margins"].item(), rel=1e-5)
    for (name, p), q in zip(policy.named_parameters(), policy64.parameters()):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_tie_logs_no_reward_accuracy(backend):
    """A policy equal to its reference (a copy, or a LoRA adapter still at its zero init with the adapter disabled
    for ρ): every reward is exactly 0 and, as TRL logs it, no pair counts as won."""
    peft = pytest.importorskip("peft")
    ids, labels, attention = make_uneven_batch()
    model = make_model("gemma2")
    lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    lora_dropout=0.0))
    for policy, ref in ((model, copy.deepcopy(model)), (lora, fx.DISABLE_ADAPTER)):
        out = fx.causal_lm_dpo_loss(policy, ids, labels, attention, ref_model=ref, backend=backend)
        assert torch.equal(out.chosen_rewards, torch.zeros_like(out.chosen_rewards))
        assert torch.equal(out.rejected_rewards, torch.zeros_like(out.rejected_rewards))
        assert out.metrics["rewards/accuracies"].item() == 0.0 and out.metrics["rewards/margins"].item() == 0.0
        assert out.loss.item() == pytest.approx(0.6931471805599453, rel=1e-6)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_memory_reaches_the_head_and_keeps_the_lean_gradients(padding_free, monkeypatch):
    """memory='fast' and a GiB budget reach the policy's head through causal_lm_dpo_loss and give lean's gradients
    (float64)."""
    seen = record_head_memory(monkeypatch)
    policy = make_model("phi").double()
    reference = make_model("phi", seed=1).double()
    ids, labels, attention = make_batch()
    results = {}
    for memory in ("lean", "fast", 1e-3):
        seen.clear()
        loss = fx.causal_lm_dpo_loss(policy, ids, labels, attention, ref_model=reference, memory=memory,
                                     padding_free=padding_free).loss
        results[memory] = (loss.detach(), torch.autograd.grad(loss, list(policy.parameters())))
        assert max(seen) == fastdpo.head.resolve_memory(memory)  # the policy's head, forward and backward
    assert_same_as_lean(results)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_causal_lm_dpo_loss_checks_its_batch_and_options():
    """The transformers entry point names the argument for what the backbone would fail on obscurely or accept
    silently: float ids, a mask of another shape or type, a device mismatch, a string flag, beta twice."""
    from fastdpo.integrations.transformers import causal_lm_dpo_loss
    model = _llama()
    ids = torch.randint(0, 31, (4, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    cases = [
        (dict(input_ids=ids.float()), TypeError, "input_ids"),
        (dict(labels=labels.numpy()), TypeError, "labels"),
        (dict(labels=labels.float()), TypeError, "labels"),
        (dict(attention_mask=mask[:, :3]), ValueError, "attention_mask"),
        (dict(attention_mask=mask.numpy()), TypeError, "attention_mask"),
        (dict(labels=labels.to("meta")), ValueError, "labels"),
        (dict(reference_free="True"), TypeError, "reference_free"),
        (dict(beta=5.0, config=fastdpo.LossConfig(beta=0.1)), ValueError, "beta"),
    ]
    for change, error, match in cases:
        kw = dict(input_ids=ids, labels=labels, attention_mask=mask, reference_free=True)
        kw.update(change)
        with pytest.raises(error, match=match):
            causal_lm_dpo_loss(model, **kw)
    out = causal_lm_dpo_loss(model, ids, labels, mask.bool(), reference_free=True, beta=0.1,
                             config=fastdpo.LossConfig(beta=0.1))
    assert torch.isfinite(out.loss)
