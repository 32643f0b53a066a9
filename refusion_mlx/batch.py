"""Many prompts decoded together: one batched forward per step, sequences joining and leaving.

Each sequence's decoding is a generator (``plan_and_infill`` or ``left_to_right``)
that yields ``Forward`` requests — tokens, RoPE positions, where their keys go in
the sequence's own cache row and what each query may see — and is sent back the
logits it asked for. The decisions are the single-sequence decoder's, made by
``decode.py``'s helpers (``choose_slots``, ``verified_slots``,
``update_tags``, ``settle``, ...); only the forwards are collected here (the
control flow of ``iterate``/``infill`` is mirrored as generators, so the single
decoder stays as fast as it is). A ``Batch`` puts the pending requests of all
active sequences into one forward over a ``BatchCache``, packed in one row on the
CPU (``PackedRows``) or padded into rows elsewhere; a sequence that finishes (or
is cancelled) leaves the batch and a new one can join before any step
(continuous batching).

Each sequence owns one row of the batched KV buffer: its prefix once, and its
parallel infill rows behind it as in ``cache.SlotCache`` (prefix + k*slot, never
k copies of the prefix). At temperature 0 in float32 a sequence decodes to the
same tokens as ``generate_ids`` / ``generate_ar_ids`` give it alone, whatever
batch it shares; with a seed, sampling is the same as well (each sequence keeps
its own key).
"""

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import QUERY_BUCKET, key_bucket
from .decode import (
    Commit,
    DecodeSettings,
    DecodeState,
    GenerationResult,
    Plan,
    choose_slots,
    generation_tpf,
    in_position_order,
    resolve_eos,
    settings_for,
    settle,
    slot_positions,
    start_state,
    update_tags,
    verified_slots,
)
from .errors import RefusionError
from .sampling import draft_tokens, next_token_probability, probability_of

PLAN_AND_INFILL = "plan-and-infill"
LEFT_TO_RIGHT = "left-to-right"
DECODERS = (PLAN_AND_INFILL, LEFT_TO_RIGHT)


# --- one sequence's cache row, as the decoder steps see it ---------------------------------

@dataclass
class Placement:
    """Where each fed token's key goes in its sequence's row, and what its query sees.

    Query ``j`` sees entries ``[0, prefix_end[j])`` and ``[own_start[j], own_end[j])``.
    """

    writes: np.ndarray
    prefix_end: np.ndarray
    own_start: np.ndarray
    own_end: np.ndarray
    appends: bool = False  # contiguous writes after the prefix, causal among themselves


class SequenceCache:
    """The committed length of one sequence's row; ``SlotCache``'s bookkeeping without buffers."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0

    def _check_room(self, end: int):
        if end > self.capacity:
            raise ValueError(f"cache overflow: {end} entries > capacity {self.capacity}")

    def append(self, n: int) -> Placement:
        """``n`` tokens after the committed ones, causal among themselves."""
        self._check_room(self.length + n)
        writes = self.length + np.arange(n)
        empty = np.zeros(n, dtype=np.int64)
        return Placement(writes, writes + 1, empty, empty, appends=True)

    def rows(self, num_rows: int, slot_size: int, start: int) -> Placement:
        """Tokens ``start..slot_size-1`` of ``num_rows`` slot rows laid out row after row behind
        the prefix; each sees the prefix and its own row up to itself."""
        base = self.length
        self._check_room(base + num_rows * slot_size)
        row_start = base + np.repeat(np.arange(num_rows), slot_size - start) * slot_size
        writes = row_start + np.tile(np.arange(start, slot_size), num_rows)
        return Placement(writes, np.full(writes.size, base), row_start, writes + 1)

    def commit(self, n: int):
        """Keep the ``n`` entries written right after the committed ones."""
        self._check_room(self.length + n)
        self.length += n


@dataclass
class Forward:
    """One sequence's share of a batched forward: flat tokens (host or lazy device array)."""

    tokens: Union[np.ndarray, mx.array]
    positions: np.ndarray
    placement: Placement
    last: int  # logits are wanted for the last ``last`` tokens


