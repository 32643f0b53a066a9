"""Left-to-right decoding of the same model: the baseline every speed claim is measured against.

One token per forward with a KV cache, greedy or sampled; the next step is queued
before the host looks at the current token (as mlx-lm does), so the baseline is
not slowed down by host round trips.
"""

import os
import time
from typing import Iterable, Optional, Sequence, Union

import mlx.core as mx

from .cache import SlotCache
from .decode import GenerationResult, resolve_eos
from .errors import RefusionError
from .sampling import draft_tokens
from .validation import check_eos, check_float, check_int, check_seed, check_token_ids


def generate_ar_ids(
    model,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: Optional[int] = None,
    eos_token_id: Union[None, int, Iterable[int]] = None,
) -> GenerationResult:
    """Generate up to ``max_tokens`` ids left to right; stops after the first EOS."""
    prompt_ids = check_token_ids("prompt_ids", prompt_ids, model.args.vocab_size)
    if not prompt_ids:
        raise RefusionError("the prompt is empty")
    max_tokens = check_int("max_tokens", max_tokens, 1)
    temperature, seed = check_float("temperature", temperature, minimum=0.0), check_seed("seed", seed)
    eos_token_id = check_eos("eos_token_id", eos_token_id)
    total = len(prompt_ids) + max_tokens
    if total > model.args.max_position_embeddings:
        raise RefusionError(
            f"prompt + max_tokens = {total} exceeds max_position_embeddings "
            f"({model.args.max_position_embeddings})"
        )
    eos_ids = resolve_eos(eos_token_id, model)
    if temperature > 0:
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        key = mx.random.key(seed)
    cache = SlotCache(len(model.layers), total)
    calls = 0

    def step(tokens, start):
        nonlocal key, calls
        calls += 1
        view = cache.append(tokens.size)
        logits = model(tokens.reshape(1, -1), start, cache, view, last=1)[0, -1]
        cache.commit(tokens.size)
        sub = None
        if temperature > 0:
            key, sub = mx.random.split(key)
        return draft_tokens(logits, temperature, sub)

    mx.reset_peak_memory()
    tic = time.perf_counter()
    token = step(mx.array(prompt_ids), 0)
    mx.async_eval(token)
    generated = []
    for n in range(max_tokens):
        following = step(token, len(prompt_ids) + n) if n + 1 < max_tokens else None
        if following is not None:
            mx.async_eval(following)
        value = token.item()
        generated.append(value)
        if value in eos_ids:
            break
        token = following
    wall = time.perf_counter() - tic
    return GenerationResult(
        tokens=generated,
        tpf=1.0,
        model_calls=calls,
        tokens_fed=len(prompt_ids) + calls - 1,
        wall_time=wall,
        peak_memory=mx.get_peak_memory() / 1e9,
        iterations=len(generated),
    )
