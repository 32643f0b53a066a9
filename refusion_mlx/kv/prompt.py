"""A prompt cache: one sequence's KV cache kept across requests (chat turns, shared prompts).

A ``PromptCache`` is a ``SlotCache`` plus the token at every position of the conversation
it has seen (``history``) and which of those were decoded rather than fed as prompt. A
request hands it its prompt (``reuse``): the cache keeps its entries at the positions the
prompt shares with the history, drops every other one wherever it sits in cache order, and
says how many prompt tokens need not be fed. After decoding, ``record`` adds the prompt and
the committed answer to the history; the cache then holds them for the next request.

Reusing a prompt prefix is exact: those keys are what a fresh prefill computes (up to float
rounding of a different computation order). Reusing a previous *answer* keeps its keys as
the decoder made them, each committed at its true position, seeing what it saw then (the
paper's own KV-reuse semantics, not bit-identical to prefilling the same text);
``keep_answers=False`` re-prefills answers instead (docs/decoding.md).
"""

from typing import Optional, Sequence

import numpy as np

from ..validation import check_bool, check_int
from .single import SlotCache

UNKNOWN = -1  # a position with no committed token (a hole, or padding)


class PromptCache:
    """A kept ``SlotCache`` and the tokens it holds, position by position."""

    def __init__(self, num_layers: int, max_kv_size: Optional[int] = None, keep_answers: bool = True,
                 bucket: Optional[int] = None):
        self.cache = SlotCache(num_layers, max_kv_size or 0, bucket, max_size=max_kv_size)
        self.keep_answers = keep_answers
        self.history = np.zeros(0, dtype=np.int64)  # token at each position, UNKNOWN where none
        self.decoded = np.zeros(0, dtype=bool)  # position made by the decoder, not fed as prompt
        self.metadata: dict = {}  # what a cache file said of itself (its prompt, ...)

    @property
    def max_kv_size(self) -> Optional[int]:
        return self.cache.max_size

    @property
    def length(self) -> int:
        """Entries held."""
        return self.cache.length

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def shared_prefix(self, prompt_ids: Sequence[int]) -> int:
        """How many leading prompt tokens the cache can stand for (never the last one: its logits
        are needed, as in mlx-lm); stops at the first decoded position unless answers are kept."""
        n = min(len(self.history), len(prompt_ids) - 1)
        if n <= 0:
            return 0
        same = self.history[:n] == np.asarray(prompt_ids[:n])
        if not self.keep_answers:
            same &= ~self.decoded[:n]
        return n if same.all() else int(np.argmin(same))

    def reuse(self, prompt_ids: Sequence[int]) -> int:
        """Keep only the entries of the shared prefix; returns its length (prompt tokens not fed)."""
        shared = self.shared_prefix(prompt_ids)
        cache = self.cache
        cache.retain(cache.positions[: cache.length] < shared)
        self.history, self.decoded = self.history[:shared], self.decoded[:shared]
        return shared

    def record(self, prompt_ids: Sequence[int], answer: dict):
        """The history after a request: its prompt, then the committed answer ``answer``
        (generation offset -> token), holes and padding as UNKNOWN."""
        end = len(prompt_ids) + (max(answer) + 1 if answer else 0)
        history = np.full(end, UNKNOWN, dtype=np.int64)
        history[: len(prompt_ids)] = prompt_ids
        offsets = np.fromiter(answer.keys(), dtype=np.int64, count=len(answer))
        history[len(prompt_ids) + offsets] = np.fromiter(answer.values(), dtype=np.int64, count=len(answer))
        decoded = np.zeros(end, dtype=bool)
        decoded[len(prompt_ids):] = True
        kept = min(len(self.decoded), len(prompt_ids))
        decoded[:kept] = self.decoded[:kept]  # a reused answer stays a decoded one
        self.history, self.decoded = history, decoded

    def copy(self) -> "PromptCache":
        """An independent copy: the same entries; the buffers are copied only where either writes
        (MLX arrays are values: a write to one leaves the other as it was)."""
        other = PromptCache(len(self.cache.layers), self.max_kv_size, self.keep_answers, self.cache.bucket)
        other.cache.adopt(self.cache)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            theirs.capacity = mine.capacity
            if mine.keys is not None:
                theirs.keys, theirs.values = mine.keys[...], mine.values[...]
        other.history, other.decoded = self.history.copy(), self.decoded.copy()
        return other



def make_prompt_cache(model, max_kv_size: Optional[int] = None, keep_answers: bool = True) -> PromptCache:
    """A cache to keep across calls of ``generate_ids``/``generate``/``stream_generate`` (and the batch
    entry points): each call feeds only the prompt tokens it does not hold yet.

    Args:
        model: the model it is for (its layer count; a cache refuses another model's shape).
        max_kv_size: None for an unbounded cache; else at most this many entries, the first few
            and the most recent ones kept (docs/decoding.md: eviction under plan-and-infill).
        keep_answers: reuse earlier answers' keys as the decoder made them (the paper's KV reuse);
            False re-prefills them, which gives exactly the tokens of a fresh call.
    """
    if max_kv_size is not None:
        max_kv_size = check_int("max_kv_size", max_kv_size, 1)
    keep_answers = check_bool("keep_answers", keep_answers)
    return PromptCache(len(model.layers), max_kv_size, keep_answers)
