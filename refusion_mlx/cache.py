"""The slot KV cache: one preallocated buffer per layer, in commit order.

Entries ``[0, length)`` are committed (prompt plus committed slots, in the order
they were committed). A forward writes its keys right after them; whether those
entries are kept is decided afterwards: ``commit(n)`` keeps the first ``n``,
anything else is simply overwritten by the next forward. Cropping is moving
``length``; nothing is copied.

Parallel infilling of k slots lays the k slot rows one after another behind the
committed prefix, ``slot_size`` entries each. Every row attends to the shared
prefix and to its own entries only (a mask), so the prefix is stored once:
memory is prefix + k*slot, never k*prefix. Because the rows are already in
commit order, committing them is again just moving ``length``.
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import mlx.core as mx


@dataclass
class CacheView:
    """Where one forward writes its keys, and which cached entries its queries see."""

    start: int  # first written index (contiguous writes)
    index: Optional[mx.array]  # written indices when not contiguous (slot rows)
    end: int  # queries see entries [0, end) under ``mask``
    mask: Union[None, str, mx.array]


class LayerCache:
    """Key and value buffers of one layer, allocated on first use."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    def store(self, keys: mx.array, values: mx.array, view: CacheView):
        """Write this forward's keys/values where ``view`` says; return the visible ones."""
        if self.keys is None:
            _, n_kv_heads, _, head_dim = keys.shape
            shape = (1, n_kv_heads, self.capacity, head_dim)
            self.keys = mx.zeros(shape, dtype=keys.dtype)
            self.values = mx.zeros(shape, dtype=values.dtype)
        if view.index is None:
            stop = view.start + keys.shape[2]
            self.keys[..., view.start : stop, :] = keys
            self.values[..., view.start : stop, :] = values
        else:
            self.keys[..., view.index, :] = keys
            self.values[..., view.index, :] = values
        return self.keys[..., : view.end, :], self.values[..., : view.end, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlotCache:
    """KV buffers of all layers plus the committed length they share."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.layers: List[LayerCache] = [LayerCache(capacity) for _ in range(num_layers)]
        self.length = 0

    def _check_room(self, end: int):
        if end > self.capacity:
            raise ValueError(f"cache overflow: {end} entries > capacity {self.capacity}")

    def append(self, n: int) -> CacheView:
        """View for ``n`` tokens after the committed ones, causal in cache order."""
        end = self.length + n
        self._check_room(end)
        return CacheView(self.length, None, end, "causal" if n > 1 else None)

    def rows(self, num_rows: int, slot_size: int, start: int) -> CacheView:
        """View for tokens ``start..slot_size-1`` of ``num_rows`` slot rows behind the prefix.

        Row ``r`` owns entries ``length + r*slot_size ...``; each query sees the
        committed prefix plus its own row up to itself. Row entries before
        ``start`` keep what an earlier forward wrote there.
        """
        base = self.length
        end = base + num_rows * slot_size
        self._check_room(end)
        width = slot_size - start
        query_row = mx.repeat(mx.arange(num_rows), width)
        query_offset = mx.tile(mx.arange(start, slot_size), num_rows)
        key = mx.arange(end)
        key_row = (key - base) // slot_size
        key_offset = (key - base) % slot_size
        in_own_row = (key_row[None] == query_row[:, None]) & (key_offset[None] <= query_offset[:, None])
        mask = (key < base)[None] | in_own_row
        index = base + query_row * slot_size + query_offset
        return CacheView(base, index, end, mask)

    def commit(self, n: int):
        """Keep the ``n`` entries written right after the committed ones."""
        self._check_room(self.length + n)
        self.length += n

    def crop(self, length: int):
        """Forget everything after the first ``length`` entries (O(1))."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to {length} with {self.length} committed")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(layer.nbytes for layer in self.layers)
