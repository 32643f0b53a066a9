"""Chunked prefill: a sequence joining the batch feeds its prompt ``prefill_step`` tokens per step
while the others keep decoding, and decodes to the same tokens as alone."""

import pytest

from refusion_mlx import RefusionError, generate_ids
from refusion_mlx.autoregressive import generate_ar_ids
from refusion_mlx.scheduler import LEFT_TO_RIGHT, Scheduler
from refusion_mlx.settings import DecodeSettings

KNOBS = dict(gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.5)


def test_a_long_prompt_joins_in_chunks_while_another_sequence_decodes(tiny_model):
    scheduler = Scheduler(tiny_model, max_active=2, prefill_step=4)
    short = scheduler.add([3, 4], DecodeSettings(gen_length=12), decoder=LEFT_TO_RIGHT, eos_token_id=[])
    scheduler.step()
    prompt = list(range(5, 27))  # 22 tokens: 5 chunks of 4, then 2 with the first plan
    joining = scheduler.add(prompt, DecodeSettings(**KNOBS), eos_token_id=[])
    sizes, short_tokens = [], []
    forward = scheduler.executor.forward

    def watched(needs):  # what the joining sequence feeds in each step, and the other's progress
        if joining in scheduler.active:
            sizes.append(needs[scheduler.active.index(joining)].size)
            short_tokens.append(len(short.transcript.placed))
        return forward(needs)

    scheduler.executor.forward = watched
    while scheduler.busy:
        scheduler.step()
    block = DecodeSettings(**KNOBS).block_length
    assert sizes[:6] == [4, 4, 4, 4, 4, 2 + block]
    assert short_tokens[:6] == list(range(short_tokens[0], short_tokens[0] + 6))  # one token every step
    assert joining.result.tokens == generate_ids(tiny_model, prompt, eos_token_id=[], **KNOBS).tokens
    assert short.result.tokens == generate_ar_ids(tiny_model, [3, 4], max_tokens=12, eos_token_id=[]).tokens
    assert joining.state.tokens_fed == len(prompt) + sum(sizes[6:]) + block  # no prompt token fed twice


def test_a_short_prompt_is_fed_whole_and_a_bad_step_refused(tiny_model):
    scheduler = Scheduler(tiny_model, prefill_step=8)
    seq = scheduler.add([3, 4, 5], DecodeSettings(**KNOBS), eos_token_id=[])
    while scheduler.busy:
        scheduler.step()
    assert seq.result.tokens == generate_ids(tiny_model, [3, 4, 5], eos_token_id=[], **KNOBS).tokens
    with pytest.raises(RefusionError, match="prefill_step must be positive"):
        Scheduler(tiny_model, prefill_step=0)


def test_a_bounded_cache_prefills_in_chunks_too(tiny_model):
    """With ``max_kv_size``, a long prompt still joins ``prefill_step`` tokens at a time (making
    room before each chunk), and the cache never holds more than its size."""
    from refusion_mlx import make_prompt_cache

    scheduler = Scheduler(tiny_model, prefill_step=4)
    cache = make_prompt_cache(tiny_model, max_kv_size=24)
    prompt = list(range(5, 45))  # 40 tokens through a 24-entry cache
    seq = scheduler.add(prompt, DecodeSettings(gen_length=8), decoder=LEFT_TO_RIGHT, eos_token_id=[],
                        prompt_cache=cache)
    sizes, lengths = [], []
    forward = scheduler.executor.forward

    def watched(needs):
        sizes.append(needs[0].size)
        lengths.append(seq.state.cache.length)
        return forward(needs)

    scheduler.executor.forward = watched
    while scheduler.busy:
        scheduler.step()
    assert sizes[:9] == [4] * 9 and max(sizes) <= 4 + 1  # the last chunk goes with the first token's forward
    assert max(lengths) <= 24 and len(seq.result.tokens) == 8
    assert seq.state.tokens_fed == len(prompt) + 7  # every prompt token fed once, then one per token
