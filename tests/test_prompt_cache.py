"""Prompt caches that outlive a request: exact prefix reuse, divergence trimming, chats, batches,
bounded caches."""

import numpy as np
import pytest

from refusion_mlx import RefusionError, batch_generate_ids, generate_ar_ids, generate_ids, make_prompt_cache
from refusion_mlx.batch import LEFT_TO_RIGHT

KNOBS = dict(gen_length=32, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.5,
             eos_token_id=[])
PROMPT = [40 + i % 50 for i in range(30)]


def held_positions(cache):
    return sorted(cache.cache.positions[: cache.length].tolist())


def test_a_shared_prompt_prefix_gives_the_tokens_of_a_fresh_call(tiny_model):
    cache = make_prompt_cache(tiny_model)
    first = generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS)
    assert first.cached_tokens == 0
    # The cache holds the prompt and every committed answer position (committed out of order).
    assert held_positions(cache)[: len(PROMPT)] == list(range(len(PROMPT)))
    assert cache.length >= len(PROMPT) + len(first.tokens)

    diverging = PROMPT[:20] + [7, 8, 9, 10]  # shares 20 tokens, then differs inside the old prompt
    again = generate_ids(tiny_model, diverging, prompt_cache=cache, **KNOBS)
    assert again.cached_tokens == 20
    assert again.tokens == generate_ids(tiny_model, diverging, **KNOBS).tokens
    assert again.tokens_fed == generate_ids(tiny_model, diverging, **KNOBS).tokens_fed - 20


def test_divergence_inside_an_answer_keeps_exactly_the_shared_positions(tiny_model):
    cache = make_prompt_cache(tiny_model)
    answer = generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS).tokens
    kept = len(PROMPT) + 10
    follow_up = PROMPT + answer[:10] + [5, 6]
    cache.reuse(follow_up)  # what the next call does first
    assert held_positions(cache) == list(range(kept))
    assert np.array_equal(cache.history, follow_up[:kept])


def test_answers_are_reused_as_made_or_re_prefilled_exactly(tiny_model):
    turn = [60, 61, 62, 63]
    for keep_answers in (True, False):
        cache = make_prompt_cache(tiny_model, keep_answers=keep_answers)
        answer = generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS).tokens
        follow_up = PROMPT + answer + turn
        result = generate_ids(tiny_model, follow_up, prompt_cache=cache, **KNOBS)
        if keep_answers:  # only the new turn is fed
            assert result.cached_tokens == len(PROMPT) + len(answer)
        else:  # the answer is fed again as prompt: exactly a fresh call
            assert result.cached_tokens == len(PROMPT)
            assert result.tokens == generate_ids(tiny_model, follow_up, **KNOBS).tokens


def test_a_chat_feeds_only_each_turns_new_tokens(tiny_model):
    cache = make_prompt_cache(tiny_model)
    history = list(PROMPT[:8])
    for turn in range(8):
        new = [100 + turn, 101 + turn, 102 + turn]
        history += new
        result = generate_ids(tiny_model, history, prompt_cache=cache, **dict(KNOBS, gen_length=16))
        if turn:
            assert result.cached_tokens == len(history) - len(new)
        history += result.tokens
    assert cache.length >= len(history)


def test_left_to_right_and_batches_use_prompt_caches_the_same_way(tiny_model):
    prompts = [PROMPT, PROMPT[:12] + [9, 9, 9], [5, 6, 7, 8, 9, 10]]
    alone = [make_prompt_cache(tiny_model) for _ in prompts]
    together = [make_prompt_cache(tiny_model) for _ in prompts]
    for caches in (alone, together):  # the same history in both sets
        for p, c in zip(prompts, caches):
            generate_ids(tiny_model, p, prompt_cache=c, **KNOBS)
    follow_ups = [p[:-2] + [70, 71, 72] for p in prompts]
    knobs = dict(KNOBS)
    eos = knobs.pop("eos_token_id")
    want = [generate_ids(tiny_model, f, prompt_cache=c, eos_token_id=eos, **knobs) for f, c in zip(follow_ups, alone)]
    got = batch_generate_ids(tiny_model, follow_ups, prompt_caches=together, max_batch_size=2, eos_token_id=eos,
                             **knobs)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.cached_tokens for r in got] == [r.cached_tokens for r in want] == [len(p) - 2 for p in prompts]
    for a, b in zip(alone, together):
        assert held_positions(a) == held_positions(b) and np.array_equal(a.history, b.history)

    cache = make_prompt_cache(tiny_model)
    generate_ar_ids(tiny_model, PROMPT, max_tokens=8, prompt_cache=cache, eos_token_id=[])
    again = generate_ar_ids(tiny_model, PROMPT + [1, 2], max_tokens=8, prompt_cache=cache, eos_token_id=[])
    assert again.cached_tokens == len(PROMPT)
    assert again.tokens == generate_ar_ids(tiny_model, PROMPT + [1, 2], max_tokens=8, eos_token_id=[]).tokens
    batched = batch_generate_ids(tiny_model, [PROMPT + [1, 2]], decoder=LEFT_TO_RIGHT, gen_length=8,
                                 eos_token_id=[], prompt_caches=[make_prompt_cache(tiny_model)])
    assert batched[0].tokens == again.tokens


