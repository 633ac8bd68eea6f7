"""Offline stand-ins for the hub ids TRL's trainer tests load, written under ``<root>/trl-internal-testing/``:
tiny causal LMs and reward models built from configs, one byte-level BPE tokenizer with a chat template, and a
generated ``zen`` dataset in every preference, language-modeling and prompt format those tests read (a local
folder whose README declares the configs, which ``datasets.load_dataset`` reads as it reads the hub's).

Run from the folder the tests run in, a hub id such as ``trl-internal-testing/tiny-Qwen2ForCausalLM-2.5`` is then a
local path. Vision models and data, remote-code models and the harmony and tool-call datasets have no stand-in.
"""

from __future__ import annotations

import json
import os
import random
import sys

ORG = "trl-internal-testing"
WORDS = ("the sky is blue grass green water wet fire hot ice cold sun bright night dark cat dog bird fish tree leaf "
         "stone river mountain small large quick slow happy sad red yellow").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
_TWO_LAYERS = ["conv", "full_attention"]
CAUSAL_LMS = {
    "tiny-Qwen2ForCausalLM-2.5": ("qwen2", {}),
    "tiny-Qwen3ForCausalLM": ("qwen3", {}),
    "tiny-LlamaForCausalLM-3.2": ("llama", {}),
    "tiny-MistralForCausalLM-0.2": ("mistral", {}),
    "tiny-Cohere2ForCausalLM": ("cohere2", {}),
    "tiny-Olmo3ForCausalLM": ("olmo3", {}),
    "tiny-Glm4MoeForCausalLM": ("glm4_moe", dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                                                 first_k_dense_replace=1, n_group=1, topk_group=1)),
    "tiny-GptOssForCausalLM": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                               sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "tiny-Qwen3MoeForCausalLM": ("qwen3_moe", dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "tiny-NemotronHForCausalLM-nano": ("nemotron_h", dict(hybrid_override_pattern="M*", mamba_num_heads=4,
                                                          mamba_head_dim=8, ssm_state_size=8, n_groups=1, head_dim=8)),
    "tiny-Lfm2ForCausalLM": ("lfm2", dict(layer_types=_TWO_LAYERS, block_ff_dim=32)),
    "tiny-Lfm2ForCausalLM-2.5": ("lfm2", dict(layer_types=_TWO_LAYERS, block_ff_dim=32)),
}
CLASSIFIERS = {
    "tiny-Qwen2ForSequenceClassification-2.5": "qwen2",
    "tiny-Qwen3ForSequenceClassification": "qwen3",
    "tiny-LlamaForSequenceClassification-3.2": "llama",
}


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _rows(rng, n):
    return [dict(prompt=_sentence(rng, rng.randint(2, 6)), chosen=" " + _sentence(rng, rng.randint(1, 5)),
                 rejected=" " + _sentence(rng, rng.randint(1, 5))) for _ in range(n)]


def _messages(row):
    prompt = [{"role": "user", "content": row["prompt"]}]
    return (prompt, [{"role": "assistant", "content": row["chosen"].strip()}],
            [{"role": "assistant", "content": row["rejected"].strip()}])


def _formats():
    """Each ``zen`` config as a function of one generated (prompt, chosen, rejected) row."""
    def label(r):
        return len(r["chosen"]) % 2 == 0

    return {
        "standard_preference": lambda r: r,
        "conversational_preference": lambda r: dict(zip(("prompt", "chosen", "rejected"), _messages(r))),
        "standard_implicit_prompt_preference": lambda r: dict(chosen=r["prompt"] + r["chosen"],
                                                              rejected=r["prompt"] + r["rejected"]),
        "conversational_implicit_prompt_preference": lambda r: dict(chosen=_messages(r)[0] + _messages(r)[1],
                                                                    rejected=_messages(r)[0] + _messages(r)[2]),
        "standard_unpaired_preference": lambda r: dict(prompt=r["prompt"], completion=r["chosen"], label=label(r)),
        "conversational_unpaired_preference": lambda r: dict(prompt=_messages(r)[0], completion=_messages(r)[1],
                                                             label=label(r)),
        "standard_language_modeling": lambda r: dict(text=r["prompt"] + r["chosen"]),
        "conversational_language_modeling": lambda r: dict(messages=_messages(r)[0] + _messages(r)[1]),
        "standard_prompt_completion": lambda r: dict(prompt=r["prompt"], completion=r["chosen"]),
        "conversational_prompt_completion": lambda r: dict(prompt=_messages(r)[0], completion=_messages(r)[1]),
        "standard_prompt_only": lambda r: dict(prompt=r["prompt"]),
        "conversational_prompt_only": lambda r: dict(prompt=_messages(r)[0]),
    }


def write_dataset(root, seed=0):
    rng = random.Random(seed)
    splits = {"train": _rows(rng, 17), "test": _rows(rng, 5)}
    folder = os.path.join(root, ORG, "zen")
    card = ["---", "configs:"]
    for name, fmt in _formats().items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        card += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            with open(os.path.join(folder, name, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(fmt(r)) + "\n" for r in rows)
            card += [f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(card + ["---", ""]))


def tokenizer(seed=0):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [_sentence(rng, 8) for _ in range(400)] + ["user assistant system"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def write_models(root, tok, names=None):
    """The causal LMs and reward models (``names``: a subset); returns the names that could not be built (a family
    the installed transformers lacks) with the reason."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    todo = [(n, AutoModelForCausalLM, mt, extra) for n, (mt, extra) in CAUSAL_LMS.items()]
    todo += [(n, AutoModelForSequenceClassification, mt, dict(num_labels=1)) for n, mt in CLASSIFIERS.items()]
    missing = {}
    for i, (name, auto, model_type, extra) in enumerate(todo):
        if names is not None and name not in names:
            continue
        torch.manual_seed(i)
        try:
            config = AutoConfig.for_model(model_type, **SMALL, **extra, **ids)
        except (KeyError, ValueError) as e:
            missing[name] = f"{type(e).__name__}: {e}"
            continue
        folder = os.path.join(root, ORG, name)
        auto.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return missing


def build(root, names=None):
    write_dataset(root)
    return write_models(root, tokenizer(), names)


if __name__ == "__main__":
    for name, why in build(sys.argv[1] if len(sys.argv) > 1 else ".").items():
        print(f"no stand-in for {name}: {why}")
