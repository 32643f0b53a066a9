"""Token log-probabilities (``logprobs``): in the commits, against an independent computation, the
same alone and batched, and never changing a token."""

import mlx.core as mx
import numpy as np
import pytest

from refusion_mlx import RefusionError
from refusion_mlx.autoregressive import generate_ar_ids
from refusion_mlx.batch import LEFT_TO_RIGHT, batch_generate_ids
from refusion_mlx.decode import generate_ids
from refusion_mlx.transcript import Commit, TextTranscript, Transcript

PROMPT = [7, 8, 9, 10]
KNOBS = dict(gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.6, token_threshold=0.3)


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def assert_same_logprobs(actual, expected):
    """Two computation orders of log-probabilities agree: compared as probabilities, relatively (a
    logprob near 0 is a difference of two close float32 numbers, relatively far off in log space)."""
    np.testing.assert_allclose(np.exp(np.asarray(actual, np.float64)), np.exp(np.asarray(expected, np.float64)),
                               rtol=1e-4)


def scored(result):
    """(position, token, logprob, top pairs) of every committed token, in position order."""
    out = []
    for c in result.commits:
        assert len(c.logprobs) == len(c.tokens) == len(c.top_logprobs)
        out += list(zip(c.positions, c.tokens, c.logprobs, c.top_logprobs))
    return sorted(out)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_left_to_right_logprob_is_the_plain_forwards_log_softmax(tiny_model, temperature):
    r = generate_ar_ids(tiny_model, PROMPT, max_tokens=10, temperature=temperature, seed=3, eos_token_id=[],
                        logprobs=3)
    for n, token, logprob, top in scored(r):
        expected = log_softmax(np.array(tiny_model(mx.array([PROMPT + r.tokens[:n]]))[0, -1]))
        assert_same_logprobs(logprob, expected[token])
        best = np.argsort(-expected)[:3]
        assert [t for t, _ in top] == best.tolist()
        assert_same_logprobs([v for _, v in top], expected[best])
        if temperature == 0:
            assert top[0][0] == token


def test_left_to_right_batched_gives_the_single_paths_logprobs(tiny_model):
    alone = [generate_ar_ids(tiny_model, p, max_tokens=8, eos_token_id=[], logprobs=2) for p in (PROMPT, [3, 4])]
    together = batch_generate_ids(tiny_model, [PROMPT, [3, 4]], decoder=LEFT_TO_RIGHT, gen_length=8,
                                  eos_token_id=[], logprobs=2)
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens
        sa, sb = scored(a), scored(b)
        assert_same_logprobs([s[2] for s in sa], [s[2] for s in sb])
        assert [[t for t, _ in s[3]] for s in sa] == [[t for t, _ in s[3]] for s in sb]


@pytest.mark.parametrize("token_threshold, kind", [(0.3, "infill"), (0.0, "verify")])
def test_plan_and_infill_greedy_commits_the_most_likely_token_of_its_distribution(tiny_model, token_threshold,
                                                                                 kind):
    knobs = {**KNOBS, "token_threshold": token_threshold}
    r = generate_ids(tiny_model, PROMPT, eos_token_id=[], logprobs=4, **knobs)
    plain = generate_ids(tiny_model, PROMPT, eos_token_id=[], **knobs)
    assert r.tokens == plain.tokens and all(c.logprobs is None for c in plain.commits)  # off: none
    entries = scored(r)
    assert [e[0] for e in entries] == list(range(16)) and kind in {c.kind for c in r.commits}
    for _, token, logprob, top in entries:
        assert len(top) == 4 and top[0][0] == token
        assert_same_logprobs(logprob, top[0][1])
        assert logprob <= 0 and all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_plan_and_infills_first_commit_logprobs_are_its_masked_forwards(tiny_model):
    """With token_threshold 0 every chosen draft is accepted, so the first commit holds tokens
    drafted by the first masked forward (the prompt and the first block's slots, nothing cached
    before): their logprobs are that forward's log_softmax, computed here on its own."""
    from refusion_mlx.state import start_state
    from refusion_mlx.forwards import forward, request
    from refusion_mlx.settings import DecodeSettings

    knobs = {**KNOBS, "token_threshold": 0.0}
    r = generate_ids(tiny_model, PROMPT, eos_token_id=[], logprobs=0, **knobs)
    first = r.commits[0]
    assert first.kind == "verify"
    state = start_state(tiny_model, PROMPT, DecodeSettings(**knobs), None, [], None)
    block = DecodeSettings(**knobs).block_length
    tokens = state.uncached + [state.mask_id] * block
    steps = request(state, tokens, range(state.fed_from, state.prompt_length + block),
                    state.cache.append(len(tokens)), last=block)
    logits = np.array(forward(tiny_model, state.cache, next(steps)).logits)
    for position, token, logprob in zip(first.positions, first.tokens, first.logprobs):
        assert_same_logprobs(logprob, log_softmax(logits[position])[token])