def test_a_bounded_cache_stays_within_its_size_and_keeps_the_start(tiny_model):
    size = 48
    for decode in ("plan-and-infill", "left-to-right"):
        cache = make_prompt_cache(tiny_model, max_kv_size=size)
        prompt = [40 + i % 50 for i in range(100)]  # longer than the cache: prefilled in chunks
        if decode == "left-to-right":
            result = generate_ar_ids(tiny_model, prompt, max_tokens=120, prompt_cache=cache, eos_token_id=[])
        else:
            result = generate_ids(tiny_model, prompt, prompt_cache=cache, **dict(KNOBS, gen_length=128,
                                                                                serial_num_blocks=16))
        assert len(result.tokens) == 120 if decode == "left-to-right" else 128
        assert cache.length <= size
        assert cache.cache.layers[0].keys.shape[2] == cache.cache.capacity <= size + cache.cache.bucket
        held = held_positions(cache)
        assert held[:4] == [0, 1, 2, 3]  # the first entries are never evicted
        # The newest are kept (left to right never feeds its last token).
        assert held[-1] == len(prompt) + len(result.tokens) - (2 if decode == "left-to-right" else 1)
    # Big enough never to evict: exactly the unbounded tokens.
    roomy = generate_ids(tiny_model, PROMPT, max_kv_size=len(PROMPT) + 64, **KNOBS)
    assert roomy.tokens == generate_ids(tiny_model, PROMPT, **KNOBS).tokens


def test_bad_prompt_caches_are_one_clear_error(tiny_model):
    with pytest.raises(RefusionError, match="max_kv_size .* too small"):
        generate_ids(tiny_model, PROMPT, max_kv_size=10, **KNOBS)
    with pytest.raises(RefusionError, match="max_kv_size must be a positive integer"):
        make_prompt_cache(tiny_model, max_kv_size=0)
    with pytest.raises(RefusionError, match="make_prompt_cache"):
        generate_ids(tiny_model, PROMPT, prompt_cache={}, **KNOBS)
    with pytest.raises(RefusionError, match="beside a prompt_cache"):
        generate_ids(tiny_model, PROMPT, prompt_cache=make_prompt_cache(tiny_model), max_kv_size=64, **KNOBS)
    cache = make_prompt_cache(tiny_model)
    with pytest.raises(RefusionError, match="share one prompt cache"):
        batch_generate_ids(tiny_model, [PROMPT, PROMPT], prompt_caches=[cache, cache], **KNOBS)
    generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS)
    cache.cache.layers = cache.cache.layers[:1]  # as if made for a one-layer model
    with pytest.raises(RefusionError, match="another model"):
        generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS)


def test_eviction_drops_the_oldest_beyond_the_first_positions_and_never_more_than_it_can():
    from refusion_mlx.kv import SlotLayout

    layout = SlotLayout(0, max_size=32)
    for start in range(0, 30, 10):  # three commits of 10 entries at positions 0-29
        view = layout.append(10)
        layout.record(view, np.arange(start, start + 10))
        layout.commit(10)
    assert layout.evict_for(4) == 2  # 30 + 4 > 32: the 2 oldest after the first 4 positions go
    assert sorted(layout.positions[: layout.length].tolist()) == [0, 1, 2, 3] + list(range(6, 30))
    big = SlotLayout(0, max_size=100)
    view = big.append(97)
    big.record(view, np.arange(97))
    big.commit(97)
    assert big.evict_for(5) == 6  # at least 1/16 of the cache at a time
    small = SlotLayout(0, max_size=64)
    view = small.append(7)
    small.record(view, np.arange(7))
    small.commit(7)
    assert small.evict_for(58) == 3  # the 1/16 minimum (4) never exceeds what may go (positions 4-6)
