"""Left-to-right decoding of the same model: the baseline every speed claim is measured against.

One token per forward with a KV cache, greedy or sampled; the next step is queued
before the host looks at the current token (as mlx-lm does), so the baseline is
not slowed down by host round trips.
"""

import os
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import mlx.core as mx

from .cache import SlotCache
from .decode import Commit, DecodeSettings, DecodeState, GenerationResult, resolve_eos
from .forwards import request, to_host
from .errors import RefusionError
from .sampling import draft_tokens
from .validation import check_eos, check_float, check_int, check_seed, check_token_ids


def start_ar_state(model, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                   seed: Optional[int] = None, eos_token_id: Union[None, int, Iterable[int]] = None) -> DecodeState:
    """Validate a left-to-right request and set up its cache (room for prompt + max_tokens) and key."""
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
    key = None
    if temperature > 0:
        key = mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return DecodeState(cache=SlotCache(len(model.layers), total), prompt_length=len(prompt_ids),
                       uncached=prompt_ids, mask_id=-1, eos_ids=resolve_eos(eos_token_id, model),
                       gen_length=max_tokens, key=key)


def left_to_right(state: DecodeState, settings: DecodeSettings, on_commit: Callable[[Commit], None]):
    """Left-to-right decoding as steps (``forwards.Forward``/``forwards.Sync``), for ``batch.Batch``:
    at most ``settings.gen_length`` tokens, each handed to ``on_commit``. Alone, ``generate_ar_ids``
    is faster: it queues the next forward before reading a token, which a step cannot."""
    fed, start = state.uncached, 0
    state.uncached = []
    for n in range(settings.gen_length):
        answer = yield from request(state, fed, range(start, start + len(fed)), state.cache.append(len(fed)),
                                    last=1)
        state.cache.commit(len(fed))
        if settings.temperature > 0:
            state.key, key = mx.random.split(state.key)
            choice = draft_tokens(answer.logits[-1], settings.temperature, key, settings.top_p, settings.top_k,
                                  settings.min_p)
        else:
            choice = answer.best[-1]
        (token,) = yield from to_host(choice)
        token = int(token)
        on_commit(Commit([n], [token], "left-to-right", 0, 1.0))
        if token in state.eos_ids:
            state.finished = True
            return
        fed, start = [token], start + len(fed)


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
    state = start_ar_state(model, prompt_ids, max_tokens, temperature, seed, eos_token_id)
    cache, prompt_ids = state.cache, state.uncached
    calls = 0

    def step(tokens, start):
        nonlocal calls
        calls += 1
        view = cache.append(tokens.size)
        logits = model(tokens.reshape(1, -1), start, cache, view, last=1)[0, -1]
        cache.commit(tokens.size)
        sub = None
        if temperature > 0:
            state.key, sub = mx.random.split(state.key)
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
        if value in state.eos_ids:
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