def test_plan_and_infill_batched_gives_the_single_paths_logprobs(tiny_model):
    prompts = [PROMPT, [3, 4, 5]]
    alone = [generate_ids(tiny_model, p, eos_token_id=[], logprobs=1, **KNOBS) for p in prompts]
    together = batch_generate_ids(tiny_model, prompts, eos_token_id=[], logprobs=1, **KNOBS)
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens
        assert_same_logprobs([s[2] for s in scored(a)], [s[2] for s in scored(b)])


def test_sampled_plan_and_infill_logprobs_are_of_the_committed_tokens(tiny_model):
    r = generate_ids(tiny_model, PROMPT, eos_token_id=[], temperature=1.0, seed=5, logprobs=20, **KNOBS)
    plain = generate_ids(tiny_model, PROMPT, eos_token_id=[], temperature=1.0, seed=5, **KNOBS)
    assert r.tokens == plain.tokens
    for _, token, logprob, top in scored(r):
        assert len(top) == 20 and logprob <= top[0][1] + 1e-6
        listed = dict(top)
        if token in listed:
            assert_same_logprobs(logprob, listed[token])


def test_bad_logprobs_are_refused(tiny_model):
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(RefusionError, match="logprobs"):
            generate_ids(tiny_model, PROMPT, logprobs=bad, **KNOBS)
        with pytest.raises(RefusionError, match="logprobs"):
            generate_ar_ids(tiny_model, PROMPT, max_tokens=4, logprobs=bad)


def test_the_transcript_keeps_each_positions_logprob():
    t = Transcript([9], limit=4)
    t.add(Commit([2, 3], [12, 13], "infill", 1, 1.0, [-0.5, -0.25], [[(12, -0.5)], [(13, -0.25)]]))
    assert t.prefix_scores(0, 4) == []  # not gap-free yet
    t.add(Commit([0, 1], [10, 11], "verify", 1, 1.0, [-1.0, -2.0], [[(10, -1.0)], [(11, -2.0)]]))
    assert t.prefix_scores(0, 3) == [(0, 10, -1.0, [(10, -1.0)]), (1, 11, -2.0, [(11, -2.0)]),
                                     (2, 12, -0.5, [(12, -0.5)])]
    assert t.prefix_scores(3, 9) == [(3, 13, -0.25, [(13, -0.25)])]


class Chars:
    """A tokenizer whose token t is the character chr(t)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_transcript_cuts_at_stops_holds_back_their_starts_and_counts_returned_tokens():
    t = TextTranscript([0], limit=10, tokenizer=Chars(), stops=["cd"])
    t.add(Commit([2, 3], [ord("c"), ord("d")], "infill", 1, 1.0))
    assert t.text == "" and not t.finished
    t.add(Commit([0, 1], [ord("a"), ord("b")], "verify", 1, 1.0))
    assert t.text == "ab" and t.cut and t.finish_reason == "stop" and t.returned_tokens() == 2
    u = TextTranscript([0], limit=10, tokenizer=Chars(), stops=["cd"])
    u.add(Commit([0, 1, 2], [ord("a"), ord("b"), ord("c")], "verify", 1, 1.0))
    assert u.text == "abc" and u.stable_text() == "ab"  # "c" may start the stop string
    u.add(Commit([3, 4], [ord("e"), 0], "verify", 1, 1.0))
    assert u.text == "abce" and u.finish_reason == "stop" and not u.cut and u.returned_tokens() == 5
    v = TextTranscript([0], limit=2, tokenizer=Chars())
    v.add(Commit([0, 1, 2], [ord("x"), ord("y"), ord("z")], "verify", 1, 1.0))
    assert v.text == "xy" and v.finish_reason == "length"
