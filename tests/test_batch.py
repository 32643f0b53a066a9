"""Batched decoding: every sequence decodes to what it decodes to alone, whatever batch it shares."""

import numpy as np
import pytest

from refusion_mlx import RefusionError, generate, generate_ar_ids, generate_ids
from refusion_mlx.batch import LEFT_TO_RIGHT, PLAN_AND_INFILL, batch_generate, batch_generate_ids
from refusion_mlx.scheduler import Scheduler
from refusion_mlx.settings import DecodeSettings

KNOB_POOL = [
    dict(gen_length=32, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.5),
    dict(gen_length=64, slot_size=8, serial_num_blocks=1, slot_threshold=0.9, token_threshold=0.9),
    dict(gen_length=32, slot_size=4, serial_num_blocks=8, slot_threshold=0.1, token_threshold=0.1),
    dict(gen_length=16, slot_size=8, serial_num_blocks=1, slot_threshold=0.5, token_threshold=0.9),
    dict(gen_length=64, slot_size=32, serial_num_blocks=1, slot_threshold=0.5, token_threshold=0.3),
    dict(gen_length=48, slot_size=8, serial_num_blocks=2, slot_threshold=0.7, token_threshold=0.5),
    dict(gen_length=32, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.5,
         temperature=1.0, seed=3),
]


def alone(model, request):
    """What one request decodes to on its own (the single-sequence decoders)."""
    prompt, decoder, knobs, eos = request
    if decoder == LEFT_TO_RIGHT:
        return generate_ar_ids(model, prompt, max_tokens=knobs["gen_length"],
                               temperature=knobs.get("temperature", 0.0), seed=knobs.get("seed"),
                               eos_token_id=eos).tokens
    return generate_ids(model, prompt, eos_token_id=eos, **knobs).tokens


def together(model, requests, max_batch_size=None, packed=True):
    """Decode the requests in one Scheduler, at most ``max_batch_size`` at a time (the rest join later).

    ``packed``: the CPU's layout (one row, no padding) or the padded one other devices use.
    """
    batch = Scheduler(model, max_active=max_batch_size or len(requests))
    batch.executor.packed = packed
    sequences = [batch.add(prompt, DecodeSettings(**knobs), decoder=decoder, eos_token_id=eos)
                 for prompt, decoder, knobs, eos in requests]
    while batch.busy:
        batch.step()
    return [s.result for s in sequences], batch


