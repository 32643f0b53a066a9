"""One sequence's KV buffers: ``SlotLayout``'s bookkeeping plus a key and value buffer per layer."""

from typing import List, Optional, Union

import mlx.core as mx
import numpy as np

from .layout import CacheView, SlotLayout, key_bucket


def _destination(dest: Union[int, np.ndarray], n: int):
    return slice(dest, dest + n) if isinstance(dest, (int, np.integer)) else mx.array(dest)


class LayerCache:
    """Key and value buffers (1, kv heads, capacity, head dim) of one layer, allocated on first use."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    def _grow(self):
        have = self.keys.shape[2]
        if have < self.capacity:
            pad = [(0, 0), (0, 0), (0, self.capacity - have), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, pad), mx.pad(self.values, pad)

    def store(self, keys: mx.array, values: mx.array, view: CacheView):
        """Write this forward's keys/values where ``view`` says; return the ``view.width`` first."""
        if self.keys is None:
            _, n_kv_heads, _, head_dim = keys.shape
            shape = (1, n_kv_heads, self.capacity, head_dim)
            self.keys = mx.zeros(shape, dtype=keys.dtype)
            self.values = mx.zeros(shape, dtype=values.dtype)
        self._grow()
        if view.index is None:
            stop = view.start + keys.shape[2]
            self.keys[..., view.start : stop, :] = keys
            self.values[..., view.start : stop, :] = values
        else:
            self.keys[..., view.device_index, :] = keys
            self.values[..., view.device_index, :] = values
        return self.keys[..., : view.width, :], self.values[..., : view.width, :]

    def move(self, source: np.ndarray, dest: Union[int, np.ndarray]):
        """Copy the entries at ``source`` to ``dest`` (a first entry, or entries)."""
        if self.keys is not None:
            source_index, to = mx.array(source), _destination(dest, len(source))
            self.keys[..., to, :] = self.keys[..., source_index, :]
            self.values[..., to, :] = self.values[..., source_index, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlotCache(SlotLayout):
    """KV buffers of all layers of one sequence; moves (``keep``, ``retain``) happen at once."""

    def __init__(self, num_layers: int, capacity: int, bucket: Optional[int] = None,
                 max_size: Optional[int] = None):
        super().__init__(capacity, key_bucket() if bucket is None else bucket, max_size)
        self.layers: List[LayerCache] = [LayerCache(self.capacity) for _ in range(num_layers)]

    def reserve(self, capacity: int):
        super().reserve(capacity)
        for layer in self.layers:
            layer.capacity = self.capacity

    def apply_moves(self):
        for source, dest in self.take_moves():
            for layer in self.layers:
                layer.move(source, dest)

    def keep(self, entries):
        super().keep(entries)
        self.apply_moves()

    def retain(self, kept):
        super().retain(kept)
        self.apply_moves()

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(layer.nbytes for layer in self.layers)
