"""The left-to-right baseline against a naive greedy loop that recomputes everything."""

import mlx.core as mx
import numpy as np
import pytest

from refusion_mlx import RefusionError, generate_ar_ids


def naive_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.array(model(mx.array([seq]))[0, -1]).argmax()))
    return seq[len(prompt):]


def test_greedy_matches_recomputing_everything(tiny_model):
    prompt = [7, 8, 9, 10]
    r = generate_ar_ids(tiny_model, prompt, max_tokens=20, eos_token_id=[])
    assert r.tokens == naive_greedy(tiny_model, prompt, 20)
    assert r.model_calls == 20 and r.tokens_per_call == 1.0


def test_stops_after_eos(tiny_model):
    """The forward fed the EOS was queued before the EOS was read: it is counted, and its entry is
    the cache's (prompt + answer, as a prompt cache's history says); at the limit the last token is
    never fed."""
    from refusion_mlx import make_prompt_cache

    prompt = [7, 8, 9, 10]
    free = naive_greedy(tiny_model, prompt, 12)
    eos = free[5]
    cache = make_prompt_cache(tiny_model)
    r = generate_ar_ids(tiny_model, prompt, max_tokens=12, eos_token_id=eos, prompt_cache=cache)
    assert r.tokens == free[:free.index(eos) + 1]
    assert r.model_calls == len(r.tokens) + 1 and r.tokens_fed == len(prompt) + len(r.tokens)
    assert cache.length == len(prompt) + len(r.tokens) == len(cache.history)
    cache = make_prompt_cache(tiny_model)
    r = generate_ar_ids(tiny_model, prompt, max_tokens=5, eos_token_id=[], prompt_cache=cache)
    assert r.tokens == free[:5] and r.model_calls == 5 and cache.length == len(prompt) + 4


def test_sampling_is_seeded(tiny_model):
    def run(seed):
        return generate_ar_ids(tiny_model, [1, 2, 3], max_tokens=16, temperature=1.0, seed=seed,
                               eos_token_id=[]).tokens
    assert run(3) == run(3) and run(3) != run(4)


def test_bad_requests(tiny_model):
    with pytest.raises(RefusionError):
        generate_ar_ids(tiny_model, [], max_tokens=4)
    with pytest.raises(RefusionError):
        generate_ar_ids(tiny_model, [1], max_tokens=5000)


def test_the_scheduler_steps_queue_the_next_forward_before_reading_a_token(tiny_model):
    """The step generator pipelines as generate_ar_ids does: forward n + 1 is fed token n as a lazy
    array and launched (Sync.ahead) before token n is read; the tokens stay the naive loop's,
    and an EOS still ends the answer (the one forward already under way is counted)."""
    from refusion_mlx.autoregressive import start_ar_state
    from refusion_mlx.forwards import Forward, Sync

    prompt = [7, 8, 9, 10]
    free = naive_greedy(tiny_model, prompt, 12)
    eos = free[5]
    state = start_ar_state(tiny_model, prompt, 12, eos_token_id=eos)
    committed = []
    needs = run_left_to_right(tiny_model, state, 12, committed.append)
    assert [t for c in committed for t in c.tokens] == free[:free.index(eos) + 1]
    forwards = [n for n in needs if isinstance(n, Forward)]
    assert all(isinstance(f.tokens, mx.array) for f in forwards[1:])  # fed the lazy token
    kinds = ["F" if isinstance(n, Forward) else "S" for n in needs]
    assert "".join(kinds[:5]) == "FFSFS"  # a token is read only after the next forward is asked for
    assert all(n.ahead for n in needs[:-1] if isinstance(n, Sync))
    assert state.model_calls == len(free[:free.index(eos) + 1]) + 1


def test_left_to_right_finishes_the_step_in_flight_before_an_eviction(tiny_model):
    """A bounded cache: the scheduler's left-to-right steps wait (a Sync with nothing queued) before
    every eviction, so no running step still reads the buffers the eviction moves entries in; the
    tokens are generate_ar_ids' (these steps alone) and the batch API's."""
    from refusion_mlx import batch_generate_ids, make_prompt_cache
    from refusion_mlx.autoregressive import start_ar_state
    from refusion_mlx.batch import LEFT_TO_RIGHT
    from refusion_mlx.forwards import Sync

    prompt, size, tokens = [40 + i % 50 for i in range(20)], 32, 40
    want = generate_ar_ids(tiny_model, prompt, max_tokens=tokens, eos_token_id=[],
                           prompt_cache=make_prompt_cache(tiny_model, max_kv_size=size)).tokens
    cache = make_prompt_cache(tiny_model, max_kv_size=size)
    state = start_ar_state(tiny_model, prompt, tokens, eos_token_id=[], prompt_cache=cache)
    needs, before_evictions = [], []
    evict_for = state.cache.evict_for

    def watched(needed, *args):
        dropped = evict_for(needed, *args)
        if dropped and needs:
            before_evictions.append(needs[-1])
        return dropped

    state.cache.evict_for = watched
    committed = []
    run_left_to_right(tiny_model, state, tokens, committed.append, needs)
    assert [t for c in committed for t in c.tokens] == want
    assert len(before_evictions) >= 2  # 60 entries through a 32-entry cache
    assert all(isinstance(n, Sync) and not n.ahead for n in before_evictions)
    batched = batch_generate_ids(tiny_model, [prompt], decoder=LEFT_TO_RIGHT, gen_length=tokens, eos_token_id=[],
                                 prompt_caches=[make_prompt_cache(tiny_model, max_kv_size=size)])
    assert batched[0].tokens == want


def run_left_to_right(model, state, tokens, on_commit, needs=None):
    """Drive the scheduler's left-to-right steps for one sequence as the scheduler would; returns
    every need (Forward or Sync) they yielded, in order (appended to ``needs`` as they come)."""
    from refusion_mlx.autoregressive import left_to_right
    from refusion_mlx.forwards import Forward, forward, sync
    from refusion_mlx.settings import DecodeSettings

    needs = [] if needs is None else needs
    steps = left_to_right(state, DecodeSettings(gen_length=tokens, temperature=0.0), on_commit)
    reply = None
    while True:
        try:
            need = steps.send(reply)
        except StopIteration:
            return needs
        needs.append(need)
        reply = forward(model, state.cache, need) if isinstance(need, Forward) else sync(need)
