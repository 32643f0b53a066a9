"""A batch's KV buffers: one row per sequence, laid out as that sequence's own ``SlotLayout`` says.

Each row holds its sequence's prefix once and its parallel infill rows behind it
(prefix + k*slot, never k copies of the prefix). The layouts live with the
sequences (host bookkeeping); the batch applies each one's recorded moves to its
row before the next forward (``apply_moves``). The last entry of every row is
scratch space for the padding of shorter requests. A row can be filled from a
kept ``SlotCache`` (``load_row``) and copied back out (``extract``), so a prompt
cache outlives the batch it was decoded in.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .layout import SlotLayout
from .single import SlotCache, _destination


@dataclass
class BatchView:
    """Where a batched forward writes (B, L) keys, and what each query sees (B, 1, L, end).

    ``start`` (with ``index`` None): every row writes the contiguous run ``start, start+1, ...``;
    then ``mask`` may be ``"causal"`` or None, as for one sequence alone. ``attend``: the
    sequences are packed in one row (``PackedRows``).
    """

    index: Optional[mx.array]
    end: int
    mask: Union[None, str, mx.array]
    start: Optional[int] = None
    attend: Optional["PackedRows"] = None  # replaces the attention call (and the cache writes)


class PackedRows:
    """Several sequences' tokens packed one after another in a single row, without padding.

    The linear layers run once over all of them; each sequence's keys go to its own cache
    row and its queries attend to that row alone (separate attention calls, each the size
    a sequence decoded alone would make, with the same masks). This is the CPU's layout:
    there attention costs in proportion to its scores and every padded token costs as much
    as a real one. Where a call costs more than its arithmetic (GPUs), one padded forward wins.
    """

    def __init__(self, dtype):
        self.dtype = dtype
        self.rows = []  # (offset in the packed row, tokens, visible keys, mask, write start, write index)

    def add(self, view, n: int, offset: int):
        """Sequence ``len(rows)``'s ``n`` tokens at ``offset``, written and attending as its ``view`` says."""
        mask = view.mask
        if isinstance(mask, np.ndarray):  # additive once, not in every layer
            mask = mx.where(mx.array(mask), mx.array(0, self.dtype), mx.array(-mx.inf, self.dtype))
        index = None if view.index is None else view.device_index
        self.rows.append((offset, n, view.width, mask, view.start, index))

    def store(self, layer: "BatchLayerCache", keys: mx.array, values: mx.array):
        for b, (offset, n, _, _, start, index) in enumerate(self.rows):
            k, v = keys[:, :, offset : offset + n], values[:, :, offset : offset + n]
            if index is None:
                layer.keys[b : b + 1, :, start : start + n] = k
                layer.values[b : b + 1, :, start : start + n] = v
            else:
                layer.keys[b : b + 1, :, index, :] = k
                layer.values[b : b + 1, :, index, :] = v

    def __call__(self, q, k, v, scale):
        outs = [mx.fast.scaled_dot_product_attention(q[:, :, offset : offset + n], k[b : b + 1, :, :end],
                                                     v[b : b + 1, :, :end], scale=scale, mask=row_mask)
                for b, (offset, n, end, row_mask, _, _) in enumerate(self.rows)]
        return mx.concatenate(outs, axis=2)


class BatchLayerCache:
    """One layer's (batch, kv heads, capacity, head dim) key and value buffers."""

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    def store(self, keys: mx.array, values: mx.array, view: BatchView):
        """Scatter this forward's keys/values into each row; return the first ``view.end`` entries."""
        if view.attend is not None:
            view.attend.store(self, keys, values)
            return self.keys, self.values
        if view.index is None:
            stop = view.start + keys.shape[2]
            self.keys[:, :, view.start : stop] = keys
            self.values[:, :, view.start : stop] = values
        else:
            index = mx.broadcast_to(view.index[:, None, :, None], keys.shape)
            self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
            self.values = mx.put_along_axis(self.values, index, values, axis=2)
        return self.keys[:, :, : view.end], self.values[:, :, : view.end]

    def move(self, row: int, source: np.ndarray, dest: Union[int, np.ndarray]):
        """In row ``row``, copy the entries at ``source`` to ``dest`` (a first entry, or entries)."""
        source_index, to = mx.array(source), _destination(dest, len(source))
        self.keys[row : row + 1, :, to] = self.keys[row : row + 1][:, :, source_index]
        self.values[row : row + 1, :, to] = self.values[row : row + 1][:, :, source_index]

    def resize(self, rows: mx.array, batch: int, capacity: int, like: Optional[tuple] = None):
        """Keep buffer rows ``rows`` (in that order), then pad to ``batch`` rows and ``capacity``."""
        if self.keys is None:
            if like is None:
                return
            heads, dim, dtype = like
            self.keys = mx.zeros((batch, heads, capacity, dim), dtype)
            self.values = mx.zeros((batch, heads, capacity, dim), dtype)
            return
        keys, values = self.keys[rows], self.values[rows]
        pad = [(0, batch - keys.shape[0]), (0, 0), (0, capacity - keys.shape[2]), (0, 0)]
        self.keys, self.values = mx.pad(keys, pad), mx.pad(values, pad)


class BatchCache:
    """Rows of sequences, each with its own committed prefix; the last entry of every row is
    scratch space for the padding of shorter requests."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype):
        self.layers = [BatchLayerCache() for _ in range(num_layers)]
        self.like = (kv_heads, head_dim, dtype)
        self.capacity = 1  # entries per row, the scratch entry included

    def reshape(self, rows: Sequence[int], batch: int, capacity: int):
        """Keep rows ``rows``, grow to ``batch`` rows of at least ``capacity`` entries (+ scratch)."""
        self.capacity = max(self.capacity, capacity + 1)
        kept = mx.array(np.asarray(rows, dtype=np.int32))
        for layer in self.layers:
            layer.resize(kept, batch, self.capacity, self.like)

    def apply_moves(self, row: int, layout: SlotLayout):
        """Apply the moves ``layout`` recorded (entries kept out of place) to row ``row``."""
        for source, dest in layout.take_moves():
            for layer in self.layers:
                layer.move(row, source, dest)

    def load_row(self, row: int, cache: SlotCache):
        """Row ``row`` takes the committed entries of a kept single-sequence cache."""
        n = cache.length
        if n == 0:
            return
        for layer, kept in zip(self.layers, cache.layers):
            layer.keys[row : row + 1, :, :n] = kept.keys[..., :n, :].astype(layer.keys.dtype)
            layer.values[row : row + 1, :, :n] = kept.values[..., :n, :].astype(layer.values.dtype)

    def extract(self, row: int, cache: SlotCache):
        """Copy row ``row``'s first ``cache.length`` entries into ``cache``'s buffers."""
        n = cache.length
        for layer, kept in zip(self.layers, cache.layers):
            if kept.keys is None or kept.keys.shape[2] < kept.capacity:  # room for the whole row
                shape = (1, layer.keys.shape[1], kept.capacity, layer.keys.shape[3])
                kept.keys, kept.values = mx.zeros(shape, layer.keys.dtype), mx.zeros(shape, layer.values.dtype)
            kept.keys[..., :n, :] = layer.keys[row : row + 1, :, :n]
            kept.values[..., :n, :] = layer.values[row : row + 1, :, :n]

    def clear(self):
        """Free every buffer (the batch is empty)."""
        for layer in self.layers:
            layer.keys = layer.values = None
        self.capacity = 1

    @property
    def nbytes(self) -> int:
        return sum(0 if layer.keys is None else layer.keys.nbytes + layer.values.nbytes
                   for layer in self.layers)