def random_requests(model, rng, size):
    """Mixed prompt lengths, knobs and decoders; half of them with an EOS the model really produces."""
    requests = []
    for _ in range(size):
        prompt = rng.integers(0, 315, size=int(rng.integers(2, 40))).tolist()
        decoder = LEFT_TO_RIGHT if rng.random() < 0.2 else PLAN_AND_INFILL
        knobs = dict(KNOB_POOL[int(rng.integers(len(KNOB_POOL)))])
        eos = []
        if rng.random() < 0.5:
            free = alone(model, (prompt, decoder, knobs, []))
            eos = [free[int(rng.integers(len(free) // 4, len(free)))]]
        requests.append((prompt, decoder, knobs, eos))
    return requests


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_every_sequence_equals_decoding_it_alone(tiny_model, packed):
    rng = np.random.default_rng(11)
    seen = {"eos": 0, "infill": 0, "verify": 0, LEFT_TO_RIGHT: 0}
    for size in range(1, 9):
        requests = random_requests(tiny_model, rng, size)
        expected = [alone(tiny_model, r) for r in requests]
        results, batch = together(tiny_model, requests, packed=packed)
        for r, want, got in zip(requests, expected, results):
            assert got.tokens == want, (size, r)
            seen["eos"] += bool(r[3]) and got.tokens[-1] in r[3]
            for c in got.commits:
                seen[c.kind] += 1
        # One forward per step for all of them: the batch ran as many forwards as its longest member.
        assert batch.executor.forwards == max(r.model_calls for r in results)
        assert not batch.active and batch.executor.cache.nbytes == 0  # finished sequences left, buffers freed
    assert all(seen.values()), seen


def test_sequences_joining_a_running_batch_decode_the_same(tiny_model):
    rng = np.random.default_rng(5)
    requests = random_requests(tiny_model, rng, 7)
    expected = [alone(tiny_model, r) for r in requests]
    for limit, packed in ((2, True), (3, False)):
        results, batch = together(tiny_model, requests, max_batch_size=limit, packed=packed)
        assert [r.tokens for r in results] == expected
        assert batch.executor.forwards > max(r.model_calls for r in results)  # they could not all run at once


def test_the_cache_holds_one_prefix_per_sequence(tiny_model, monkeypatch):
    """Rows never hold k copies of a prefix: the buffer is one row per sequence of its own size
    (with exact lengths: CUDA's key buckets round the buffer up)."""
    monkeypatch.setattr("refusion_mlx.executor.key_bucket", lambda: 1)
    prompts = [list(range(1, 30)), list(range(5, 12))]
    settings = DecodeSettings(gen_length=64, slot_size=8, serial_num_blocks=1, slot_threshold=0.99,
                              token_threshold=0.99)
    batch = Scheduler(tiny_model)
    for p in prompts:
        batch.add(p, settings, eos_token_id=[])
    longest = max(len(p) for p in prompts) + settings.padded_length
    args = tiny_model.args
    entry = args.num_key_value_heads * args.head_dim * 4 * 2  # keys + values, float32
    infilled = 0
    while batch.busy:
        batch.step()
        infilled += sum(c.kind == "infill" and c.slots > 1 for s in batch.active for c in s.commits)
        assert batch.executor.cache.nbytes <= len(prompts) * (longest + 1) * entry * len(tiny_model.layers)
    assert infilled  # several slot rows were infilled side by side


def test_a_cancelled_sequence_leaves_and_the_others_go_on(tiny_model):
    knobs = KNOB_POOL[0]
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11], [20, 21]]
    batch = Scheduler(tiny_model)
    seqs = [batch.add(p, DecodeSettings(**knobs), eos_token_id=[]) for p in prompts]
    batch.step()
    batch.step()
    batch.cancel(seqs[1])
    left = batch.step()
    assert left == [seqs[1]] and len(batch.active) == 2
    while batch.busy:
        batch.step()
    for i in (0, 2):
        assert seqs[i].result.tokens == generate_ids(tiny_model, prompts[i], eos_token_id=[], **knobs).tokens
    assert seqs[1].result is None


def test_batch_generate_texts_equal_generate(tiny_tokenizer_model):
    model, tokenizer = tiny_tokenizer_model
    prompts = ["the quick brown fox", "plan and infill", "12 + 34 ="]
    knobs = [dict(gen_length=32, slot_size=4, serial_num_blocks=2), dict(gen_length=16, slot_size=8,
             serial_num_blocks=1), dict(gen_length=32, slot_size=8, serial_num_blocks=4)]
    texts = batch_generate(model, tokenizer, prompts, knobs=knobs, slot_threshold=0.6, token_threshold=0.4)
    for prompt, k, text in zip(prompts, knobs, texts):
        assert text == generate(model, tokenizer, prompt, slot_threshold=0.6, token_threshold=0.4, **k)


@pytest.mark.parametrize("knobs, message", [
    (dict(slot_size=0), "slot_size"),
    (dict(serial_num_blocks=0), "serial_num_blocks"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_knobs_are_refused_before_anything_decodes(tiny_model, knobs, message):
    good = dict(gen_length=16, slot_size=4, serial_num_blocks=1)
    with pytest.raises(RefusionError, match=message):
        batch_generate_ids(tiny_model, [[1, 2], [3, 4]], knobs=[good, {**good, **knobs}])


def test_bad_batch_arguments_are_refused(tiny_model):
    with pytest.raises(RefusionError, match="knob sets"):
        batch_generate_ids(tiny_model, [[1, 2]], knobs=[{}, {}])
    with pytest.raises(RefusionError, match="empty"):
        batch_generate_ids(tiny_model, [[1, 2], []], gen_length=16, slot_size=4)
    with pytest.raises(RefusionError, match="max_position_embeddings"):
        batch_generate_ids(tiny_model, [[1] * 1000], decoder=LEFT_TO_RIGHT, gen_length=64)
    with pytest.raises(RefusionError, match="decoder"):
        Scheduler(tiny_model).add([1, 2], DecodeSettings(), decoder="sideways")


def test_the_padded_layout_with_attention_buckets_decodes_the_same(tiny_model):
    """CUDA's shape: rows padded, key and query lengths rounded up to fixed sizes (masked)."""
    rng = np.random.default_rng(3)
    requests = random_requests(tiny_model, rng, 5)
    batch = Scheduler(tiny_model)
    batch.executor.packed, batch.executor.bucket = False, 256
    sequences = [batch.add(p, DecodeSettings(**k), decoder=d, eos_token_id=e) for p, d, k, e in requests]
    while batch.busy:
        batch.step()
    assert [s.result.tokens for s in sequences] == [alone(tiny_model, r) for r in requests]


def test_a_lone_sequence_feeds_single_tokens_unpadded_even_with_attention_buckets(tiny_model):
    """With CUDA's key buckets, one sequence decoding left to right pads only its prompt's forward:
    each later token is one query without a mask, which attends to exactly the entries so far
    (the fast path at any key length), and decodes as it does alone."""
    prompt = list(range(3, 20))
    batch = Scheduler(tiny_model)
    batch.executor.packed, batch.executor.bucket = False, 256
    keys = []
    attend = batch.executor._forward_alone

    def spy(need):
        keys.append(need.view.end)
        return attend(need)

    batch.executor._forward_alone = spy
    seq = batch.add(prompt, DecodeSettings(gen_length=24), decoder=LEFT_TO_RIGHT, eos_token_id=[])
    while batch.busy:
        batch.step()
    assert keys == list(range(len(prompt) + 1, len(prompt) + 24 + 1))[: len(keys)] and len(keys) >= 23
    assert batch.executor.forwards == len(keys) + 1  # the prompt's forward alone was padded
    assert seq.result.tokens == alone(tiny_model, (prompt, LEFT_TO_RIGHT, dict(gen_length=24), []))


def test_entries_kept_out_of_place_after_an_eos_are_moved_in_the_batch_cache(tiny_model):
    """An EOS that cuts a multi-row infill short keeps entries laid out column by column: they are
    gathered to the front of the sequence's row, and the slots still pending read them."""
    knobs = dict(gen_length=32, slot_size=4, serial_num_blocks=1, slot_threshold=0.3, token_threshold=0.9)
    cases = [([280, 83, 71, 224, 196, 15, 26], 308),
             ([5, 144, 263, 238, 128, 156, 132, 166, 72, 247, 24, 130, 88, 231, 236, 224, 291, 293, 58], 163)]
    for prompt, eos in cases:
        alone_run = generate_ids(tiny_model, prompt, eos_token_id=[eos], **knobs)
        cut, *later = alone_run.commits
        # The premise: a multi-row infill cut by the EOS, then more slots decoded after it.
        assert cut.kind == "infill" and cut.slots >= 2 and len(cut.tokens) < 4 * cut.slots and eos in cut.tokens
        assert later
        requests = [(prompt, PLAN_AND_INFILL, knobs, [eos]), ([7, 8, 9], PLAN_AND_INFILL, KNOB_POOL[1], [])]
        for packed in (True, False):
            results, _ = together(tiny_model, requests, packed=packed)
            assert results[0].tokens == alone_run.tokens
