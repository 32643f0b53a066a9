"""The executor: one forward for every scheduled sequence's ``Forward``, over a batch's KV buffers.

Given the pending ``Forward`` of each active sequence (row ``b`` of the ``kv.BatchCache`` is
sequence ``b``'s), it assembles one model call: packed in one row on the CPU
(``kv.PackedRows``: no padding, each sequence attends to its own row), padded into rows
elsewhere (where a call costs more than its arithmetic), or plain when one sequence runs alone.
It returns the wanted logits of every sequence, one after another; it knows nothing of
decoding (``scheduler.py`` does) and nothing of requests.
"""

from typing import List, Optional

import mlx.core as mx
import numpy as np

from .forwards import Forward, model_inputs, rope_positions, token_array
from .kv import QUERY_BUCKET, BatchCache, BatchView, PackedRows, SlotCache, SlotLayout, key_bucket


def model_dtype(model):
    """The dtype activations and KV entries take: the embedding's (its scales' when quantized)."""
    embed = model.model.embed_tokens
    dtype = embed.weight.dtype
    return dtype if mx.issubdtype(dtype, mx.floating) else embed.scales.dtype


class Executor:
    """Runs the batch's forwards and owns its KV rows."""

    def __init__(self, model):
        self.model = model
        args = model.args
        self.dtype = model_dtype(model)
        # This rank's KV heads: fewer than the config's when the model is split across ranks.
        kv_heads = model.layers[0].self_attn.n_kv_heads
        self.cache = BatchCache(len(model.layers), kv_heads, args.head_dim, self.dtype)
        self.forwards = 0
        self.bucket = key_bucket()
        # The CPU packs the sequences in one row; devices where calls cost more than arithmetic pad.
        self.packed = mx.default_device() == mx.cpu

    # --- rows -------------------------------------------------------------------------------

    def add_row(self, rows: int, capacity: int, kept: Optional[SlotCache] = None):
        """A new last row (after ``rows`` others) with room for ``capacity`` entries, holding
        ``kept``'s committed entries when a prompt cache brings them."""
        self.cache.reshape(list(range(rows)), rows + 1, -(-capacity // self.bucket) * self.bucket)
        if kept is not None:
            self.cache.load_row(rows, kept)

    def keep_rows(self, rows: List[int]):
        """Keep these rows (in this order); free everything when none is left."""
        if rows:
            self.cache.reshape(rows, len(rows), 0)
        else:
            self.cache.clear()

    def apply_moves(self, row: int, layout: SlotLayout):
        self.cache.apply_moves(row, layout)

    def extract(self, row: int, layout: SlotLayout, into: SlotCache):
        """Hand row ``row`` (laid out as ``layout``) back to a single-sequence cache."""
        self.cache.apply_moves(row, layout)
        into.adopt(layout)
        self.cache.extract(row, into)

    # --- forwards ---------------------------------------------------------------------------

    def forward(self, needs: List[Forward]) -> mx.array:
        """One forward for every sequence's ``Forward``: their wanted logits, one after another."""
        self.forwards += 1
        if len(needs) == 1 and self._alone(needs[0]):
            return self._forward_alone(needs[0])
        if self.packed:
            return self._forward_packed(needs)
        return self._forward_padded(needs)

    def _forward_packed(self, needs: List[Forward]) -> mx.array:
        """The sequences' tokens one after another in a single row (``PackedRows``); logits are
        computed for the wanted tokens only."""
        rows, wanted, offset = PackedRows(self.dtype), [], 0
        for need in needs:
            rows.add(need.view, need.size, offset)
            wanted.append(np.arange(offset + need.size - need.wanted, offset + need.size))
            offset += need.size
        positions = mx.array(np.concatenate([need.positions for need in needs])[None])
        return self.model(self._tokens(needs)[None], positions, self.cache,
                          BatchView(None, 0, None, attend=rows),
                          wanted=mx.array(np.concatenate(wanted))).squeeze(0)  # not [0]: no gather

    def _tokens(self, needs: List[Forward], pads: Optional[List[int]] = None) -> mx.array:
        """The fed tokens, one sequence after another (flat), or in rows left-padded by ``pads``:
        one upload for the host ones, one write per lazy device run (an infill's verify pass)."""
        sizes = [need.size for need in needs]
        if pads is None:
            starts, shape = np.cumsum([0] + sizes[:-1]), (sum(sizes),)
        else:
            width = max(n + pad for n, pad in zip(sizes, pads))
            starts, shape = np.arange(len(needs)) * width + np.asarray(pads), (len(needs), width)
        host = np.zeros(int(np.prod(shape)), dtype=np.int32)
        lazy = []
        for need, start, n in zip(needs, starts, sizes):
            if isinstance(need.tokens, mx.array):
                lazy.append((start, n, need.tokens))
            else:
                host[start : start + n] = np.asarray(need.tokens).reshape(-1)
        tokens = mx.array(host)
        for start, n, fed in lazy:
            tokens[start : start + n] = token_array(fed)
        return tokens.reshape(shape)

    def _forward_padded(self, needs: List[Forward]) -> mx.array:
        """The sequences padded (on the left, so every row's wanted logits are its last) into rows."""
        B = len(needs)
        width = max(need.size for need in needs)
        last = max(need.wanted for need in needs)
        end = max(need.view.end for need in needs)
        # Key lengths in a few fixed sizes where attention plans are built per length (CUDA).
        end = min(-(-end // self.bucket) * self.bucket, self.cache.capacity)
        scratch = self.cache.capacity - 1
        positions = np.zeros((B, width), dtype=np.int32)
        writes = np.full((B, width), scratch, dtype=np.int32)
        # What each query sees, as a bound: entries [0, limit). Padding queries see entry 0 only
        # (never an empty row, which is NaN); queries with a mask of their own (infill rows) get it
        # written in afterwards. Built on the device: the host sends (B, width), not (B, width, end).
        limit = np.ones((B, width), dtype=np.int32)
        pads = [width - need.size for need in needs]
        own = []
        for b, (need, pad) in enumerate(zip(needs, pads)):
            view = need.view
            positions[b, pad:] = need.positions
            writes[b, pad:] = view.written(need.size)
            if view.mask is None:
                limit[b, pad:] = view.end
            elif isinstance(view.mask, str):  # "causal": each sees the entries up to its own
                limit[b, pad:] = writes[b, pad:] + 1
            else:
                limit[b, pad:] = 0
                own.append((b, pad, view.mask))
        visible = mx.arange(end)[None, None] < mx.array(limit)[..., None]
        for b, pad, mask in own:
            visible[b, pad:, : mask.shape[1]] = mx.array(mask)
        if self.bucket > 1 and width % QUERY_BUCKET:  # query lengths in fixed sizes too (CUDA)
            visible = mx.pad(visible, [(0, 0), (0, QUERY_BUCKET - width % QUERY_BUCKET), (0, 0)],
                             constant_values=True)
        view = BatchView(mx.array(writes), end, visible[:, None])
        logits = self.model(self._tokens(needs, pads), mx.array(positions), self.cache, view, last=last)
        logits = logits.reshape(B * last, -1)
        if all(need.wanted == last for need in needs):
            return logits
        # Each row's wanted logits are its last ones: gather them into one (wanted, vocabulary) array.
        rows = np.concatenate([b * last + np.arange(last - need.wanted, last) for b, need in enumerate(needs)])
        return logits[mx.array(rows)]

    def _alone(self, need: Forward) -> bool:
        """Whether a sequence running alone takes the plain path: it appends (contiguous writes,
        no mask of its own) and, where key lengths come in buckets, feeds one token: a single
        query without a mask is the fused fast path at any key length on every backend (as
        ``SlotLayout.append`` and mlx-lm's decoding rely on), so only longer runs need the padding."""
        view = need.view
        return view.index is None and not isinstance(view.mask, np.ndarray) and (self.bucket == 1 or need.size == 1)

    def _forward_alone(self, need: Forward) -> mx.array:
        """One sequence appending: contiguous writes and a causal mask, exactly as ``decode.forward``."""
        start, n = need.view.start, need.size
        view = BatchView(None, start + n, need.view.mask, start)
        return self.model(model_inputs(need.tokens), rope_positions(need.positions), self.cache, view,
                          last=need.last).squeeze(0)  # as forwards.forward: no gather
