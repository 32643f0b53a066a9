"""Choosing tokens from logits, and the probabilities the decoder compares with thresholds.

Only an argmax and the probability of one token per row are ever needed, so no
full-vocabulary softmax is materialised: p(t) = exp(logit[t] - logsumexp(logits)). Log-probabilities
for a client (``token_logprobs``, ``Scores``) are computed only when a request asks for them.
"""

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np


def draft_tokens(logits: mx.array, temperature: float = 0.0, key: Optional[mx.array] = None,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """Greedy tokens at temperature 0, else Gumbel-max samples (upstream's sampler, in log space)
    among the tokens ``truncate`` keeps (all of them with its defaults: then upstream's exactly)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = truncate(logits.astype(mx.float32), top_p, top_k, min_p)
    # Upstream: argmax(exp(l) / (-log u)^T). Same argmax as l - T*log(-log u), without overflow.
    u = mx.random.uniform(low=1e-20, high=1.0, shape=logits.shape, key=key)
    noise = mx.log(-mx.log(u))
    return mx.argmax(logits - temperature * noise, axis=-1)


def truncate(logits: mx.array, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """``logits`` with the tokens sampling may not pick set to -inf, judged on the distribution
    before temperature (as mlx-lm's samplers): outside the ``top_k`` most likely (0: no limit),
    below ``min_p`` times the most likely one's probability, outside the smallest set of most
    likely tokens whose probabilities add up to ``top_p``; tokens tied with the last one kept stay
    too. The most likely token is always kept. With the defaults nothing is computed."""
    if top_k <= 0 and min_p <= 0 and top_p >= 1:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    floor = mx.full(logits.shape[:-1] + (1,), -mx.inf)  # the least log-probability still kept, per row
    if 0 < top_k < logits.shape[-1]:
        floor = mx.maximum(floor, mx.topk(logprobs, top_k, axis=-1).min(axis=-1, keepdims=True))
    if min_p > 0:
        floor = mx.maximum(floor, logprobs.max(axis=-1, keepdims=True) + math.log(min_p))
    if top_p < 1:
        ordered = -mx.sort(-logprobs, axis=-1)  # descending
        before = mx.cumsum(mx.exp(ordered), axis=-1) - mx.exp(ordered)  # mass of the more likely tokens
        # The last token kept is the first one at which the mass before it reaches top_p, less one.
        kept = mx.maximum(mx.sum(before < top_p, axis=-1, keepdims=True), 1)
        floor = mx.maximum(floor, mx.take_along_axis(ordered, kept - 1, axis=-1))
    floor = mx.minimum(floor, logprobs.max(axis=-1, keepdims=True))
    return mx.where(logprobs >= floor, logits, -mx.inf)


def probability_of(logits: mx.array, tokens: mx.array) -> mx.array:
    """softmax(logits)[..., tokens], computed in float32."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return mx.exp(picked - mx.logsumexp(logits, axis=-1))


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


def token_logprobs(logits: mx.array, tokens: mx.array, top: int = 0) -> list:
    """Lazy arrays: log_softmax(logits)[..., tokens] in float32 (the raw distribution: before
    temperature and truncation), then, when ``top`` > 0, the ``top`` most likely ids and their
    logprobs (unordered; ``Scores`` orders them on the host)."""
    logits = logits.astype(mx.float32)
    norm = mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logits, tokens.astype(mx.int32)[..., None], axis=-1) - norm
    out = [chosen[..., 0]]
    if top > 0:
        ids = mx.argpartition(-logits, top - 1, axis=-1)[..., :top]
        out += [ids, mx.take_along_axis(logits, ids, axis=-1) - norm]
    return out


@dataclass
class Scores:
    """Host arrays for tokens laid out as some shape: each one's logprob (shape) and its
    distribution's ``top`` most likely (ids, logprobs) (shape + (top,))."""

    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprob: np.ndarray

    @classmethod
    def from_host(cls, arrays) -> "Scores":
        """From ``token_logprobs``'s arrays, read on the host."""
        logprob = np.asarray(arrays[0], dtype=np.float32)
        if len(arrays) == 1:
            return cls(logprob, np.zeros(logprob.shape + (0,), np.int64), np.zeros(logprob.shape + (0,), np.float32))
        return cls(logprob, np.asarray(arrays[1]), np.asarray(arrays[2], dtype=np.float32))

    def __getitem__(self, index) -> "Scores":
        return Scores(self.logprob[index], self.top_ids[index], self.top_logprob[index])

    def reshape(self, *shape) -> "Scores":
        logprob = self.logprob.reshape(*shape)
        shape = logprob.shape + self.top_ids.shape[-1:]  # explicit: -1 is ambiguous with no alternatives
        return Scores(logprob, self.top_ids.reshape(shape), self.top_logprob.reshape(shape))

    def transpose(self) -> "Scores":
        """Rows and columns swapped (2-d layouts)."""
        return Scores(self.logprob.T, self.top_ids.transpose(1, 0, 2), self.top_logprob.transpose(1, 0, 2))

    def copy(self) -> "Scores":
        return Scores(self.logprob.copy(), self.top_ids.copy(), self.top_logprob.copy())

    def put(self, mask: np.ndarray, other: "Scores"):
        """Take ``other``'s where ``mask`` (same layout) is true."""
        self.logprob[mask] = other.logprob[mask]
        self.top_ids[mask] = other.top_ids[mask]
        self.top_logprob[mask] = other.top_logprob[mask]

    def lists(self, count: int) -> tuple:
        """(logprobs, top pairs most likely first) of the first ``count`` tokens in flat order."""
        flat = self.reshape(-1)
        pairs = []
        for ids, values in zip(flat.top_ids[:count].tolist(), flat.top_logprob[:count].tolist()):
            pairs.append(sorted(zip(ids, values), key=lambda pair: (-pair[1], pair[0])))
        return flat.logprob[:count].tolist(), pairs
