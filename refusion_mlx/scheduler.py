"""The scheduler: which sequences decode together, step by step (continuous batching).

Each sequence's decoding is the single decoder's own step generator
(``decode.plan_and_infill`` or ``autoregressive.left_to_right``): it yields the ``Forward``
it needs and gets its logits back, then yields a ``Sync`` when it reads results on the host.
``Scheduler.step`` is the engine's one beat, in the shape of vLLM's ``EngineCore.step``:

1. schedule: drop the cancelled, admit waiting sequences while there is room;
2. execute: one forward for every active sequence's pending ``Forward`` (``executor.py``);
3. update: send each sequence its logits and run it on to its next forward, evaluating every
   ``Sync`` of the step together; finished sequences leave with their result.

Cancellation happens only at 1, so a sequence never leaves in the middle of a step. At
temperature 0 in float32 a sequence decodes to the same tokens as ``generate_ids`` /
``generate_ar_ids`` give it alone, whatever batch it shares; with a seed, sampling is the
same as well (each sequence keeps its own key).
"""

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Sequence, Union


from .autoregressive import left_to_right, start_ar_state
from .decode import plan_and_infill
from .state import start_state
from .state import DecodeState, finish
from .settings import DecodeSettings
from .errors import RefusionError
from .executor import Executor
from .forwards import Forward, Sync, answers, request, sync
from .kv import PromptCache, SlotLayout
from .kv.layout import SINK
from .transcript import Commit, GenerationResult, Transcript

PLAN_AND_INFILL = "plan-and-infill"
LEFT_TO_RIGHT = "left-to-right"
DECODERS = (PLAN_AND_INFILL, LEFT_TO_RIGHT)


class QueueFull(RefusionError):
    """The scheduler's waiting queue is full: try again later."""


@dataclass
class Generation:
    """One request's sequence: waiting, decoding, or done (``result``) or cancelled."""

    uid: int
    prompt_ids: List[int]
    state: DecodeState
    settings: DecodeSettings
    decoder: str
    transcript: Transcript
    on_commit: Optional[Callable[["Generation", Commit], None]] = None
    prompt_cache: Optional[PromptCache] = None  # takes the sequence's cache back when it ends
    steps: Optional[Iterator] = None
    pending: Optional[Forward] = None
    done: bool = False
    cancelled: bool = False
    finishing: bool = False  # finish at the next step, with what is committed (finish_early)
    result: Optional[GenerationResult] = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def commits(self) -> List[Commit]:
        return self.transcript.commits

    def _committed(self, commit: Commit):
        self.transcript.add(commit)
        if self.on_commit is not None:
            self.on_commit(self, commit)


