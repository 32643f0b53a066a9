"""Where a sequence's KV entries lie: the host-side bookkeeping of the slot cache.

Entries ``[0, length)`` are committed (prompt plus committed slots). A forward
writes its keys right after them; whether those entries are kept is decided
afterwards: ``commit(n)`` keeps the first ``n``, anything else is simply
overwritten by the next forward. Cropping is moving ``length``; nothing is copied.

Committed entries are all visible to every later query, so their order does not
matter (RoPE positions travel with the keys); only the new entries of one
forward are ordered, by the view's mask. That is what lets slots commit in any
order, and what lets a bounded cache evict an entry by filling its hole with
another (``evict``).

Parallel infilling of k slot rows lays the rows behind the committed prefix,
interleaved column by column: token ``o`` of row ``r`` lives at
``length + o*k + r``. Each infill round feeds the tail ``o >= start`` of every
row, which is then one contiguous run of entries (a slice write, not a
scatter), and every row sees the shared prefix and its own earlier tokens only
(a mask): memory is prefix + k*slot, never k*prefix. Committing all rows is
again moving ``length``; only a commit cut short by an EOS gathers the kept
entries to the front (``keep``).

``SlotLayout`` is the bookkeeping alone, and every view it makes is host data
(numpy): a ``SlotCache`` (one sequence, ``single.py``) adds buffers and applies
moves at once; a batch (``batch.py``) owns the buffers of all its rows and
applies each row's recorded ``moves`` before its next forward. The layout also
remembers each entry's RoPE position, which is what a prompt cache matches a
new prompt against.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np


SINK = 4  # a bounded cache never evicts the entries of the first positions (see ``evict_for``)
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
    """Where one forward writes its keys, and which cached entries its queries see (host data).

    ``mask`` is None (every query sees ``[0, end)``), ``"causal"`` (in cache order), or a bool
    array (queries, width) whose extra rows, if any, pad the queries (see ``key_bucket``).
    """

    start: int  # first written entry: writes are the contiguous run start, start+1, ...
    index: Optional[np.ndarray]  # written entries when not contiguous (rows cut short by an EOS)
    end: int  # queries see at most entries [0, end)
    mask: Union[None, str, np.ndarray]
    width: int = 0  # keys handed to attention: end, or end rounded up to the key bucket
    _device_index: Optional[mx.array] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.width = self.width or self.end

    def written(self, n: int) -> np.ndarray:
        """The entries this view's ``n`` tokens are written to."""
        return np.arange(self.start, self.start + n) if self.index is None else np.asarray(self.index)

    @property
    def device_index(self) -> mx.array:
        """``index`` uploaded once per forward (every layer writes the same entries)."""
        if self._device_index is None:
            self._device_index = mx.array(self.index)
        return self._device_index


class CacheFull(ValueError):
    """A forward or commit that would run past the cache's room (a bug in the caller)."""


