"""The server's prompt caches: a least-recently-used store of finished requests' caches.

A request looks up the stored cache that shares the longest prefix with its prompt and decodes
in a copy of it (so clients sharing a system prompt never disturb each other); when it ends,
its cache (prompt + answer) is stored. A stored cache whose history is a prefix of a newer one
is dropped: the newer one stands for it. The store keeps at most ``max_entries`` caches and
``max_bytes`` bytes of buffers, evicting the least recently used first.
"""

from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from .prompt import PromptCache


class PromptCacheStore:
    """Finished requests' prompt caches, most recently used last."""

    def __init__(self, max_entries: int = 10, max_bytes: Optional[int] = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: "OrderedDict[int, PromptCache]" = OrderedDict()
        self._keys = 0
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries.values())

    def fetch(self, prompt_ids: Sequence[int]) -> Optional[PromptCache]:
        """A copy of the stored cache sharing the longest prefix with the prompt (None if none does)."""
        best, shared = None, 0
        for key, cache in self.entries.items():
            n = cache.shared_prefix(prompt_ids)
            if n > shared:
                best, shared = key, n
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(best)
        return self.entries[best].copy()

    def store(self, cache: PromptCache):
        """Keep a finished request's cache; drop what it subsumes, then the least recently used."""
        if self.max_entries <= 0 or cache.length == 0:
            return
        for key in [k for k, old in self.entries.items() if _is_prefix(old.history, cache.history)]:
            del self.entries[key]
        self._keys += 1
        self.entries[self._keys] = cache
        while len(self.entries) > self.max_entries or (
                self.max_bytes is not None and self.nbytes > self.max_bytes and len(self.entries) > 0):
            self.entries.popitem(last=False)


def _is_prefix(short: np.ndarray, long: np.ndarray) -> bool:
    return len(short) <= len(long) and bool(np.array_equal(short, long[: len(short)]))
