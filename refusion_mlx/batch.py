"""Many prompts decoded together: one batched forward per step, sequences joining and leaving.

Each sequence's decoding is the single decoder's own step generator
(``decode.plan_and_infill`` or ``autoregressive.left_to_right``): it yields the
``Forward`` it needs and gets its logits back, then yields a ``Sync`` when it
reads results on the host. A ``Batch`` runs the pending forwards of all active
sequences as one forward over a ``BatchCache`` (packed in one row on the CPU,
``PackedRows``, padded into rows elsewhere), then evaluates every sequence's
``Sync`` in one go: one forward and one synchronisation per step, whatever step
each sequence is at. A sequence that finishes (or is cancelled) leaves the batch
and a new one can join before any step (continuous batching).

Each sequence owns one row of the batched KV buffer, laid out as its own
``SlotCache`` would be: its prefix once, parallel infill rows behind it
(prefix + k*slot, never k copies of the prefix). At temperature 0 in float32 a
sequence decodes to the same tokens as ``generate_ids`` / ``generate_ar_ids``
give it alone, whatever batch it shares; with a seed, sampling is the same as
well (each sequence keeps its own key).
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .autoregressive import left_to_right, start_ar_state
from .cache import QUERY_BUCKET, CacheView, SlotCache, key_bucket
from .decode import (
    Commit,
    DecodeSettings,
    DecodeState,
    GenerationResult,
    in_position_order,
    plan_and_infill,
    resolve_eos,
    settings_for,
    start_state,
)
from .forwards import Forward, Sync, answers, rope_positions, token_array
from .errors import RefusionError

PLAN_AND_INFILL = "plan-and-infill"
LEFT_TO_RIGHT = "left-to-right"
DECODERS = (PLAN_AND_INFILL, LEFT_TO_RIGHT)


class SequenceCache(SlotCache):
    """One sequence's row of a ``BatchCache``, as its decoding steps see it.

    ``SlotCache``'s layout and views (exact lengths, masks and indices kept on the host,
    where the batch assembles them) without buffers of its own; entries kept out of
    place (``keep``, after an EOS cut an infill short) are remembered in ``moves`` and
    moved in the batch's buffers before the next forward.
    """

    def __init__(self, capacity: int):
        super().__init__(0, capacity, bucket=1)
        self.moves: List[tuple] = []  # (source entries, first destination entry)

    def _masked(self, start, end, visible, width, index=None) -> CacheView:
        return CacheView(start, index, end, visible, width)

    def keep(self, entries: mx.array):
        self.moves.append((entries, self.length))
        super().keep(entries)


# --- the batched KV cache ----------------------------------------------------------------

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
    attend: Optional["PackedRows"] = None  # replaces the model's attention (and the cache writes)


def written(view: CacheView, n: int) -> np.ndarray:
    """The entries a view's ``n`` tokens are written to."""
    return np.arange(view.start, view.start + n) if view.index is None else np.asarray(view.index)


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

    def add(self, need: Forward, offset: int):
        view, n = need.view, need.size
        mask = view.mask
        if isinstance(mask, np.ndarray):  # additive once, not in every layer
            mask = mx.where(mx.array(mask), mx.array(0, self.dtype), mx.array(-mx.inf, self.dtype))
        index = None if view.index is None else mx.array(view.index)
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

    def __call__(self, q, k, v, scale, mask=None):
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

    def move(self, row: int, source: mx.array, start: int):
        """In row ``row``, copy the entries at ``source`` to ``start, start+1, ...``."""
        stop = start + source.size
        self.keys[row : row + 1, :, start:stop] = self.keys[row : row + 1][:, :, source]
        self.values[row : row + 1, :, start:stop] = self.values[row : row + 1][:, :, source]

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

    def clear(self):
        """Free every buffer (the batch is empty)."""
        for layer in self.layers:
            layer.keys = layer.values = None
        self.capacity = 1

    @property
    def nbytes(self) -> int:
        return sum(0 if layer.keys is None else layer.keys.nbytes + layer.values.nbytes
                   for layer in self.layers)


# --- the scheduler --------------------------------------------------------------------------

@dataclass
class Generation:
    """A sequence in (or waiting for, or done with) a batch."""

    state: DecodeState
    settings: DecodeSettings
    decoder: str
    on_commit: Optional[Callable[["Generation", Commit], None]] = None
    commits: List[Commit] = field(default_factory=list)
    steps: Optional[Iterator] = None
    pending: Optional[Forward] = None
    done: bool = False
    cancelled: bool = False
    result: Optional[GenerationResult] = None
    started: float = 0.0

    def _committed(self, commit: Commit):
        self.commits.append(commit)
        if self.on_commit is not None:
            self.on_commit(self, commit)