def request(state: DecodeState, tokens, positions, placement: Placement, last: Optional[int] = None):
    """Ask for the logits of ``tokens``; counts the call as ``decode.forward`` does."""
    n = int(tokens.size) if isinstance(tokens, mx.array) else len(tokens)
    state.model_calls += 1
    state.tokens_fed += n
    logits = yield Forward(tokens, np.asarray(positions).reshape(-1), placement, last or n)
    return logits


# --- plan-and-infill as a generator of forward requests (decode.py's steps, same decisions) ----

def plan(state: DecodeState, pending: Sequence[int], settings: DecodeSettings):
    S = settings.slot_size
    n = len(pending) * S
    tokens = state.uncached + [state.mask_id] * n
    positions = list(range(len(state.uncached))) + slot_positions(state, pending, S).reshape(-1).tolist()
    logits = yield from request(state, tokens, positions, state.cache.append(len(tokens)), last=n)
    state.cache.commit(len(state.uncached))
    state.uncached = []
    logits = logits.reshape(len(pending), S, -1)
    key = None
    if settings.temperature > 0:
        state.key, key = mx.random.split(state.key)
    drafts = draft_tokens(logits, settings.temperature, key)
    return Plan(drafts, probability_of(logits[:, 0], drafts[:, 0]))


def verify(state: DecodeState, drafts: mx.array, positions: np.ndarray, token_threshold: float):
    flat = drafts.reshape(-1)
    logits = yield from request(state, flat, positions, state.cache.append(flat.size))
    accepted = next_token_probability(logits, flat).reshape(drafts.shape) > token_threshold
    accepted[:, 0] = True
    return np.array(drafts), np.array(accepted)


def infill_round(state: DecodeState, tokens: np.ndarray, tags: np.ndarray, positions: np.ndarray,
                 start: int, slot_size: int):
    rows = tokens.shape[0]
    placement = state.cache.rows(rows, slot_size, start)
    fed_positions = positions[:, start:]
    tagged = tags[:, start:] == 1
    masked = np.where(tagged, tokens[:, start:], state.mask_id).reshape(-1)
    draft_logits = yield from request(state, masked, fed_positions, placement)
    proposed = mx.argmax(draft_logits, axis=-1).reshape(rows, slot_size - start)
    fed = mx.where(mx.array(tagged), mx.array(tokens[:, start:]), proposed)
    verify_logits = yield from request(state, fed.reshape(-1), fed_positions, placement)
    p = next_token_probability(verify_logits.reshape(rows, slot_size - start, -1), fed)
    return np.array(fed), np.array(p)


def infill(state: DecodeState, drafts: np.ndarray, positions: np.ndarray, tags: np.ndarray,
           settings: DecodeSettings):
    S = settings.slot_size
    tokens, tags, positions = drafts.copy(), tags.copy(), positions.copy()
    start, rounds, eos_row = 0, 0, None
    while not tags.all() and rounds < S:
        rounds += 1
        tokens[:, start:], p = yield from infill_round(state, tokens, tags, positions, start, S)
        tags[:, start:] = update_tags(tags[:, start:], p, settings.token_threshold)
        eos_hits = np.isin(tokens[:, start:], list(state.eos_ids)) & (tags[:, start:] == 1)
        if eos_hits.any():
            eos_row = int(np.flatnonzero(eos_hits.any(axis=1))[0])
            tokens, tags, positions = tokens[: eos_row + 1], tags[: eos_row + 1], positions[: eos_row + 1]
            tags[eos_row] = 1
        newly = int(tags[:, start:].sum(axis=1).min())
        start += newly - 1 if not tags.all() else newly
    return tokens, rounds, eos_row


