"""Fine-tuning data: a folder of JSONL files turned into (prompt ids, response ids) pairs.

``--data DIR`` holds ``train.jsonl``, ``valid.jsonl`` and optionally ``test.jsonl``,
one example per line, in any of these shapes:

    {"query": "...", "response": "..."}          # upstream's training format
    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}

As in upstream ``train.py`` the prompt goes through the chat template with the
generation prompt appended (``tokenizer_utils.prompt_ids``, the same builder decoding
uses), and the response gets EOS at its end; only the response is ever a target.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import RefusionError
from ..tokenizer_utils import prompt_text
from ..utils import read_jsonl

SPLITS = ("train", "valid", "test")
FORMATS = "{'query','response'}, {'prompt','completion'} or {'messages': [...]}"


@dataclass
class Example:
    """One training pair, tokenized."""

    prompt: List[int]
    response: List[int]  # ends with EOS unless truncated

    def __len__(self):
        return len(self.prompt) + len(self.response)


def _text_field(record: dict, key: str, where: str) -> str:
    """``record[key]`` as a string, or a clear error naming the line."""
    if key not in record:
        raise RefusionError(f"{where}: missing {key!r}")
    if not isinstance(record[key], str):
        raise RefusionError(f"{where}: {key!r} must be a string")
    return record[key]


def split_record(record, where: str) -> Tuple[list, str]:
    """(prompt messages, response text) of one JSONL record in any supported format."""
    if not isinstance(record, dict):
        raise RefusionError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return split_messages(record["messages"], where)
    if "query" in record or "response" in record:
        query, response = _text_field(record, "query", where), _text_field(record, "response", where)
    elif "prompt" in record or "completion" in record:
        query, response = _text_field(record, "prompt", where), _text_field(record, "completion", where)
    else:
        raise RefusionError(f"{where}: unknown format (keys {sorted(record)}); expected {FORMATS}")
    return [{"role": "user", "content": query}], response


def split_messages(messages, where: str) -> Tuple[list, str]:
    """A chat: everything before the last assistant message is the prompt, that message the response."""
    if not isinstance(messages, list) or not messages:
        raise RefusionError(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        fields = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if not all(isinstance(f, str) for f in fields):
            raise RefusionError(f"{where}: message {k} needs string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise RefusionError(f"{where}: the last message must be the assistant's (the response)")
    if len(messages) == 1:
        raise RefusionError(f"{where}: no prompt before the assistant message")
    return messages[:-1], messages[-1]["content"]


def record_texts(record, tokenizer, where: str) -> Tuple[str, str]:
    """(templated prompt text, response text) of one record; ``prompt_ids`` encodes the former."""
    messages, response = split_record(record, where)
    if not response.strip():
        raise RefusionError(f"{where}: the response is empty")
    try:
        return prompt_text(tokenizer, messages), response
    except RefusionError as e:
        raise RefusionError(f"{where}: {e}") from None


def encode_all(tokenizer, texts: List[str]) -> List[List[int]]:
    """Token ids of every text, as ``tokenizer.encode(text, add_special_tokens=False)`` gives them:
    in one parallel batch through a fast tokenizer's backend, else one by one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def read_examples(path: Path, tokenizer) -> List[Example]:
    """Every record of a JSONL file, tokenized (templated prompt; response + EOS); errors name the
    file and line. Texts are encoded in batches: per-record calls took minutes for 10^5 records."""
    texts = [record_texts(record, tokenizer, where) for where, record in read_jsonl(path)]
    prompts = encode_all(tokenizer, [p for p, _ in texts])
    responses = encode_all(tokenizer, [r for _, r in texts])
    return [Example(p, r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]


def truncate(examples: List[Example], max_seq_length: int, name: str) -> List[Example]:
    """Cut responses so prompt + response fits; drop examples whose prompt alone does not."""
    kept, cut, dropped = [], 0, 0
    for x in examples:
        room = max_seq_length - len(x.prompt)
        if room < 1:
            dropped += 1
            continue
        cut += len(x.response) > room
        kept.append(Example(x.prompt, x.response[:room]))
    if cut:
        print(f"[WARNING] {name}: {cut} responses cut to fit --max-seq-length {max_seq_length}")
    if dropped:
        print(f"[WARNING] {name}: {dropped} examples dropped (prompt alone exceeds --max-seq-length)")
    if examples and not kept:
        raise RefusionError(f"{name}: every prompt is longer than --max-seq-length {max_seq_length}")
    return kept


def load_split(data_dir: Path, split: str, tokenizer, max_seq_length: int,
               required: bool) -> Optional[List[Example]]:
    """One split (``train``/``valid``/``test``) or None when absent and optional."""
    path = data_dir / f"{split}.jsonl"
    if not path.exists():
        if required:
            raise RefusionError(f"no {path.name} in {data_dir}")
        return None
    examples = truncate(read_examples(path, tokenizer), max_seq_length, path.name)
    if required and not examples:
        raise RefusionError(f"{path} has no examples")
    return examples


def load_datasets(data: str, tokenizer, max_seq_length: int, train: bool, test: bool):
    """(train, valid, test) example lists from a data folder; the ones not needed may be None."""
    if tokenizer.eos_token_id is None:
        raise RefusionError("the tokenizer has no EOS token to end responses with")
    data_dir = Path(data).expanduser()
    if not data_dir.is_dir():
        raise RefusionError(f"--data must be a folder with train.jsonl/valid.jsonl/test.jsonl: {data}")
    train_set = load_split(data_dir, "train", tokenizer, max_seq_length, required=train)
    valid_set = load_split(data_dir, "valid", tokenizer, max_seq_length, required=train)
    test_set = load_split(data_dir, "test", tokenizer, max_seq_length, required=test)
    return train_set, valid_set, test_set


def check_vocabulary(vocab_size: int, splits: dict, special: dict):
    """Every token id the training will embed must exist in the model: an id past the embedding
    table is not an error in MLX, it reads garbage and trains to NaN. ``splits``: name -> examples;
    ``special``: name -> id (mask, pad)."""
    for name, token in special.items():
        if token is None or not 0 <= token < vocab_size:
            raise RefusionError(f"the {name} id {token} is outside the model's vocabulary [0, {vocab_size})")
    for name, examples in splits.items():
        for number, example in enumerate(examples or [], 1):
            ids = example.prompt + example.response
            if ids and max(ids) >= vocab_size:
                raise RefusionError(f"{name} example {number} has token id {max(ids)}, outside the model's "
                                    f"vocabulary [0, {vocab_size}): is the tokenizer the model's?")
