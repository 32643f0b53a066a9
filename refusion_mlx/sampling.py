"""Choosing tokens from logits, and the probabilities the decoder compares with thresholds.

Only an argmax and the probability of one token per row are ever needed, so no
full-vocabulary softmax is materialised: p(t) = exp(logit[t] - logsumexp(logits)).
"""

from typing import Optional

import mlx.core as mx


def draft_tokens(logits: mx.array, temperature: float = 0.0, key: Optional[mx.array] = None) -> mx.array:
    """Greedy tokens at temperature 0, else Gumbel-max samples (upstream's sampler, in log space)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    # Upstream: argmax(exp(l) / (-log u)^T). Same argmax as l - T*log(-log u), without overflow.
    u = mx.random.uniform(low=1e-20, high=1.0, shape=logits.shape, key=key)
    noise = mx.log(-mx.log(u))
    return mx.argmax(logits.astype(mx.float32) - temperature * noise, axis=-1)


def probability_of(logits: mx.array, tokens: mx.array) -> mx.array:
    """softmax(logits)[..., tokens], computed in float32."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return mx.exp(picked - mx.logsumexp(logits, axis=-1))
