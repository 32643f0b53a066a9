"""A generation's transcript: its commits, in the order they came, read in position order.

Slots commit out of order, so what a reader wants is derived here, in one place: the
tokens in position order (``tokens``: up to and including the first EOS, nothing at or past
the requested length, which is padding), the gap-free start that can be streamed
(``prefix``), and the final ``GenerationResult``. Every decoder (plan-and-infill alone or
batched, left to right) and every front end (``generate``, ``stream_generate``, the batch,
the server) reads its output through a ``Transcript``; ``TextTranscript`` reads it as text (the
gap-free start decoded, cut at the first EOS and the first stop string), which is what the
server returns and streams.
"""

import bisect
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx


@dataclass
class Commit:
    """Tokens made final in one iteration, with their positions (in generation, 0-based)."""

    positions: List[int]
    tokens: List[int]
    kind: str  # "verify" (accepted by the global verification), "infill" or "left-to-right"
    slots: int  # slots committed
    tpf: float  # upstream's tokens-per-forward credit for this iteration
    # Asked for only (``DecodeSettings.logprobs``): each token's log-probability under the
    # distribution it was drafted from (docs/decoding.md), and the most likely (token, logprob)
    # pairs of that distribution, most likely first.
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None


@dataclass
class GenerationResult:
    """Generated ids in position order (ending with the first EOS, if any) and what they cost."""

    tokens: List[int]
    tpf: float  # upstream's TPF (mean credit per iteration, padding not credited), for comparison with the paper
    model_calls: int
    tokens_fed: int
    wall_time: float  # seconds
    peak_memory: float  # GB, as reported by MLX
    iterations: int = 0
    commits: List[Commit] = field(default_factory=list, repr=False)
    cached_tokens: int = 0  # prompt tokens taken from a prompt cache instead of being fed

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Honest parallelism: generated tokens per model forward, every forward counted."""
        return len(self.tokens) / self.model_calls if self.model_calls else 0.0


class Transcript:
    """Commits of one generation of at most ``limit`` tokens, ended by any of ``eos_ids``.

    Invariants: ``placed`` maps each committed position below ``limit`` to its token (a position
    is committed once); ``prefix_length`` is the length of the run of placed positions from 0.
    """

    def __init__(self, eos_ids: Iterable[int], limit: Optional[int] = None):
        self.eos_ids = frozenset(eos_ids)
        self.limit = limit
        self.commits: List[Commit] = []
        self.placed: Dict[int, int] = {}
        self.scores: Dict[int, tuple] = {}  # position -> (logprob, top pairs), when commits carry them
        self._order: List[int] = []  # placed positions, sorted
        self.prefix_length = 0
        self.eos_in_prefix = False  # the gap-free start holds an EOS (kept as it grows: ``ended`` is read every step)

    def add(self, commit: Commit) -> List[int]:
        """Take one commit; returns the positions it filled inside the limit."""
        self.commits.append(commit)
        filled = []
        for i, (position, token) in enumerate(zip(commit.positions, commit.tokens)):
            if self.limit is None or position < self.limit:
                self.placed[position] = token
                if commit.logprobs is not None:
                    self.scores[position] = (commit.logprobs[i], commit.top_logprobs[i] if commit.top_logprobs else [])
                bisect.insort(self._order, position)
                filled.append(position)
        while self.prefix_length in self.placed:
            self.eos_in_prefix = self.eos_in_prefix or self.placed[self.prefix_length] in self.eos_ids
            self.prefix_length += 1
        return filled

    def _cut(self, tokens: List[int], with_eos: bool) -> List[int]:
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                return tokens[: i + 1] if with_eos else tokens[:i]
        return tokens

    def tokens(self, with_eos: bool = True) -> List[int]:
        """Every placed token in position order (holes skipped), cut at the first EOS."""
        return self._cut([self.placed[p] for p in self._order], with_eos)

    def prefix(self, with_eos: bool = False) -> List[int]:
        """The gap-free start: final, safe to stream; cut at the first EOS."""
        return self._cut([self.placed[p] for p in range(self.prefix_length)], with_eos)

    def prefix_scores(self, start: int, stop: int) -> List[tuple]:
        """(position, token, logprob, top pairs) of the gap-free start's positions in [start, stop)
        (commits made without logprobs: none)."""
        return [(p, self.placed[p], *self.scores[p]) for p in range(start, min(stop, self.prefix_length))
                if p in self.scores]

    @property
    def ended(self) -> bool:
        """The gap-free start reaches an EOS or the limit: nothing later can change the output."""
        return self.eos_in_prefix or (self.limit is not None and self.prefix_length >= self.limit)

    def result(self, model_calls: int, tokens_fed: int, wall_time: float, cached_tokens: int = 0,
               tpf: Optional[float] = None) -> GenerationResult:
        """The final result; ``tpf`` defaults to the mean of the commits' upstream credits."""
        if tpf is None:
            tpf = sum(c.tpf for c in self.commits) / max(len(self.commits), 1)
        return GenerationResult(
            tokens=self.tokens(), tpf=tpf, model_calls=model_calls, tokens_fed=tokens_fed,
            wall_time=wall_time, peak_memory=mx.get_peak_memory() / 1e9, iterations=len(self.commits),
            commits=list(self.commits), cached_tokens=cached_tokens)