class Batch:
    """Sequences decoded together: ``add`` any time, ``step`` runs one forward for all of them."""

    def __init__(self, model):
        self.model = model
        args = model.args
        dtype = model.model.embed_tokens.weight.dtype
        if not mx.issubdtype(dtype, mx.floating):  # a quantized embedding: its scales' dtype
            dtype = model.model.embed_tokens.scales.dtype
        self.dtype = dtype
        # This rank's KV heads: fewer than the config's when the model is split across ranks.
        kv_heads = model.layers[0].self_attn.n_kv_heads
        self.cache = BatchCache(len(model.layers), kv_heads, args.head_dim, dtype)
        self.active: List[Generation] = []
        self.forwards = 0
        self.bucket = key_bucket()
        # The CPU packs the sequences in one row; devices where calls cost more than arithmetic pad.
        self.packed = mx.default_device() == mx.cpu

    def add(self, prompt_ids: Sequence[int], settings: DecodeSettings, *, decoder: str = PLAN_AND_INFILL,
            mask_id: Optional[int] = None, eos_token_id: Union[None, int, Iterable[int]] = None,
            on_commit: Optional[Callable[[Generation, Commit], None]] = None) -> Generation:
        """Validate one request and put it in the batch (it takes part from the next step on).

        Raises ``RefusionError`` for bad knobs or prompts, as ``generate_ids`` (or, for
        left-to-right, ``generate_ar_ids`` with max_tokens = gen_length) does.
        """
        state = self.start(prompt_ids, settings, decoder, mask_id, eos_token_id)
        capacity = state.cache.limit
        state.cache = SequenceCache(capacity)
        seq = Generation(state, settings, decoder, on_commit, started=time.perf_counter())
        decode = left_to_right if decoder == LEFT_TO_RIGHT else plan_and_infill
        seq.steps = decode(state, settings, seq._committed)
        seq.pending = next(seq.steps)
        rows = list(range(len(self.active)))
        self.cache.reshape(rows, len(rows) + 1, -(-capacity // self.bucket) * self.bucket)
        self.active.append(seq)
        return seq

    def start(self, prompt_ids, settings: DecodeSettings, decoder: str, mask_id=None,
              eos_token_id=None) -> DecodeState:
        """The checked state of one request, as the single decoders make it."""
        if decoder == LEFT_TO_RIGHT:
            return start_ar_state(self.model, prompt_ids, settings.gen_length, settings.temperature,
                                  settings.seed, eos_token_id)
        if decoder == PLAN_AND_INFILL:
            return start_state(self.model, prompt_ids, settings, mask_id, eos_token_id)
        raise RefusionError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")

    def cancel(self, seq: Generation):
        """Drop a sequence before the next step (its client went away, or it has what it needs)."""
        seq.cancelled = True

    def step(self) -> List[Generation]:
        """One batched forward for every active sequence; returns the sequences that left the batch.

        Each sequence is sent its logits and runs on to its next forward; those that must
        look at results on the host first (``Sync``) are evaluated together, in one go.
        """
        left = [s for s in self.active if s.cancelled]
        self._drop(left)
        if not self.active:
            return left
        self._move_kept_entries()
        needs = [s.pending for s in self.active]
        replies = list(zip(self.active, answers(self._forward(needs), needs)))
        while replies:
            syncs = []
            for seq, reply in replies:
                try:
                    need = seq.steps.send(reply)
                except StopIteration:
                    seq.done = True
                    self._finish(seq)
                    left.append(seq)
                    continue
                if isinstance(need, Sync):
                    syncs.append((seq, need))
                else:
                    seq.pending = need
            if syncs:
                mx.eval(*[a for _, need in syncs for a in need.arrays])
            replies = [(seq, None) for seq, _ in syncs]
        self._drop([s for s in self.active if s.done])
        return left

    def _move_kept_entries(self):
        for b, seq in enumerate(self.active):
            for source, start in seq.state.cache.moves:
                for layer in self.cache.layers:
                    layer.move(b, source, start)
            seq.state.cache.moves.clear()

    def _finish(self, seq: Generation):
        state = seq.state
        tokens = in_position_order(seq.commits, state.eos_ids, state.gen_length)
        if seq.decoder == LEFT_TO_RIGHT:
            tpf = 1.0
        else:
            tpf = sum(c.tpf for c in seq.commits) / max(len(seq.commits), 1)
        seq.result = GenerationResult(
            tokens=tokens, tpf=tpf, model_calls=state.model_calls, tokens_fed=state.tokens_fed,
            wall_time=time.perf_counter() - seq.started, peak_memory=mx.get_peak_memory() / 1e9,
            iterations=len(seq.commits), commits=list(seq.commits))

    def _drop(self, gone: List[Generation]):
        if not gone:
            return
        keep = [i for i, s in enumerate(self.active) if s not in gone]
        self.active = [self.active[i] for i in keep]
        if self.active:
            self.cache.reshape(keep, len(keep), 0)
        else:
            self.cache.clear()

    def _forward(self, needs: List[Forward]) -> mx.array:
        """One forward for every sequence's ``Forward``: their wanted logits, one after another."""
        self.forwards += 1
        if len(needs) == 1 and needs[0].view.index is None and not isinstance(needs[0].view.mask, np.ndarray) \
                and self.bucket == 1:
            return self._forward_alone(needs[0])
        if self.packed:
            return self._forward_packed(needs)
        return self._forward_padded(needs)

    def _forward_packed(self, needs: List[Forward]) -> mx.array:
        """The sequences' tokens one after another in a single row (``PackedRows``); logits are
        computed for the wanted tokens only."""
        rows, wanted, offset = PackedRows(self.dtype), [], 0
        for need in needs:
            rows.add(need, offset)
            wanted.append(np.arange(offset + need.size - need.wanted, offset + need.size))
            offset += need.size
        positions = mx.array(np.concatenate([need.positions for need in needs])[None])
        return self.model(self._tokens(needs)[None], positions, self.cache,
                          BatchView(None, 0, None, attend=rows), wanted=mx.array(np.concatenate(wanted)))[0]

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
            writes[b, pad:] = written(view, need.size)
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

    def _forward_alone(self, need: Forward) -> mx.array:
        """One sequence appending: contiguous writes and a causal mask, exactly as ``decode.forward``."""
        start, n = need.view.start, need.size
        view = BatchView(None, start + n, need.view.mask, start)
        return self.model(token_array(need.tokens)[None], rope_positions(need.positions), self.cache, view,
                          last=need.last)[0]


# --- library entry points ------------------------------------------------------------------

def run(batch: Batch, queue: List[tuple], max_batch_size: int) -> None:
    """Feed ``queue`` (callables adding one sequence each) into ``batch`` and step until all are done."""
    waiting = list(queue)
    while waiting or batch.active:
        while waiting and len(batch.active) < max_batch_size:
            waiting.pop(0)()
        batch.step()


def batch_generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    knobs: Optional[Sequence[Dict]] = None,
    decoder: str = PLAN_AND_INFILL,
    max_batch_size: int = 32,
    mask_id: Optional[int] = None,
    eos_token_id: Union[None, int, Iterable[int]] = None,
    **common,
) -> List[GenerationResult]:
    """Decode many prompts together; one ``GenerationResult`` per prompt, in order.

    Args:
        model: from ``load`` or ``load_model``.
        prompts: token ids, one list per prompt.
        knobs: one dict per prompt of ``generate_ids``'s knobs (gen_length, slot_size,
            serial_num_blocks, slot_threshold, token_threshold, temperature, seed, preset),
            over ``common``'s; unset ones come from the preset, the model, the library, as
            for ``generate_ids``.
        decoder: ``"plan-and-infill"`` or ``"left-to-right"`` (then gen_length is the budget).
        max_batch_size: sequences decoded at once; the rest join as others finish.
        mask_id, eos_token_id, **common: as for ``generate_ids``, for every prompt.
    """
    if knobs is not None and len(knobs) != len(prompts):
        raise RefusionError(f"{len(knobs)} knob sets for {len(prompts)} prompts")
    if max_batch_size <= 0:
        raise RefusionError(f"max_batch_size must be positive, got {max_batch_size}")
    batch = Batch(model)
    settings = [settings_for(model, len(p), **{**common, **(knobs[i] if knobs else {})})
                for i, p in enumerate(prompts)]
    # Validate every request before decoding any.
    for prompt, s in zip(prompts, settings):
        batch.start(prompt, s, decoder, mask_id, eos_token_id)
    mx.reset_peak_memory()
    sequences: List[Optional[Generation]] = [None] * len(prompts)

    def adder(i):
        def add():
            sequences[i] = batch.add(prompts[i], settings[i], decoder=decoder, mask_id=mask_id,
                                     eos_token_id=eos_token_id)
        return add

    run(batch, [adder(i) for i in range(len(prompts))], max_batch_size)
    return [s.result for s in sequences]


def batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int], List[dict]]], *,
                   knobs: Optional[Sequence[Dict]] = None, system_prompt: Optional[str] = None,
                   use_chat_template: bool = True, enable_thinking: bool = True, verbose: bool = False,
                   **common) -> List[str]:
    """Texts for many prompts decoded together (``batch_generate_ids`` through the chat template).

    ``prompts`` are what ``generate`` takes (text, chat messages or token ids); the other
    arguments are ``batch_generate_ids``'s and ``generate``'s.
    """
    from .tokenizer_utils import default_eos, prompt_ids

    ids = [prompt_ids(tokenizer, p, system_prompt, use_chat_template, enable_thinking) for p in prompts]
    common.setdefault("eos_token_id", default_eos(tokenizer))
    eos = resolve_eos(common["eos_token_id"], model)
    tic = time.perf_counter()
    results = batch_generate_ids(model, ids, knobs=knobs, **common)
    wall = time.perf_counter() - tic
    texts = [tokenizer.decode([t for t in r.tokens if t not in eos], skip_special_tokens=True)
             for r in results]
    if verbose:
        total = sum(len(r.tokens) for r in results)
        print(f"{len(prompts)} prompts, {total} tokens in {wall:.3f} s: {total / wall:.1f} tokens/s, "
              f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB")
    return texts
