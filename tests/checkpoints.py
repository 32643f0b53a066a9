"""Tiny ReFusion checkpoints and tokenizers, written by the tests themselves (HF layout)."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]

# A Qwen3-style chat template: system/user/assistant turns, thinking switchable.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "plan and infill decodes slots in parallel then verifies them left to right",
    "def add(a, b):\n    return a + b\n",
    "12 + 34 = 46. 7 * 8 = 56. sort [3, 1, 2] -> [1, 2, 3]",
    "Hello! How can I help you today? Think step by step.",
]


def tiny_config(**overrides) -> dict:
    """A small Qwen3 config (GQA: 4 query heads, 2 KV heads) with ReFusion's mask token."""
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 320,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 315,
        "eos_token_id": 317,
        "mask_token_id": 319,
    }
    config.update(overrides)
    return config


def hf_weights(config: dict, seed: int = 0, head_scale: float = 1.0) -> dict:
    """Random float32 weights named as in an HF Qwen3 checkpoint.

    ``head_scale`` multiplies the final norm weight, sharpening the output
    distribution so that confidences cross the decoder's thresholds.
    """
    rng = np.random.default_rng(seed)
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = dense(nq * D, H)
        w[p + "self_attn.k_proj.weight"] = dense(nkv * D, H)
        w[p + "self_attn.v_proj.weight"] = dense(nkv * D, H)
        w[p + "self_attn.o_proj.weight"] = dense(H, nq * D)
        w[p + "self_attn.q_norm.weight"] = norm(D)
        w[p + "self_attn.k_norm.weight"] = norm(D)
        w[p + "mlp.gate_proj.weight"] = dense(I, H)
        w[p + "mlp.up_proj.weight"] = dense(I, H)
        w[p + "mlp.down_proj.weight"] = dense(H, I)
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
    w["model.norm.weight"] = norm(H) * head_scale
    if not config.get("tie_word_embeddings"):
        w["lm_head.weight"] = dense(V, H)
    return w


def write_checkpoint(path, config=None, seed=0, shards=1, head_scale=1.0, weights=None) -> Path:
    """Write config.json and safetensors (sharded with an index when shards > 1)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config or tiny_config()
    weights = weights if weights is not None else hf_weights(config, seed, head_scale)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(weights)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for k, chunk in enumerate(np.array_split(np.array(names), shards)):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in chunk}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def write_tokenizer(path, vocab_size: int = 320) -> Path:
    """Train a small byte-level BPE with Qwen's special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1024,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def special_ids(path) -> dict:
    """Ids of the special tokens in a tokenizer written by ``write_tokenizer``."""
    vocab = json.loads((Path(path) / "tokenizer.json").read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in vocab}
