"""The slot KV cache: one preallocated buffer per layer, committed entries first.

Entries ``[0, length)`` are committed (prompt plus committed slots). A forward
writes its keys right after them; whether those entries are kept is decided
afterwards: ``commit(n)`` keeps the first ``n``, anything else is simply
overwritten by the next forward. Cropping is moving ``length``; nothing is copied.

Committed entries are all visible to every later query, so their order in the
buffer does not matter (RoPE positions travel with the keys); only the new
entries of one forward are ordered, by the view's mask.

Parallel infilling of k slot rows lays the rows behind the committed prefix,
interleaved column by column: token ``o`` of row ``r`` lives at
``length + o*k + r``. Each infill round feeds the tail ``o >= start`` of every
row, which is then one contiguous run of entries (a slice write, not a
scatter), and every row sees the shared prefix and its own earlier tokens only
(a mask): memory is prefix + k*slot, never k*prefix. Committing all rows is
again moving ``length``; only a commit cut short by an EOS gathers the kept
entries to the front (``keep``).
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import mlx.core as mx
import numpy as np


QUERY_BUCKET = 32  # with key buckets, masked attention also pads its queries to a multiple of this


def key_bucket() -> int:
    """Round attention key lengths up to this multiple (1: exact lengths).

    On MLX's CUDA backend cuDNN builds a new attention plan for every new shape
    (~50 ms each at 8B), and the decoder's key and query lengths change from call
    to call; a few fixed shapes, the padding masked, reuse the plans. Metal and
    the CPU attend at any length at no extra cost, so nothing changes there.
    """
    cuda = getattr(mx, "cuda", None)
    on_gpu = mx.default_device() == mx.gpu
    return 256 if on_gpu and cuda is not None and cuda.is_available() else 1


@dataclass
class CacheView:
    """Where one forward writes its keys, and which cached entries its queries see."""

    start: int  # first written entry: writes are the contiguous run start, start+1, ...
    index: Union[None, mx.array, np.ndarray]  # written entries when not contiguous (rows cut short by an EOS)
    end: int  # queries see at most entries [0, end)
    # None, "causal", or bool (queries, width); extra rows pad the queries. Indices and masks are
    # device arrays, except in a batch's SequenceCache, which keeps them on the host for the batch.
    mask: Union[None, str, mx.array, np.ndarray]
    width: int = 0  # keys handed to attention: end, or end rounded up to the key bucket

    def __post_init__(self):
        self.width = self.width or self.end


class LayerCache:
    """Key and value buffers of one layer, allocated on first use."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    def store(self, keys: mx.array, values: mx.array, view: CacheView):
        """Write this forward's keys/values where ``view`` says; return the ``view.width`` first."""
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
        return self.keys[..., : view.width, :], self.values[..., : view.width, :]

    def move(self, source: mx.array, start: int):
        """Copy the entries at ``source`` to ``start, start+1, ...``."""
        if self.keys is not None:
            stop = start + source.size
            self.keys[..., start:stop, :] = self.keys[..., source, :]
            self.values[..., start:stop, :] = self.values[..., source, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlotCache:
    """KV buffers of all layers plus the committed length they share."""

    def __init__(self, num_layers: int, capacity: int, bucket: Optional[int] = None):
        self.bucket = key_bucket() if bucket is None else bucket
        self.capacity = -(-capacity // self.bucket) * self.bucket  # room for the padded keys
        self.limit = capacity
        self.layers: List[LayerCache] = [LayerCache(self.capacity) for _ in range(num_layers)]
        self.length = 0

    def _check_room(self, end: int):
        if end > self.limit:
            raise ValueError(f"cache overflow: {end} entries > capacity {self.limit}")

    def _width(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.capacity)

    def _masked(self, start: int, end: int, visible: np.ndarray, width: int,
                index: Optional[np.ndarray] = None) -> CacheView:
        """A view with a boolean mask (queries, width) made on the host; with key buckets its query
        rows are padded too (see key_bucket)."""
        if self.bucket > 1 and visible.shape[0] % QUERY_BUCKET:
            pad = QUERY_BUCKET - visible.shape[0] % QUERY_BUCKET
            visible = np.concatenate([visible, np.ones((pad, width), dtype=bool)])
        return CacheView(start, None if index is None else mx.array(index), end, mx.array(visible), width)

    def append(self, n: int) -> CacheView:
        """View for ``n`` tokens after the committed ones, causal in cache order."""
        start, end = self.length, self.length + n
        self._check_room(end)
        width = self._width(end)
        if width == end or n == 1:
            # One query: attend to exactly the entries so far (no mask, the fast path everywhere).
            return CacheView(start, None, end, "causal" if n > 1 else None)
        visible = np.arange(width)[None] <= np.arange(start, end)[:, None]
        return self._masked(start, end, visible, width)

    def rows(self, num_rows: int, slot_size: int, start: int, layout_rows: Optional[int] = None) -> CacheView:
        """View for tokens ``start..slot_size-1`` of ``num_rows`` slot rows behind the prefix.

        Queries come offset-major: (offset ``start``, rows 0..num_rows-1), (``start+1``, ...).
        Token ``o`` of row ``r`` lives at ``length + o*layout_rows + r``, where
        ``layout_rows`` (default ``num_rows``) is how many rows the infill began
        with; fewer rows fed (after an EOS) write scattered entries. Each query
        sees the committed prefix plus its own row up to itself; row entries
        before ``start`` keep what an earlier forward wrote there.
        """
        R = layout_rows or num_rows
        base = self.length
        end = base + R * slot_size
        self._check_room(end)
        width = self._width(end)
        query_offset = np.repeat(np.arange(start, slot_size), num_rows)[:, None]
        query_row = np.tile(np.arange(num_rows), slot_size - start)[:, None]
        key = np.arange(width)[None]
        key_row, key_offset = (key - base) % R, (key - base) // R
        mask = (key < base) | ((key < end) & (key_row == query_row) & (key_offset <= query_offset))
        if num_rows == R:
            return self._masked(base + start * R, end, mask, width)
        index = (base + query_offset * R + query_row).reshape(-1)
        return self._masked(base, end, mask, width, index)

    def row_entries(self, num_rows: int, slot_size: int, layout_rows: int) -> mx.array:
        """Cache entries of rows 0..num_rows-1, row after row (the commit order)."""
        offsets = mx.arange(slot_size)
        return (self.length + offsets[None] * layout_rows + mx.arange(num_rows)[:, None]).reshape(-1)

    def keep(self, entries: mx.array):
        """Commit the entries at ``entries`` (all at or after ``length``), in that order."""
        self._check_room(self.length + entries.size)
        for layer in self.layers:
            layer.move(entries, self.length)
        self.length += entries.size

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