def iterate(state: DecodeState, pending: List[int], settings: DecodeSettings):
    S = settings.slot_size
    drafted = yield from plan(state, pending, settings)
    chosen = choose_slots(drafted.confidence.tolist(), settings.slot_threshold)
    starts = [pending[i] for i in chosen]
    positions = slot_positions(state, starts, S)
    drafts, accepted = yield from verify(state, drafted.drafts[mx.array(chosen)], positions,
                                         settings.token_threshold)
    verified = verified_slots(drafts, accepted, state.eos_ids, S)
    if verified is not None:
        n, eos_slot = verified
        return settle(state, pending, starts[:n], drafts[:n], positions[:n], eos_slot, "verify",
                      generation_tpf(S, n))
    tags = np.cumprod(accepted, axis=1).astype(np.int32)
    tokens, rounds, eos_row = yield from infill(state, drafts, positions, tags, settings)
    n = tokens.shape[0]
    return settle(state, pending, starts[:n], tokens, positions[:n], eos_row, "infill",
                  generation_tpf(S, len(chosen), rounds))


def plan_and_infill(state: DecodeState, settings: DecodeSettings, on_commit: Callable[[Commit], None]):
    """One sequence's plan-and-infill (``decode.generate_step``) as forward requests."""
    block, S = settings.block_length, settings.slot_size
    for b in range(settings.serial_num_blocks):
        pending = list(range(b * block, (b + 1) * block, S))
        while pending:
            on_commit((yield from iterate(state, pending, settings)))
        if state.finished:
            break


def left_to_right(state: DecodeState, settings: DecodeSettings, on_commit: Callable[[Commit], None]):
    """One sequence's left-to-right decoding (``generate_ar_ids``): ``gen_length`` tokens at most."""
    prompt = state.uncached
    state.uncached = []
    fed, start = prompt, 0
    for n in range(settings.gen_length):
        logits = yield from request(state, fed, range(start, start + len(fed)),
                                    state.cache.append(len(fed)), last=1)
        state.cache.commit(len(fed))
        key = None
        if settings.temperature > 0:
            state.key, key = mx.random.split(state.key)
        token = draft_tokens(logits[-1], settings.temperature, key).item()
        on_commit(Commit([n], [token], LEFT_TO_RIGHT, 0, 1.0))
        if token in state.eos_ids:
            state.finished = True
            return
        fed, start = [token], start + len(fed)


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


