"""Left-to-right decoding of the same model: the baseline every speed claim is measured against.

One token per forward with a KV cache, greedy or sampled; the next step is queued
before the host looks at the current token (as mlx-lm does), so the baseline is
not slowed down by host round trips.
"""

import time
from typing import Callable, Iterable, Optional, Sequence, Union

import mlx.core as mx

from .decode import make_room, run_steps
from .state import DecodeState, bounded_cache, finish, new_state
from .settings import DecodeSettings
from .forwards import Sync, request, to_host
from .kv import PromptCache
from .transcript import Commit, GenerationResult, Transcript
from .errors import RefusionError
from .sampling import MAX_TOP_LOGPROBS, Scores, draft_tokens, token_logprobs
from .validation import check_int, check_seed, check_temperature, check_token_ids


def start_ar_state(model, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                   seed: Optional[int] = None, eos_token_id: Union[None, int, Iterable[int]] = None,
                   prompt_cache: Optional[PromptCache] = None) -> DecodeState:
    """Validate a left-to-right request and set up its cache (room for prompt + max_tokens, or the
    prompt cache's) and key."""
    max_tokens = check_int("max_tokens", max_tokens, 1)
    temperature, seed = check_temperature("temperature", temperature), check_seed("seed", seed)
    prompt_ids = check_token_ids("prompt_ids", prompt_ids)
    total = len(prompt_ids) + max_tokens
    if total > model.args.max_position_embeddings:
        raise RefusionError(
            f"prompt + max_tokens = {total} exceeds max_position_embeddings "
            f"({model.args.max_position_embeddings})"
        )
    return new_state(model, prompt_ids, max_tokens, max_tokens, 1, temperature, seed, eos_token_id, prompt_cache)


def left_to_right(state: DecodeState, settings: DecodeSettings, on_commit: Callable[[Commit], None]):
    """Left-to-right decoding as steps (``forwards.Forward``/``forwards.Sync``): at most
    ``settings.gen_length`` tokens, each handed to ``on_commit``. The one implementation:
    ``generate_ar_ids`` serves these steps alone (``decode.run_steps``), ``scheduler.Scheduler``
    in a batch.

    Pipelined as mlx-lm's ``generate_step``: forward n + 1 is fed token n as a lazy array and
    queued before token n is read on the host, so the device computes while the host commits and
    builds the next step. Hence, for k tokens: k forwards and prompt + k - 1 cache entries when
    the limit ends them (the last token is never fed); k + 1 forwards, all counted, and prompt + k
    entries (the EOS's included, a valid one: the history a prompt cache records) when an EOS
    before the limit does. With a bounded cache the step in flight ends (a ``Sync`` with nothing
    queued) before an eviction moves entries."""
    fed, start = [], state.prompt_length
    chosen = None  # (n, token, scores) of the last token drawn: lazy, not yet read
    for n in range(settings.gen_length):
        if chosen is not None and state.cache.must_evict(len(state.uncached) + len(fed)):
            # Wait for the step in flight: the eviction's moves then overwrite buffers nothing else holds,
            # instead of copying the whole cache beside the one that step still reads (on a GPU the
            # bounded peak varied with that race).
            yield Sync((fed,))
        yield from make_room(state, len(fed))
        if state.uncached:
            fed, start = state.uncached, state.fed_from
            state.uncached = []
        answer = yield from request(state, fed, range(start, start + len(fed)), state.cache.append(len(fed)),
                                    last=1)
        state.cache.commit(len(fed))
        drawn = (n, *draw(state, settings, answer.logits, answer.best))
        if chosen is not None and (yield from read(state, chosen, on_commit, ahead=(drawn[1], *drawn[2]))):
            return
        chosen, fed, start = drawn, drawn[1], start + len(fed)
    if chosen is not None:
        yield from read(state, chosen, on_commit)


def draw(state: DecodeState, settings: DecodeSettings, logits: mx.array, best: mx.array):
    """The next token as a lazy (1,) array (greedy: ``best``, else sampled with the sequence's key)
    from one token's (1, vocabulary) ``logits``, and, when asked, its logprob arrays
    (``token_logprobs``). Fed as it is to the next forward: no graph node is added per token."""
    if settings.temperature > 0:
        state.key, key = mx.random.split(state.key)
        choice = draft_tokens(logits, settings.temperature, key, settings.top_p, settings.top_k, settings.min_p)
    else:
        choice = best
    scored = [] if settings.logprobs is None else token_logprobs(logits, choice, settings.logprobs)
    return choice, tuple(scored)


def read(state: DecodeState, chosen, on_commit: Callable[[Commit], None], ahead: tuple = ()):
    """Read a drawn token on the host (``ahead`` queued first) and commit it; True at EOS."""
    n, choice, scored = chosen
    token, *scored = yield from to_host(choice, *scored, ahead=ahead)
    token = int(token[0])
    logprobs, top = Scores.from_host(scored).lists(1) if scored else (None, None)
    on_commit(Commit([n], [token], "left-to-right", 0, 1.0, logprobs, top))
    if token in state.eos_ids:
        state.finished = True
        return True
    return False


def generate_ar_ids(
    model,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: Optional[int] = None,
    eos_token_id: Union[None, int, Iterable[int]] = None,
    prompt_cache: Optional[PromptCache] = None,
    max_kv_size: Optional[int] = None,
    logprobs: Optional[int] = None,
) -> GenerationResult:
    """Generate up to ``max_tokens`` ids left to right; stops after the first EOS.

    ``prompt_cache``, ``max_kv_size`` and ``logprobs`` as for ``generate_ids`` (a token's logprob:
    log_softmax of the logits it was chosen from, before temperature). Runs
    ``left_to_right``'s steps for this sequence alone, the steps the scheduler runs in a batch.
    """
    if logprobs is not None:
        logprobs = check_int("logprobs", logprobs, 0, MAX_TOP_LOGPROBS)
    prompt_cache = bounded_cache(model, prompt_cache, max_kv_size)
    prompt_ids = check_token_ids("prompt_ids", prompt_ids)
    state = start_ar_state(model, prompt_ids, max_tokens, temperature, seed, eos_token_id, prompt_cache)
    settings = DecodeSettings(gen_length=max_tokens, temperature=temperature, seed=seed, logprobs=logprobs)
    transcript = Transcript(state.eos_ids, max_tokens)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    run_steps(model, state, left_to_right(state, settings, transcript.add))
    return finish(state, transcript, time.perf_counter() - tic, prompt_ids, prompt_cache, tpf=1.0)


def prefill_ids(model, prompt_ids: Sequence[int], prompt_cache: PromptCache) -> int:
    """Feed a prompt into ``prompt_cache`` without generating (``cache_prompt``); returns how many
    tokens were fed (those the cache did not hold)."""
    if not isinstance(prompt_cache, PromptCache):
        raise RefusionError("prompt_cache must come from make_prompt_cache")
    prompt_ids = check_token_ids("prompt_ids", prompt_ids)
    state = start_ar_state(model, prompt_ids, 1, prompt_cache=prompt_cache)
    run_steps(model, state, feed_prompt(state))
    prompt_cache.record(prompt_ids, {})
    return state.tokens_fed


def feed_prompt(state: DecodeState):
    """Steps that put every uncached prompt token in the cache (in chunks, if the cache is bounded)."""
    yield from make_room(state, 0)
    fed, start = state.uncached, state.fed_from
    yield from request(state, fed, range(start, start + len(fed)), state.cache.append(len(fed)), last=1)
    state.cache.commit(len(fed))
    state.uncached = []