class SlotLayout:
    """One sequence's committed length, its entries' positions, and the views of its forwards."""

    def __init__(self, capacity: int, bucket: int = 1, max_size: Optional[int] = None):
        self.bucket = bucket
        self.max_size = max_size  # a bounded cache: never more entries than this (see ``evict_for``)
        self.limit = capacity if max_size is None else max_size
        self.length = 0
        self.positions = np.full(self.limit, -1, dtype=np.int64)  # RoPE position of every entry
        self.ages = np.zeros(self.limit, dtype=np.int64)  # when each committed entry was committed
        self.committed = 0  # entries ever committed: the next one's age
        self.moves: List[Tuple[np.ndarray, Union[int, np.ndarray]]] = []  # (sources, destination): not applied yet

    def adopt(self, other: "SlotLayout"):
        """Take ``other``'s bookkeeping (a batch row's layout handing a sequence back to its cache)."""
        if other.moves:
            raise ValueError("apply a layout's moves before adopting it")
        self.reserve(other.limit)
        self.length, self.committed = other.length, other.committed
        self.positions[: other.limit], self.ages[: other.limit] = other.positions, other.ages

    def clone(self) -> "SlotLayout":
        """The bookkeeping alone, without buffers (a batch row takes a kept cache's layout)."""
        copy = SlotLayout(self.limit, 1, self.max_size)
        copy.adopt(self)
        return copy

    @property
    def capacity(self) -> int:
        """Entries the buffers need: the limit rounded up to the key bucket (room for padded keys)."""
        return -(-self.limit // self.bucket) * self.bucket

    def reserve(self, capacity: int):
        """Room for at least ``capacity`` entries (a kept cache reused by a longer request); a
        bounded cache keeps its size."""
        if self.max_size is not None:
            capacity = min(capacity, self.max_size)
        if capacity > self.limit:
            grow = capacity - self.limit
            self.positions = np.concatenate([self.positions, np.full(grow, -1, dtype=np.int64)])
            self.ages = np.concatenate([self.ages, np.zeros(grow, dtype=np.int64)])
            self.limit = capacity

    def _check_room(self, end: int):
        if end > self.limit:
            raise CacheFull(f"cache overflow: {end} entries > capacity {self.limit}")

    def _width(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.capacity)

    def _masked(self, start: int, end: int, visible: np.ndarray, width: int,
                index: Optional[np.ndarray] = None) -> CacheView:
        """A view with a boolean mask (queries, width); with key buckets its query rows are padded too."""
        if self.bucket > 1 and visible.shape[0] % QUERY_BUCKET:
            pad = QUERY_BUCKET - visible.shape[0] % QUERY_BUCKET
            visible = np.concatenate([visible, np.ones((pad, width), dtype=bool)])
        return CacheView(start, index, end, visible, width)

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

    def row_entries(self, num_rows: int, slot_size: int, layout_rows: int) -> np.ndarray:
        """Cache entries of rows 0..num_rows-1, row after row (the commit order)."""
        offsets = np.arange(slot_size)
        return (self.length + offsets[None] * layout_rows + np.arange(num_rows)[:, None]).reshape(-1)

    def record(self, view: CacheView, positions: np.ndarray):
        """Note the RoPE positions of the entries a forward writes (kept or not, decided later)."""
        if view.index is None:  # a slice, not an index array: this runs on every forward
            self.positions[view.start : view.start + len(positions)] = positions
        else:
            self.positions[view.index] = positions

    def move(self, source: np.ndarray, start: int):
        """Copy the entries at ``source`` to ``start, start+1, ...`` (recorded for the buffers)."""
        source = np.asarray(source, dtype=np.int64)
        if source.size == 0:
            return
        self.positions[start : start + source.size] = self.positions[source]
        self.ages[start : start + source.size] = self.ages[source]
        self.moves.append((source, start))

    def keep(self, entries: np.ndarray):
        """Commit the entries at ``entries`` (all at or after ``length``), in that order."""
        entries = np.asarray(entries)
        self._check_room(self.length + entries.size)
        self.move(entries, self.length)
        self._committed(entries.size)

    def _committed(self, n: int):
        if n == 1:  # left to right: every step
            self.ages[self.length] = self.committed
        else:
            self.ages[self.length : self.length + n] = self.committed + np.arange(n)
        self.committed += n
        self.length += n

    def commit(self, n: int):
        """Keep the ``n`` entries written right after the committed ones."""
        self._check_room(self.length + n)
        self._committed(n)

    def crop(self, length: int):
        """Forget everything after the first ``length`` entries (O(1))."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to {length} with {self.length} committed")
        self.length = length

    def retain(self, kept: np.ndarray):
        """Keep only the committed entries where ``kept`` (bool, length ``length``) is true.

        Their order among themselves does not matter (see the module docstring), so each
        hole below the new length is filled from the entries above it: at most as many
        copies as entries dropped, however long the cache.
        """
        kept = np.asarray(kept, dtype=bool)
        new_length = int(kept.sum())
        holes = np.flatnonzero(~kept[:new_length])
        movers = new_length + np.flatnonzero(kept[new_length:])
        self.positions[holes], self.ages[holes] = self.positions[movers], self.ages[movers]
        if holes.size:
            self.moves.append((movers, holes))
        self.length = new_length

    def evict_for(self, needed: int, sink: int = SINK) -> int:
        """A bounded cache makes room for ``needed`` more entries; returns how many it dropped.

        It keeps the entries of the first ``sink`` positions (the start of the conversation,
        which attention leans on) and the most recently committed others, as mlx-lm's rotating
        cache does; it drops at least 1/16 of the cache at a time, so that left-to-right decoding
        does not copy entries on every token. Only committed entries are dropped: call it between
        blocks, never while a block's forwards are under way.
        """
        if not self.must_evict(needed):
            return 0
        excess = self.length + needed - self.max_size
        candidates = np.flatnonzero(self.positions[: self.length] >= sink)
        if excess > candidates.size:
            raise CacheFull(f"a cache of {self.max_size} entries cannot make room for {needed} more")
        drop = min(max(excess, self.max_size // 16), candidates.size)
        victims = candidates[np.argsort(self.ages[candidates], kind="stable")[:drop]]
        kept = np.ones(self.length, dtype=bool)
        kept[victims] = False
        self.retain(kept)
        return drop

    def must_evict(self, needed: int) -> bool:
        """Whether ``evict_for(needed)`` would drop entries."""
        return self.max_size is not None and self.length + needed > self.max_size

    def take_moves(self) -> List[Tuple[np.ndarray, Union[int, np.ndarray]]]:
        """The recorded moves, oldest first, forgotten here (the buffers apply them)."""
        moves, self.moves = self.moves, []
        return moves
