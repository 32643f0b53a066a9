"""What a decoding step asks of whoever runs it, and what it gets back.

The decoders' steps (``decode.plan``/``verify``/``infill``, ``autoregressive.left_to_right``)
are generators. ``request`` yields a ``Forward``: tokens, RoPE positions, a cache view,
and the probabilities the step will compare with its thresholds (``probe``); the step is
sent ``Logits`` back. ``to_host`` yields a ``Sync`` before a step reads lazy results on
the host. ``decode.generate_step`` serves one sequence's requests with ``forward``;
``scheduler.Scheduler`` serves many sequences' at once, its logits split by ``answers``, which
computes every step's argmax and probes in one go.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .kv import CacheView, SlotCache
from .sampling import probability_of


@dataclass
class Forward:
    """A forward a step needs: flat tokens (host or lazy device array) at RoPE ``positions``,
    written and attending where the cache ``view`` says; logits wanted for the ``last`` tokens.

    ``probe`` = (rows, tokens) asks for the probability of ``tokens[j]`` under the logits of
    wanted row ``rows[j]`` (tokens None: each row's own argmax); whoever runs the forward
    computes every step's probes at once.
    """

    tokens: Union[Sequence[int], np.ndarray, mx.array]
    positions: np.ndarray
    view: CacheView
    last: Optional[int] = None  # None: every token's
    probe: Optional[tuple] = None

    @property
    def size(self) -> int:
        return len(self.positions)

    @property
    def wanted(self) -> int:
        return self.last or self.size


@dataclass
class Logits:
    """A forward's answer to one step (lazy arrays)."""

    logits: mx.array  # (wanted tokens, vocabulary)
    best: mx.array  # each one's argmax
    probability: Optional[mx.array] = None  # of the probe's tokens


@dataclass
class Sync:
    """Lazy results a step is about to read on the host; a batch evaluates everyone's together.
    ``ahead``: lazy results the step will read later, queued (``mx.async_eval``) before the wait,
    so that the device computes them while the host works (a left-to-right step's next token)."""

    arrays: tuple
    ahead: tuple = ()


def request(state, tokens, positions, view: CacheView, last: Optional[int] = None,
            probe: Optional[tuple] = None):
    """Ask for a forward (a generator step: ``answer = yield from request(...)``); gets ``Logits``.
    The forward is counted in ``state`` (a ``state.DecodeState``) once it has been run."""
    if isinstance(positions, range):  # a run (every left-to-right step): np.asarray would walk it item by item
        positions = np.arange(positions.start, positions.stop, positions.step, dtype=np.int32)
    else:
        positions = np.asarray(positions, dtype=np.int32).reshape(-1)
    state.cache.record(view, positions)
    answer = yield Forward(tokens, positions, view, last, probe)
    state.model_calls += 1
    state.tokens_fed += len(positions)
    return answer


def to_host(*arrays: mx.array, ahead: tuple = ()):
    """The arrays as numpy arrays, after one synchronisation shared with the rest of a batch
    (``ahead`` queued first: ``Sync``)."""
    yield Sync(arrays, ahead)
    return [np.array(a) for a in arrays]


def sync(*needs: Sync):
    """Queue what the steps read later (their ``ahead``), then wait for what they read now."""
    ahead = [a for need in needs for a in need.ahead]
    if ahead:
        mx.async_eval(*ahead)
    mx.eval(*[a for need in needs for a in need.arrays])


def previous_rows(n: int, stride: int = 1) -> np.ndarray:
    """For n tokens fed left to right, ``stride`` rows per offset: the row whose logits predict
    each one (the one before it in its row; the first ones are read under their own)."""
    rows = np.arange(n)
    return np.where(rows >= stride, rows - stride, rows)


def token_array(tokens) -> mx.array:
    """Flat int32 device tokens from a host list/array or a lazy device array."""
    if isinstance(tokens, mx.array):
        return tokens.reshape(-1).astype(mx.int32)
    return mx.array(np.asarray(tokens, dtype=np.int32).reshape(-1))


def model_inputs(tokens) -> mx.array:
    """One sequence's tokens as the model's (1, n) input. A lazy device array (a drawn token, an
    infill's verify pass) is only reshaped, whatever its integer dtype (argmax's uint32): any
    integer indexes the embedding, and every extra graph node is paid per token where the host
    bounds decoding (a left-to-right step)."""
    if isinstance(tokens, mx.array):
        return tokens.reshape(1, -1)
    return mx.array(np.asarray(tokens, dtype=np.int32).reshape(1, -1))


def answers(logits: mx.array, needs: Sequence[Forward]) -> List[Logits]:
    """Each step's ``Logits`` from the wanted logits of ``needs``, one after another in ``logits``:
    the argmax and the probes' probabilities are computed once for all of them."""
    best = mx.argmax(logits, axis=-1)
    if len(needs) == 1 and needs[0].probe is None:  # one step, nothing probed: no splitting (every step)
        return [Logits(logits, best)]
    bounds = np.cumsum([0] + [need.wanted for need in needs])
    probed = [(lo, need.probe) for lo, need in zip(bounds, needs) if need.probe is not None]
    probability = None
    if probed:
        rows = np.concatenate([lo + np.asarray(r) for lo, (r, _) in probed])
        sizes = np.cumsum([0] + [len(r) for _, (r, _) in probed])
        if all(not isinstance(t, mx.array) for _, (_, t) in probed):
            tokens = mx.array(np.concatenate([np.full(len(r), -1) if t is None else np.asarray(t).reshape(-1)
                                              for _, (r, t) in probed]).astype(np.int32))
        else:
            tokens = mx.concatenate([mx.full((len(r),), -1, mx.int32) if t is None else token_array(t)
                                     for _, (r, t) in probed])
        rows = mx.array(rows)
        if any(t is None for _, (_, t) in probed):  # -1: the row's own argmax
            tokens = mx.where(tokens < 0, best[rows], tokens)
        probability = probability_of(logits[rows], tokens)
    replies, k = [], 0
    for need, lo, hi in zip(needs, bounds[:-1], bounds[1:]):
        p = None
        if need.probe is not None:
            p, k = probability[sizes[k] : sizes[k + 1]], k + 1
        replies.append(Logits(logits[lo:hi], best[lo:hi], p))
    return replies


def rope_positions(positions: np.ndarray):
    """An int for a contiguous run (RoPE's fused path: the prompt, a slot, neighbouring slots),
    else a (1, n) array."""
    contiguous = len(positions) == 1 or (np.diff(positions) == 1).all()
    return int(positions[0]) if contiguous else mx.array(positions[None])


def forward(model, cache: SlotCache, need: Forward) -> Logits:
    """Run one ``Forward`` on ``model`` with one sequence's cache; its (lazy) ``Logits``."""
    # squeeze, not [0]: an integer index is a gather, a copy of the logits on every forward.
    logits = model(model_inputs(need.tokens), rope_positions(need.positions), cache, need.view,
                   last=need.last).squeeze(0)
    return answers(logits, [need])[0]