def stop_overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with.

    Only the last len(stop)-1 characters of the text can take part, and only where stop[0]
    occurs in them; each candidate is one C-level comparison: a 200,000-character stop string
    costs what the answer's length does, never its own length squared.
    """
    if len(stop) < 2:
        return 0
    tail = text[-(len(stop) - 1):]
    start = tail.find(stop[0])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0


class TextTranscript(Transcript):
    """A transcript read as text, as a client gets it: the gap-free start decoded (special tokens
    skipped), cut at the first EOS, at ``limit`` tokens and before the first stop string.

    Invariants: ``text`` only grows until ``finish_reason`` is set ("stop": an EOS or a stop
    string; "length": the limit, or ``end`` with neither), and never changes after; commits that
    arrive after that are ignored (they were under way when the answer was complete).
    """

    def __init__(self, eos_ids: Iterable[int], limit: Optional[int], tokenizer, stops: Sequence[str] = ()):
        super().__init__(eos_ids, limit)
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.text = ""
        self.cut = False  # a stop string cut the text
        self.finish_reason: Optional[str] = None
        self._decoded = 0  # length of the gap-free start ``text`` was decoded from

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, commit: Commit) -> List[int]:
        if self.finished:
            return []
        grown_from = self.prefix_length
        filled = super().add(commit)
        if self.prefix_length != grown_from:  # the gap-free start grew: its text is read again
            tokens = self.prefix(with_eos=True)
            self._decoded = len(tokens)
            if self.eos_in_prefix:
                self.finish_reason = "stop"
            self._read(tokens)
        if self.finish_reason is None and self.ended:
            self.finish_reason = "length"
        return filled

    def end(self):
        """The generation is over: whatever ended it, the text is final."""
        if self.finish_reason is None:
            self.finish_reason = "length"

    def decode(self, ids: Sequence[int]) -> str:
        """The text of these ids: EOS and special tokens (chat markers) are not text."""
        return self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)

    def _read(self, tokens: List[int]):
        text = self.decode(tokens)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.cut = text[:at], True
                self.finish_reason = "stop"
        self.text = text

    def covering(self, length: int) -> int:
        """The fewest gap-free tokens whose text reaches ``length`` characters of ``text`` (a half
        character at the end does not count)."""
        tokens = self.prefix(with_eos=False)
        low, high = 0, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if len(self.decode(tokens[:mid]).rstrip("\ufffd")) >= length:
                high = mid
            else:
                low = mid + 1
        return low

    def returned_tokens(self) -> int:
        """Tokens the returned text is made of: every decoded one (an EOS included), or, when a stop
        string cut the text, the fewest whose text covers it (the stop string's are not counted)."""
        if not self.cut:
            return self._decoded
        return self.covering(len(self.text))

    def stable_text(self) -> str:
        """The part of ``text`` that can no longer change: all of it once finished; before, without
        a trailing half character or a tail that may turn out to start a stop string."""
        text = self.text
        if self.finished:
            return text
        text = text.rstrip("\ufffd")
        hold = max((stop_overlap(text, s) for s in self.stops), default=0)
        return text[: len(text) - hold]