class Scheduler:
    """Sequences decoded together: ``add`` any time, ``step`` runs one forward for all active ones.

    At most ``max_active`` sequences decode at once; up to ``max_waiting`` more wait (None:
    no limit), and ``add`` raises ``QueueFull`` beyond that. With ``prefill_step``, a joining
    sequence feeds its prompt at most that many tokens per step (``prefill_in_chunks``), so a
    long prompt never makes one step long for every other sequence.
    """

    def __init__(self, model, max_active: int = 32, max_waiting: Optional[int] = None,
                 prefill_step: Optional[int] = None):
        if max_active <= 0:
            raise RefusionError(f"max_batch_size must be positive, got {max_active}")
        if prefill_step is not None and prefill_step < 1:
            raise RefusionError(f"prefill_step must be positive, got {prefill_step}")
        self.prefill_step = prefill_step
        self.model = model
        self.executor = Executor(model)
        self.max_active, self.max_waiting = max_active, max_waiting
        self.active: List[Generation] = []
        self.waiting: Deque[Generation] = deque()
        self._uids = itertools.count()

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def start(self, prompt_ids, settings: DecodeSettings, decoder: str = PLAN_AND_INFILL, mask_id=None,
              eos_token_id=None, prompt_cache: Optional[PromptCache] = None) -> DecodeState:
        """The checked state of one request, as the single decoders make it."""
        if decoder == LEFT_TO_RIGHT:
            return start_ar_state(self.model, prompt_ids, settings.gen_length, settings.temperature,
                                  settings.seed, eos_token_id, prompt_cache)
        if decoder == PLAN_AND_INFILL:
            return start_state(self.model, prompt_ids, settings, mask_id, eos_token_id, prompt_cache)
        raise RefusionError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")

    def add(self, prompt_ids: Sequence[int], settings: DecodeSettings, *, decoder: str = PLAN_AND_INFILL,
            mask_id: Optional[int] = None, eos_token_id: Union[None, int, Iterable[int]] = None,
            on_commit: Optional[Callable[[Generation, Commit], None]] = None,
            prompt_cache: Optional[PromptCache] = None) -> Generation:
        """Validate one request and queue it; it decodes from the first step with room.

        Raises ``RefusionError`` for bad knobs or prompts, as ``generate_ids`` (or, for
        left-to-right, ``generate_ar_ids`` with max_tokens = gen_length) does, and ``QueueFull``
        when ``max_waiting`` sequences wait already. A ``prompt_cache`` is used by this request
        alone until it ends, and then holds its prompt and answer.
        """
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue is full ({self.max_waiting} requests waiting)")
        state = self.start(prompt_ids, settings, decoder, mask_id, eos_token_id, prompt_cache)
        seq = Generation(next(self._uids), list(prompt_ids), state, settings, decoder,
                         Transcript(state.eos_ids, state.gen_length), on_commit, prompt_cache)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Generation):
        """Drop a sequence at the next step (its client went away, or it has what it needs)."""
        seq.cancelled = True

    def finish_early(self, seq: Generation):
        """End a sequence at the next step with what it has committed (its reader needs no more):
        unlike ``cancel`` it gets a result, and its prompt cache holds its prompt and answer."""
        seq.finishing = True

    # --- one step: schedule, execute, update ---------------------------------------------------

    def step(self) -> List[Generation]:
        """One forward for every active sequence; returns the sequences that left (done or cancelled)."""
        left = self._schedule()
        if not self.active:
            return left
        needs = [s.pending for s in self.active]
        replies = list(zip(self.active, answers(self.executor.forward(needs), needs)))
        left += self._update(replies)
        return left

    def _schedule(self) -> List[Generation]:
        cancelled = [s for s in self.waiting if s.cancelled]
        if cancelled:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        gone = [s for s in self.active if s.cancelled]
        for seq in self.active:
            if seq.finishing and not seq.cancelled:
                self._finish(seq)
                gone.append(seq)
        self._leave(gone)
        while self.waiting and len(self.active) < self.max_active:
            self._admit(self.waiting.popleft())
        for row, seq in enumerate(self.active):
            self.executor.apply_moves(row, seq.state.cache)
        return cancelled + gone

    def _admit(self, seq: Generation):
        """Give the sequence a row of the batch's buffers (its prompt cache's entries, if any) and
        run it to its first forward."""
        state = seq.state
        kept = state.cache if seq.prompt_cache is not None else None
        state.cache = kept.clone() if kept is not None else SlotLayout(state.cache.limit)
        self.executor.add_row(len(self.active), state.cache.limit, kept)
        decode = left_to_right if seq.decoder == LEFT_TO_RIGHT else plan_and_infill
        seq.steps = decode(state, seq.settings, seq._committed)
        if self.prefill_step is not None:
            seq.steps = prefill_in_chunks(state, self.prefill_step, seq.steps)
        seq.started = time.perf_counter()
        seq.pending = next(seq.steps)
        self.active.append(seq)

    def _update(self, replies) -> List[Generation]:
        left = []
        while replies:
            syncs = []
            for seq, reply in replies:
                try:
                    need = seq.steps.send(reply)
                except StopIteration:
                    self._finish(seq)
                    left.append(seq)
                    continue
                if isinstance(need, Sync):
                    syncs.append((seq, need))
                else:
                    seq.pending = need
            if syncs:
                sync(*[need for _, need in syncs])
            replies = [(seq, None) for seq, _ in syncs]
        self._leave(left)
        return left

    def _finish(self, seq: Generation):
        seq.done = True
        if seq.prompt_cache is not None:
            self.executor.extract(self.active.index(seq), seq.state.cache, seq.prompt_cache.cache)
            seq.state.cache = seq.prompt_cache.cache
        tpf = 1.0 if seq.decoder == LEFT_TO_RIGHT else None
        seq.result = finish(seq.state, seq.transcript, time.perf_counter() - seq.started, seq.prompt_ids,
                            seq.prompt_cache, tpf)

    def _leave(self, gone: List[Generation]):
        if gone:
            keep = [i for i, s in enumerate(self.active) if s not in gone]
            self.active = [self.active[i] for i in keep]
            self.executor.keep_rows(keep)


def prefill_in_chunks(state: DecodeState, size: int, steps):
    """``steps`` (a decoder's), after feeding the prompt's uncached tokens in forwards of ``size``
    tokens, one per scheduler step, until at most ``size`` are left: those the decoder's first
    forward feeds along with its own. A bounded cache makes room before each chunk (as
    ``decode.make_room`` does), in chunks no larger than it can hold beside its first entries."""
    cache = state.cache
    if cache.max_size is not None:
        size = min(size, cache.max_size - SINK - 1)
    while len(state.uncached) > size:
        start = state.fed_from
        cache.evict_for(size)
        yield from request(state, state.uncached[:size], range(start, start + size), cache.append(size), last=1)
        cache.commit(size)
        state.uncached = state.uncached[size:]
    return (yield from steps)
