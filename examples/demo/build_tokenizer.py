"""The demo model's vocabulary and blank checkpoint: a small Qwen3 in Hugging Face layout.

    python examples/demo/build_tokenizer.py --data data/demo --out models/demo-init [--size small]

``train_tokenizer`` trains a byte-level BPE on a corpus with Qwen's pre-tokenizer
(digits split one by one, which column arithmetic needs), Qwen's special tokens
plus ReFusion's ``<|mask|>``, and a Qwen3-style chat template, so mlx-lm's
loader and ``refusion_mlx.load`` treat it like the real one. ``init_checkpoint``
writes a matching config.json and randomly initialised float32 weights that the
trainer starts from.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
# Qwen3 has these as added, non-special tokens: mlx-lm then knows the template can think.
THINK_TOKENS = ["<think>", "</think>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_VOCAB_SIZE = 1024
# Qwen2/3's pre-tokenizer: contractions, letter runs, single digits, punctuation runs, newlines.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's template, minus tools: system/user/assistant turns; earlier assistant turns lose
# their thinking; with enable_thinking=false the generation prompt opens an empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

# A few million parameters each; GQA and head_dim as in Qwen3, tied embeddings to stay small.
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=384),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=32, intermediate_size=768),
    "base": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                 head_dim=64, intermediate_size=1152),
}
INIT_STD = 0.02  # Qwen3's initializer_range


def new_tokenizer():
    """An untrained byte-level BPE with Qwen's normalizer, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json as Qwen3's: EOS <|im_end|>, pad <|endoftext|>, no BOS, the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "mask_token": "<|mask|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|beginoftext|>"],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        # Decoding must give back exactly what was encoded (" ." stays " .").
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
    }


def train_tokenizer(texts: Iterable[str], folder, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    model_max_length: int = 512) -> Path:
    """Train the BPE on ``texts`` and save tokenizer.json + tokenizer_config.json in ``folder``.

    ``vocab_size`` counts the added tokens too; special tokens get the last ids, as in Qwen.
    """
    from tokenizers import pre_tokenizers, trainers

    added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    if vocab_size < 256 + added:
        raise ValueError(f"vocab_size must be at least {256 + added} (256 bytes + {added} added tokens)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens(THINK_TOKENS)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = tokenizer_config(model_max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def token_ids(tokenizer_folder) -> dict:
    """{token: id} of the added tokens (specials and think markers) in a saved tokenizer."""
    data = json.loads((Path(tokenizer_folder) / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data["added_tokens"]}


def vocabulary_size(tokenizer_folder) -> int:
    """len(tokenizer): the BPE vocabulary plus the added tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_folder) / "tokenizer.json")).get_vocab_size()


def model_config(tokenizer_folder, size: str = "small", max_position_embeddings: int = 512) -> dict:
    """A Qwen3 config.json for a size preset, with the tokenizer's vocabulary and ReFusion's mask id."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose from {', '.join(SIZES)})")
    ids = token_ids(tokenizer_folder)
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"the tokenizer in {tokenizer_folder} has no {missing[0]} token")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **SIZES[size],
        "vocab_size": vocabulary_size(tokenizer_folder),
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "torch_dtype": "float32",
        "bos_token_id": ids["<|beginoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "mask_token_id": ids["<|mask|>"],
    }


def init_weights(config: dict, seed: int = 0) -> dict:
    """Random float32 weights in HF names: N(0, 0.02) matrices (Qwen3's init), RMSNorm weights 1."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from refusion_mlx.model import Model, ModelArgs

    model = Model(ModelArgs.from_dict(config))
    key = mx.random.key(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if name.endswith("norm.weight"):
            weights[name] = mx.ones(value.shape, dtype=mx.float32)
        else:
            weights[name] = INIT_STD * mx.random.normal(value.shape, dtype=mx.float32, key=sub)
    return weights


def init_checkpoint(folder, tokenizer_folder, size: str = "small", seed: int = 0,
                    max_position_embeddings: int = 512) -> Path:
    """Write a loadable blank model: config.json, model.safetensors and the tokenizer files."""
    import mlx.core as mx

    folder, tokenizer_folder = Path(folder), Path(tokenizer_folder)
    config = model_config(tokenizer_folder, size, max_position_embeddings)
    folder.mkdir(parents=True, exist_ok=True)
    weights = init_weights(config, seed)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if folder.resolve() != tokenizer_folder.resolve():
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_folder / name, folder / name)
    return folder


def parameter_count(config: dict) -> int:
    """Parameters of a config (tied embeddings counted once)."""
    H, I, V, D = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "head_dim"))
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    attention = 2 * H * nq * D + 2 * H * nkv * D + 2 * D
    block = attention + 3 * H * I + 2 * H
    return V * H + config["num_hidden_layers"] * block + H + (0 if config["tie_word_embeddings"] else V * H)


def record_texts(record: dict) -> List[str]:
    """The strings of one JSONL record in any of the fine-tuning formats."""
    keys = ("query", "response", "prompt", "completion")
    texts = [record[k] for k in keys if isinstance(record.get(k), str)]
    for message in record.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            texts.append(message["content"])
    return texts


def corpus(data_folder) -> List[str]:
    """Every text of train.jsonl in a data folder (the tokenizer never sees valid or test)."""
    path = Path(data_folder) / "train.jsonl"
    if not path.exists():
        raise ValueError(f"no train.jsonl in {data_folder}")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.extend(record_texts(json.loads(line)))
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"train.jsonl line {number} is not a JSON object") from None
    if not texts:
        raise ValueError(f"{path} has no texts")
    return texts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python examples/demo/build_tokenizer.py",
                                     description="Train the demo tokenizer and write a blank checkpoint.")
    parser.add_argument("--data", required=True, help="folder with train.jsonl (the tokenizer's corpus)")
    parser.add_argument("--out", required=True, help="model folder to write (tokenizer + config + weights)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--max-position-embeddings", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    try:
        texts = corpus(args.data)
        train_tokenizer(texts, args.out, args.vocab_size, args.max_position_embeddings)
        init_checkpoint(args.out, args.out, args.size, args.seed, args.max_position_embeddings)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = json.loads((Path(args.out) / "config.json").read_text())
    print(f"wrote {args.out}: vocabulary {config['vocab_size']}, {parameter_count(config) / 1e6:.2f}M "
          f"parameters ({args.size}), corpus {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
