"""Script of ``tests/test_distributed_trainers.py``: train with FastDPOTrainer, then with TRL's DPOTrainer under
``patch_trl()``, in whatever ``accelerate launch`` set up (one process, DDP, FSDP2), and write the logs.

``python tests/workers/dist_trainer.py OUT.json PER_DEVICE_BATCH [ddp_find_unused|fsdp_on_cpu|moe]``. The dataset
holds exactly one global batch (4 pairs), so every step sees the same pairs however they are split over processes
and shuffled; rank 0 writes ``{"fast": [log, ...], "patched": [log, ...]}`` with the logged metrics of each step.
``moe``: a tiny Qwen3-MoE model (router loss on, DDP with ``find_unused_parameters``), also trained by stock
``DPOTrainer`` (``"stock"``), with ``aux_loss`` logged and each trainer's final parameters summarized (``params``).
"""

import copy
import json
import sys
import uuid
from pathlib import Path

import torch

# Run as a script, this file sees its own folder only: the shared helpers live one folder up (tests/fdtest.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fdtest import word_tokenizer  # noqa: E402

V = 64
WORDS = [f"w{i}" for i in range(V - 3)]
STEPS = 3
METRICS = ("loss", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
           "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def make_tokenizer():
    return word_tokenizer(WORDS)


def make_dataset(n=4):
    import datasets

    g = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    rows = {"prompt": [words(3 + i % 3) + " " for i in range(n)], "chosen": [words(2 + i % 3) for i in range(n)],
            "rejected": [words(3 + (i + 1) % 3) for i in range(n)]}
    return datasets.Dataset.from_dict(rows).map(lambda x: x, new_fingerprint=uuid.uuid4().hex)


def make_model(moe=False):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None)
    if moe:  # a large router coefficient so that the auxiliary loss weighs on the gradient
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            router_aux_loss_coef=0.5))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def train(trainer_cls, per_device_batch, out_dir, moe=False, **options):
    from trl import DPOConfig

    model = make_model(moe)
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=per_device_batch, max_steps=STEPS,
                     learning_rate=1e-2, report_to="none", logging_steps=1, save_strategy="no", seed=0, use_cpu=True,
                     bf16=False, dataloader_num_workers=0, disable_tqdm=True, beta=0.1, **options)
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=make_dataset(),
                          processing_class=make_tokenizer())
    trainer.train()
    metrics = METRICS + (("aux_loss",) if moe else ())
    logs = [{k: entry[k] for k in metrics} for entry in trainer.state.log_history if "loss" in entry]
    return logs, trainer


def param_summary(trainer):
    """Sum and norm (float64) of each final parameter: the same on every DDP rank."""
    return {n: [p.detach().double().sum().item(), p.detach().double().norm().item()]
            for n, p in trainer.model.named_parameters()}


def force_fsdp_on_cpu():
    """Let accelerate's FSDP run on CPU processes (test-only).

    ``accelerate launch`` with an FSDP config sets the plugin up from its environment, but accelerate enables FSDP
    only on accelerator devices and falls back to ``MULTI_CPU`` (DDP) on CPU. Right after the trainer has made its
    accelerator, give the state the launcher's plugin and the FSDP type, so that the trainer prepares the policy and
    the reference with accelerate's own ``fsdp2_prepare_model`` (per-layer units, the tail unit [final norm,
    lm-head], the root) over gloo.
    """
    import transformers
    from accelerate.state import DistributedType
    from accelerate.utils import FullyShardedDataParallelPlugin

    original = transformers.Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self):
        original(self)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and self.accelerator.distributed_type == DistributedType.MULTI_CPU
        self.accelerator.state.fsdp_plugin, self.accelerator.state.distributed_type = plugin, DistributedType.FSDP
        self.is_fsdp_enabled = True

    transformers.Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess


def main(out_path, per_device_batch, mode=None):
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer, patch_trl

    if mode == "fsdp_on_cpu":
        force_fsdp_on_cpu()
    moe = mode == "moe"
    # With few tokens per rank some experts get none: DDP must look for unused parameters.
    options = {"ddp_find_unused_parameters": True} if mode in ("ddp_find_unused", "moe") else {}
    results = {}
    fast, trainer = train(FastDPOTrainer, per_device_batch, out_path + ".fast", moe, **options)
    results["fast"] = fast
    results["distributed_type"] = str(trainer.accelerator.distributed_type)
    results["num_processes"] = trainer.accelerator.num_processes
    results["wrapper"] = type(trainer.model_wrapped).__name__
    results["find_unused_parameters"] = getattr(trainer.model_wrapped, "find_unused_parameters", None)
    results["head_weight"] = type(trainer.model.lm_head.weight).__name__
    results["head_is_fsdp_unit"] = type(trainer.model.lm_head).__name__.startswith("FSDP")
    with patch_trl(backend="torch"):
        results["patched"], patched = train(DPOTrainer, per_device_batch, out_path + ".patched", moe, **options)
    if moe:
        results["stock"], stock = train(DPOTrainer, per_device_batch, out_path + ".stock", moe, **options)
        results["params"] = {name: param_summary(t) for name, t in (("fast", trainer), ("patched", patched),
                                                                     ("stock", stock))}
    if trainer.accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    # Left to interpreter shutdown, gloo's threads can abort a rank ("terminate called without an active
    # exception") after the work is done; close the group while every rank is still alive.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
