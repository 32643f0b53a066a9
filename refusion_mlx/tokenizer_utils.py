"""Tokens with a meaning: the mask token, EOS, and prompts built the same way for training and
for decoding."""

import functools
import json
import re
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .errors import RefusionError
from .validation import check_text, check_token_ids

MASK_TOKEN = "<|mask|>"


def mask_token_in_files(folder: Path) -> Optional[int]:
    """The id of ``<|mask|>`` in a folder's tokenizer files, read as JSON (nothing is run).

    Fast tokenizers list it in tokenizer.json; slow ones (vocab.json + merges.txt) in
    tokenizer_config.json's ``added_tokens_decoder`` or in added_tokens.json.
    """
    def read(name):
        try:
            return json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            return {}

    tok = read("tokenizer.json")
    for entry in tok.get("added_tokens", []):
        if entry.get("content") == MASK_TOKEN:
            return entry["id"]
    vocab = tok.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and MASK_TOKEN in vocab:
        return vocab[MASK_TOKEN]
    decoder = read("tokenizer_config.json").get("added_tokens_decoder", {})
    ids = [int(i) for i, entry in decoder.items() if isinstance(entry, dict) and entry.get("content") == MASK_TOKEN]
    return ids[0] if ids else read("added_tokens.json").get(MASK_TOKEN)


def resolve_mask_id(mask_id: Optional[int], config) -> int:
    """The mask token id: the argument, else the model config's (``model.args``) ``mask_token_id``
    (which ``load`` fills from the tokenizer when the config has none); checked against the vocabulary."""
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise RefusionError(
            f"no mask token: the config has no mask_token_id and no {MASK_TOKEN} token was found; "
            "pass mask_id explicitly"
        )
    if not 0 <= mask_id < config.vocab_size:
        raise RefusionError(f"mask_id {mask_id} is outside the vocabulary (size {config.vocab_size})")
    return int(mask_id)


def default_eos(tokenizer) -> List[int]:
    """EOS ids of a tokenizer: mlx-lm's set (tokenizer + config), else the tokenizer's own."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return sorted(ids)
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def prompt_ids(tokenizer, prompt: Union[str, Sequence[int], List[dict]], system_prompt: Optional[str] = None,
               use_chat_template: bool = True, enable_thinking: bool = True) -> List[int]:
    """Token ids of a prompt, built as upstream's ``train.py`` builds its training prompts.

    ``prompt`` is a string (one user turn), a list of chat messages, or token ids (returned
    as they are). Through the chat template with the assistant's turn opened and thinking
    on (Qwen3's default; passed explicitly because mlx-lm's wrapper turns it off for
    templates without ``<think>``), then encoded without adding special tokens: the
    template writes its own, as ``apply_chat_template(tokenize=True)`` does. Training
    (``tuner.datasets``) and decoding both call this, so the model sees at inference
    exactly the prompt ids it was trained on.
    """
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(m, dict)
                                                                                       for m in prompt)):
        return check_token_ids("prompt", prompt)
    text = prompt_text(tokenizer, prompt, system_prompt, use_chat_template, enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_text(tokenizer, prompt: Union[str, List[dict]], system_prompt: Optional[str] = None,
                use_chat_template: bool = True, enable_thinking: bool = True) -> str:
    """The text ``prompt_ids`` encodes (a string or chat messages; same arguments)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for message in messages:
        check_text("prompt", message.get("content"))
    if system_prompt is not None:
        check_text("system_prompt", system_prompt)
    if not any(m["content"].strip() for m in messages):
        raise RefusionError("the prompt is empty")
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=enable_thinking)
    elif len(messages) == 1:
        text = messages[0]["content"]
    elif len(messages) == 2 and messages[0]["role"] == "system":
        text = messages[0]["content"] + "\n" + messages[1]["content"]
    else:
        raise RefusionError("a multi-turn chat needs a tokenizer with a chat template")
    return text


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict:
    """Byte-level BPE's alphabet (GPT-2's, Qwen's): each byte is one printable character, the
    printable Latin-1 bytes as themselves, the others as chr(256 + k) in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in set(kept))})
    return table


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback: one byte per id


def byte_piece_test(tokenizer):
    """``id -> whether it is a byte-fallback piece`` (named ``<0xNN>``), from the tokenizer's names
    for its ids; None where it has none."""
    name = getattr(tokenizer, "convert_ids_to_tokens", None)
    if name is None:
        return None
    return lambda token: BYTE_PIECE.fullmatch(str(name(token))) is not None


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes one token stands for. A token holding part of a character (byte-level BPE, or
    SentencePiece's <0xNN> fallback) decodes alone to U+FFFD; its own bytes are read from its
    vocabulary entry instead, so a sequence's tokens' bytes always join into its UTF-8 text."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text.encode("utf-8", "surrogatepass")
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        fallback = BYTE_PIECE.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        table = _byte_level_chars()
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return text.encode("utf-8", "surrogatepass")
