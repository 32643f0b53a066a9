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
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx

from .tokenizer_utils import byte_piece_test


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


class TextReader:
    """The text of a growing list of token ids, as a whole decode reads it, at the cost of decoding
    a short tail per token instead of every id again.

    Invariants, after each ``add``, for decoders whose text past a point where it ends in a whole
    character depends on at most ``CONTEXT`` characters before that point (byte-level BPE,
    SentencePiece with or without Hugging Face's byte fallback, WordPiece with its space clean-up:
    tests/test_transcript.py checks each against whole decodes): ``text == decode(ids)``; for
    every k in 0..len(ids), ``lengths[k] == len(decode(ids[:k]))`` and
    ``reached[k] == max(len(decode(ids[:j]).rstrip(U+FFFD)) for j <= k)`` (it never falls, though a
    text can: a byte-fallback run that goes on with half a character turns into U+FFFDs);
    ``_stable_text == decode(ids[:_stable])`` and ``text`` starts with it; ``_context <= _stable``,
    ``_context_text == decode(ids[_context:_stable])``.

    How: decoding depends on a little context (the leading space SentencePiece drops at the start
    of a text, a character whose bytes are spread over tokens, spaces cleaned up before
    punctuation), so the ids past ``_stable`` are decoded together with the ids from ``_context``,
    a point at least ``CONTEXT`` characters earlier, and the context's own text is dropped. Both
    points are places where the text ended in a whole character (no U+FFFD at its end). A window
    whose text does not start with its context's text (the new ids changed text before
    ``_stable``) is read by a whole decode, and reading starts over from there. A point right after
    a byte-fallback piece (``is_byte_piece``: SentencePiece's ``<0xNN>``) is never used: decoders
    that read a run of such pieces as one (Hugging Face's ByteFallback, SentencePiece's own) may
    turn a whole character before it into U+FFFD when the run goes on with half a character, and
    every such restart would begin again at the first id. Byte-level BPE joins bytes across ids
    and never does that, so its pieces of a character do not hold reading back (where the
    tokenizer cannot name its ids, any id that alone decodes to U+FFFD is taken for a piece).
    Reading is linear in the ids except inside a run of byte-fallback pieces or of ids that
    decode to nothing (skipped special tokens): the window then spans the run.
    """

    CONTEXT = 8  # characters; longer than any space clean-up pattern (" n't")

    def __init__(self, decode, is_byte_piece=None):
        self.decode = decode  # ids -> text
        self.is_byte_piece = is_byte_piece or (lambda token: "\ufffd" in decode([token]))
        self.ids: List[int] = []
        self.text = ""
        self.lengths, self.reached = [0], [0]
        self._part = {}  # id -> is_byte_piece(id), asked once
        self._restart()

    def _restart(self):
        self._stable, self._stable_text = 0, ""
        self._context, self._context_text = 0, ""
        self._marks = deque([(0, 0)])  # (ids, characters) at points where the text ended in a whole character

    def add(self, token: int) -> int:
        """Read one more id; returns how many leading characters of ``text`` it left as they were."""
        self.ids.append(token)
        window = self.decode(self.ids[self._context:])
        if window.startswith(self._context_text):
            kept = len(self._stable_text)
            self.text = self._stable_text + window[len(self._context_text):]
        else:
            kept = 0
            self.text = self.decode(self.ids)
            self._restart()
        self.lengths.append(len(self.text))
        self.reached.append(max(self.reached[-1], len(self.text.rstrip("\ufffd"))))
        if not self.text.endswith("\ufffd") and not self._is_part(token):
            self._settle()
        return kept

    def _is_part(self, token: int) -> bool:
        if token not in self._part:
            self._part[token] = bool(self.is_byte_piece(token))
        return self._part[token]

    def _settle(self):
        """The text ends in a whole character: later ids are read after this point, with a context
        that reaches ``CONTEXT`` characters back from it."""
        self._stable, self._stable_text = len(self.ids), self.text
        self._marks.append((self._stable, len(self.text)))
        while len(self._marks) > 1 and len(self.text) - self._marks[1][1] >= self.CONTEXT:
            self._marks.popleft()
        self._context = self._marks[0][0]
        self._context_text = self.decode(self.ids[self._context:self._stable])


class TextTranscript(Transcript):
    """A transcript read as text, as a client gets it: the gap-free start decoded (special tokens
    skipped), cut at the first EOS, at ``limit`` tokens and before the first stop string.

    Invariants: ``text`` only grows until ``finish_reason`` is set ("stop": an EOS or a stop
    string; "length": the limit, or ``end`` with neither), and never changes after; commits that
    arrive after that are ignored (they were under way when the answer was complete). ``text`` is
    what decoding the whole gap-free start (up to its first EOS) and cutting it gives, but each
    position is decoded as it joins the gap-free start (``reader``: a few tokens' window each),
    and stop strings are looked for only where the text changed: reading an answer is linear in
    its length.
    """

    def __init__(self, eos_ids: Iterable[int], limit: Optional[int], tokenizer, stops: Sequence[str] = ()):
        super().__init__(eos_ids, limit)
        self.tokenizer, self.stops = tokenizer, list(stops)
        # the gap-free start's tokens before its first EOS
        self.reader = TextReader(self.decode, byte_piece_test(tokenizer))
        self.text = ""
        self.cut = False  # a stop string cut the text
        self.finish_reason: Optional[str] = None
        self._decoded = 0  # length of the gap-free start ``text`` was decoded from (an EOS included)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, commit: Commit) -> List[int]:
        if self.finished:
            return []
        grown_from = self.prefix_length
        filled = super().add(commit)
        if self.prefix_length != grown_from:
            self._read(grown_from)
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

    def _read(self, start: int):
        """Read the gap-free start's new positions from ``start``: up to the first EOS, then the stops."""
        kept = len(self.reader.text)  # leading characters no new token changed: they hold no stop string
        for position in range(start, self.prefix_length):
            token = self.placed[position]
            self._decoded = position + 1
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
            kept = min(kept, self.reader.add(token))
        text = self.reader.text
        for stop in self.stops:  # one after another, each in what the ones before left, as always
            at = text.find(stop, max(0, kept - len(stop) + 1) if stop else 0)
            if at >= 0:
                text, self.cut = text[:at], True
                self.finish_reason = "stop"
        self.text = text

    def offset(self, position: int) -> int:
        """Characters of ``text`` before gap-free position ``position``: the text of the tokens
        before it, no longer than ``text``."""
        lengths = self.reader.lengths
        return min(lengths[min(position, len(lengths) - 1)], len(self.text))

    def covering(self, length: int) -> int:
        """The fewest gap-free tokens whose text reaches ``length`` characters of ``text`` (a half
        character at the end does not count), or all of them; a binary search over the lengths the
        text reached."""
        return bisect.bisect_left(self.reader.reached, length, 0, len(self.reader.ids))

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