class PackedRows:
    """Several sequences' tokens packed one after another in a single row, without padding.

    The linear layers run once over all of them; each sequence's keys go to its own cache
    row and its queries attend to that row alone (separate attention calls, each the size
    a sequence decoded alone would make, with the same masks: ``"causal"`` for a run
    appended after the prefix). This is the CPU's layout: there attention costs in
    proportion to its scores and every padded token costs as much as a real one. Where a
    call costs more than its arithmetic (GPUs), one padded forward wins.
    """

    def __init__(self):
        self.rows = []  # (offset in the packed row, tokens, visible keys, mask, write start, write index)

    def add(self, r: Forward, offset: int):
        p, n = r.placement, len(r.positions)
        end = int(max(p.prefix_end.max(), p.own_end.max()))
        if p.appends:
            self.rows.append((offset, n, end, "causal" if n > 1 else None, int(p.writes[0]), None))
        else:
            key = np.arange(end)[None]
            visible = (key < p.prefix_end[:, None]) | ((key >= p.own_start[:, None]) & (key < p.own_end[:, None]))
            self.rows.append((offset, n, end, mx.array(visible)[None, None], None, mx.array(p.writes)))

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
        self.cache = BatchCache(len(model.layers), args.num_key_value_heads, args.head_dim, dtype)
        self.active: List[Generation] = []
        self.forwards = 0
        self.bucket = key_bucket()
        # The CPU packs the sequences in one row; devices where calls cost more than arithmetic pad.
        self.packed = mx.default_device() == mx.cpu

    def add(self, prompt_ids: Sequence[int], settings: DecodeSettings, *, decoder: str = PLAN_AND_INFILL,
            mask_id: Optional[int] = None, eos_token_id: Union[None, int, Iterable[int]] = None,
            on_commit: Optional[Callable[[Generation, Commit], None]] = None) -> Generation:
        """Validate one request and put it in the batch (it takes part from the next step on).

        Raises ``RefusionError`` for bad knobs or prompts, as ``generate_ids`` does.
        """
        if decoder not in DECODERS:
            raise RefusionError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")
        if decoder == LEFT_TO_RIGHT:
            state, capacity = self._left_to_right_state(prompt_ids, settings, eos_token_id)
        else:
            state = start_state(self.model, prompt_ids, settings, mask_id, eos_token_id)
            capacity = state.prompt_length + settings.padded_length
        state.cache = SequenceCache(capacity)
        seq = Generation(state, settings, decoder, on_commit, started=time.perf_counter())
        decode = left_to_right if decoder == LEFT_TO_RIGHT else plan_and_infill
        seq.steps = decode(state, settings, seq._committed)
        seq.pending = next(seq.steps)
        rows = list(range(len(self.active)))
        self.cache.reshape(rows, len(rows) + 1, -(-capacity // self.bucket) * self.bucket)
        self.active.append(seq)
        return seq

    def _left_to_right_state(self, prompt_ids, settings: DecodeSettings, eos_token_id):
        """Checks and state of ``generate_ar_ids`` (gen_length is max_tokens; no slots)."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise RefusionError("the prompt is empty")
        if settings.gen_length <= 0:
            raise RefusionError(f"max_tokens must be positive, got {settings.gen_length}")
        if settings.temperature < 0:
            raise RefusionError(f"temperature must be >= 0, got {settings.temperature}")
        total = len(prompt_ids) + settings.gen_length
        limit = self.model.args.max_position_embeddings
        if total > limit:
            raise RefusionError(f"prompt + max_tokens = {total} exceeds max_position_embeddings ({limit})")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.model.args.vocab_size:
            raise RefusionError(f"prompt token ids must be in [0, {self.model.args.vocab_size})")
        key = None
        if settings.temperature > 0:
            seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")
            key = mx.random.key(seed)
        state = DecodeState(cache=None, prompt_length=len(prompt_ids), uncached=prompt_ids, mask_id=-1,
                            eos_ids=resolve_eos(eos_token_id, self.model), gen_length=settings.gen_length,
                            key=key)
        return state, total

    def cancel(self, seq: Generation):
        """Drop a sequence before the next step (its client went away, or it has what it needs)."""
        seq.cancelled = True

    def step(self) -> List[Generation]:
        """One batched forward for every active sequence; returns the sequences that left the batch."""
        left = [s for s in self.active if s.cancelled]
        self._drop(left)
        if not self.active:
            return left
        logits = self._forward([s.pending for s in self.active])
        mx.eval(logits)
        for i, seq in enumerate(self.active):
            try:
                seq.pending = seq.steps.send(logits[i])
            except StopIteration:
                seq.done = True
                self._finish(seq)
                left.append(seq)
        self._drop([s for s in self.active if s.done])
        return left

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

    def _forward(self, requests: List[Forward]) -> List[mx.array]:
        """One forward for every request; each request's logits (its ``last`` tokens)."""
        self.forwards += 1
        if len(requests) == 1 and requests[0].placement.appends and self.bucket == 1:
            return [self._forward_alone(requests[0])[0]]
        if self.packed:
            return self._forward_packed(requests)
        return self._forward_padded(requests)

    def _forward_packed(self, requests: List[Forward]) -> List[mx.array]:
        """The requests one after another in a single row (``PackedRows``)."""
        rows, tokens, positions, offset = PackedRows(), [], [], 0
        for r in requests:
            rows.add(r, offset)
            fed = r.tokens if isinstance(r.tokens, mx.array) else mx.array(np.asarray(r.tokens, np.int32))
            tokens.append(fed.astype(mx.int32))
            positions.append(np.asarray(r.positions, np.int32))
            offset += len(r.positions)
        view = BatchView(None, 0, None, attend=rows)
        logits = self.model(mx.concatenate(tokens)[None], mx.array(np.concatenate(positions)[None]),
                            self.cache, view)[0]
        return [logits[o + n - r.last : o + n] for (o, n, *_), r in zip(rows.rows, requests)]

    def _forward_padded(self, requests: List[Forward]) -> List[mx.array]:
        """The requests padded (on the left, so every row's wanted logits are its last) into rows."""
        B = len(requests)
        width = max(len(r.positions) for r in requests)
        last = max(r.last for r in requests)
        scratch = self.cache.capacity - 1
        positions = np.zeros((B, width), dtype=np.int32)
        writes = np.full((B, width), scratch, dtype=np.int32)
        # Padding queries see entry 0 only (never an empty row, which would be NaN).
        prefix_end = np.ones((B, width), dtype=np.int32)
        own_start = np.zeros((B, width), dtype=np.int32)
        own_end = np.zeros((B, width), dtype=np.int32)
        rows = []
        for b, r in enumerate(requests):
            n = len(r.positions)
            pad = width - n
            tokens = r.tokens if isinstance(r.tokens, mx.array) else mx.array(np.asarray(r.tokens, np.int32))
            rows.append(mx.concatenate([mx.zeros((pad,), mx.int32), tokens.astype(mx.int32)]) if pad else
                        tokens.astype(mx.int32))
            positions[b, pad:] = r.positions
            p = r.placement
            writes[b, pad:], prefix_end[b, pad:] = p.writes, p.prefix_end
            own_start[b, pad:], own_end[b, pad:] = p.own_start, p.own_end
        end = int(max(prefix_end.max(), own_end.max()))
        # Key lengths in a few fixed sizes where attention plans are built per length (CUDA).
        end = min(-(-end // self.bucket) * self.bucket, self.cache.capacity)
        key = mx.arange(end)[None, None]
        pe, os_, oe = (mx.array(a)[..., None] for a in (prefix_end, own_start, own_end))
        mask = (key < pe) | ((key >= os_) & (key < oe))
        if self.bucket > 1 and width % QUERY_BUCKET:  # query lengths in fixed sizes too (CUDA)
            mask = mx.pad(mask, [(0, 0), (0, QUERY_BUCKET - width % QUERY_BUCKET), (0, 0)], constant_values=True)
        view = BatchView(mx.array(writes), end, mask[:, None])
        logits = self.model(mx.stack(rows), mx.array(positions), self.cache, view, last=last)
        return [logits[b, last - r.last:] for b, r in enumerate(requests)]


    def _forward_alone(self, r: Forward) -> mx.array:
        """One sequence appending: contiguous writes and a causal mask, exactly as ``decode.forward``."""
        n = len(r.positions)
        start = int(r.placement.writes[0])
        tokens = r.tokens if isinstance(r.tokens, mx.array) else mx.array(np.asarray(r.tokens, np.int32))
        view = BatchView(None, start + n, "causal" if n > 1 else None, start)
        positions = np.asarray(r.positions, np.int32)
        # A contiguous run takes RoPE's fused path, as in decode.forward.
        positions = int(positions[0]) if (np.diff(positions) == 1).all() else mx.array(positions[None])
        return self.model(tokens.astype(mx.int32).reshape(1, -1), positions, self.cache, view, last=r.last)


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
        if decoder == LEFT_TO_RIGHT:
            batch._left_to_right_state(prompt, s, eos_token_id)
        elif decoder == PLAN_AND_INFILL:
            start_state(model, prompt, s, mask_id, eos_token_id)
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
