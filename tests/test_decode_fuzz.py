"""A seeded fuzz of the decoder's knobs: for every valid combination, the decoder's invariants hold.

A few hundred ``generate_ids`` calls on the tiny model with random slot sizes, blocks, lengths
(padded or not), thresholds at and between the ends, temperatures and seeds, EOS sets the model
really produces (so EOS fires mid-slot and mid-infill) and other mask ids:

* no exception for valid knobs;
* nothing after the first EOS: an EOS is only ever the last returned token;
* the committed positions are unique and inside the padded span; the returned tokens are the
  committed ones in position order with no hole, ending at the first EOS or, without one,
  covering all that was asked for;
* the same seed gives the same tokens.
"""

import random

import pytest

from refusion_mlx import DecodeSettings, generate_ids

CALLS = 300
SLOT_SIZES = (1, 2, 3, 4, 5, 8, 16)


def random_knobs(rng: random.Random, frequent: list) -> dict:
    slot = rng.choice(SLOT_SIZES)
    blocks = rng.randint(1, 4)
    slots_per_block = rng.randint(1, max(1, 48 // (slot * blocks)))
    padded = slot * blocks * slots_per_block
    gen_length = rng.randint(padded - slot + 1, padded)  # padded up to whole slots by the decoder
    threshold = lambda: rng.choice([0.0, 1.0, rng.random(), rng.random()])  # noqa: E731
    eos = rng.choice([None, [], [rng.choice(frequent)], rng.sample(frequent, 3), rng.randrange(320)])
    return dict(gen_length=gen_length, slot_size=slot, serial_num_blocks=blocks,
                slot_threshold=threshold(), token_threshold=threshold(),
                temperature=rng.choice([0.0, 0.0, rng.uniform(0.05, 2.0)]),
                seed=rng.randrange(2**64), eos_token_id=eos,
                mask_id=rng.choice([None, None, rng.randrange(320)]))


def check_invariants(result, knobs: dict, eos_ids: set):
    settings = DecodeSettings(knobs["gen_length"], knobs["slot_size"], knobs["serial_num_blocks"])
    padded = settings.padded_length
    placed = {}
    for commit in result.commits:
        assert len(commit.positions) == len(commit.tokens)
        for position, token in zip(commit.positions, commit.tokens):
            assert position not in placed, f"position {position} committed twice"
            assert 0 <= position < padded
            placed[position] = token
    in_order = [placed[p] for p in sorted(placed)]
    n = len(result.tokens)
    assert sorted(placed)[:n] == list(range(n)), "a hole in the returned text"
    assert result.tokens == in_order[:n]
    assert all(t not in eos_ids for t in result.tokens[:-1]), "a token after the first EOS"
    if not result.tokens or result.tokens[-1] not in eos_ids:  # no EOS: all that was asked for
        assert n >= knobs["gen_length"] and set(range(knobs["gen_length"])) <= set(placed), "stopped early"


def test_knob_fuzz_keeps_the_decoders_invariants(tiny_model):
    prompt = [316, 84, 82, 266, 198, 71, 72, 317]
    greedy = generate_ids(tiny_model, prompt, gen_length=64, slot_size=8, serial_num_blocks=1,
                          eos_token_id=[]).tokens
    frequent = sorted(set(greedy), key=greedy.count, reverse=True)[:6]
    assert len(frequent) >= 3
    rng = random.Random(20261123)
    sampled = ended_by_eos = 0
    for call in range(CALLS):
        knobs = random_knobs(rng, frequent)
        ids = prompt[: rng.randint(1, len(prompt))]
        result = generate_ids(tiny_model, ids, **knobs)
        eos = knobs["eos_token_id"]
        eos_ids = {tiny_model.args.eos_token_id} if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        try:
            check_invariants(result, knobs, eos_ids)
            ended_by_eos += bool(result.tokens) and result.tokens[-1] in eos_ids
            if knobs["temperature"] > 0:
                sampled += 1
                assert generate_ids(tiny_model, ids, **knobs).tokens == result.tokens, "same seed, other tokens"
        except AssertionError as e:
            pytest.fail(f"call {call}, knobs {knobs}, prompt {ids}: {e}")
    # The interesting cases really ran: sampling with a seed, and EOS ending the text early.
    assert sampled >= 30 and ended_by_eos >= 30, (sampled, ended_by_eos)
