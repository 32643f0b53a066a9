"""A generation's transcript: its commits, in the order they came, read in position order.

Slots commit out of order, so what a reader wants is derived here, in one place: the
tokens in position order (``tokens``: up to and including the first EOS, nothing at or past
the requested length, which is padding), the gap-free start that can be streamed
(``prefix``), and the final ``GenerationResult``. Every decoder (plan-and-infill alone or
batched, left to right) and every front end (``generate``, ``stream_generate``, the batch,
the server) reads its output through a ``Transcript``.
"""

import bisect
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import mlx.core as mx


@dataclass
class Commit:
    """Tokens made final in one iteration, with their positions (in generation, 0-based)."""

    positions: List[int]
    tokens: List[int]
    kind: str  # "verify" (accepted by the global verification), "infill" or "left-to-right"
    slots: int  # slots committed
    tpf: float  # upstream's tokens-per-forward credit for this iteration


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
        self._order: List[int] = []  # placed positions, sorted
        self.prefix_length = 0

    def add(self, commit: Commit) -> List[int]:
        """Take one commit; returns the positions it filled inside the limit."""
        self.commits.append(commit)
        filled = []
        for position, token in zip(commit.positions, commit.tokens):
            if self.limit is None or position < self.limit:
                self.placed[position] = token
                bisect.insort(self._order, position)
                filled.append(position)
        while self.prefix_length in self.placed:
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

    @property
    def ended(self) -> bool:
        """The gap-free start reaches an EOS or the limit: nothing later can change the output."""
        if self.limit is not None and self.prefix_length >= self.limit:
            return True
        return any(self.placed[p] in self.eos_ids for p in range(self.prefix_length))

    def result(self, model_calls: int, tokens_fed: int, wall_time: float, cached_tokens: int = 0,
               tpf: Optional[float] = None) -> GenerationResult:
        """The final result; ``tpf`` defaults to the mean of the commits' upstream credits."""
        if tpf is None:
            tpf = sum(c.tpf for c in self.commits) / max(len(self.commits), 1)
        return GenerationResult(
            tokens=self.tokens(), tpf=tpf, model_calls=model_calls, tokens_fed=tokens_fed,
            wall_time=wall_time, peak_memory=mx.get_peak_memory() / 1e9, iterations=len(self.commits),
            commits=list(self.commits), cached_tokens=cached_tokens)
