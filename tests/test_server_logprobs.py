"""The server's logprobs (chat ``logprobs``/``top_logprobs``, completions ``logprobs``): the decoder's,
whole and streamed, for both decoders; and the requests it refuses."""

import json

import numpy as np
import pytest
from serving import LONG_PROMPT

from refusion_mlx.autoregressive import generate_ar_ids
from refusion_mlx.decode import generate_ids
from refusion_mlx.loading import load
from refusion_mlx.tokenizer_utils import prompt_ids
from refusion_mlx.transcript import Commit

ADD = "What is 682 + 459? Work column by column."


@pytest.fixture(scope="module")
def demo():
    return load()


def same_probabilities(actual, expected):
    """Log-probabilities from two computation orders, compared as probabilities (relatively)."""
    np.testing.assert_allclose(np.exp(np.asarray(actual, np.float64)), np.exp(np.asarray(expected, np.float64)),
                               rtol=1e-4)


def expected_entries(tokenizer, result):
    """(token text, logprob, top ids) of a library result's tokens in position order, EOS left out."""
    scores = sorted((p, t, lp, top) for c in result.commits
                    for p, t, lp, top in zip(c.positions, c.tokens, c.logprobs, c.top_logprobs))
    return [(tokenizer.decode([t]), lp, [i for i, _ in top]) for p, t, lp, top in scores[:len(result.tokens)]
            if t not in tokenizer.eos_token_ids]


@pytest.mark.parametrize("decoder", ["plan-and-infill", "left-to-right"])
def test_chat_logprobs_are_the_decoders(server, demo, decoder):
    model, tokenizer = demo
    reply = server.client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": ADD}], logprobs=True, top_logprobs=3, max_tokens=40,
        extra_body={"decoder": decoder})
    choice = reply.choices[0]
    ids = prompt_ids(tokenizer, ADD)
    eos = sorted(tokenizer.eos_token_ids)
    if decoder == "left-to-right":
        alone = generate_ar_ids(model, ids, max_tokens=40, eos_token_id=eos, logprobs=3)
    else:
        alone = generate_ids(model, ids, gen_length=40, eos_token_id=eos, logprobs=3)
    expected = expected_entries(tokenizer, alone)
    content = choice.logprobs.content
    assert [c.token for c in content] == [e[0] for e in expected]
    assert "".join(c.token for c in content) == choice.message.content
    same_probabilities([c.logprob for c in content], [e[1] for e in expected])
    for c in content:
        assert len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert c.logprob <= c.top_logprobs[0].logprob + 1e-6  # greedy: the committed token is the most likely
        same_probabilities(c.logprob, c.top_logprobs[0].logprob)


def test_streamed_chat_logprobs_add_up_to_the_whole_answers(server):
    fields = dict(model="demo", messages=[{"role": "user", "content": ADD}], logprobs=True, top_logprobs=2,
                  max_tokens=40)
    whole = server.client.chat.completions.create(**fields).choices[0].logprobs.content
    chunks = list(server.client.chat.completions.create(stream=True, **fields))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in whole]
    assert [c.logprob for c in streamed] == [c.logprob for c in whole]
    for chunk in chunks:  # a chunk's logprobs are those of its own text
        if chunk.choices and chunk.choices[0].logprobs:
            assert "".join(c.token for c in chunk.choices[0].logprobs.content) == chunk.choices[0].delta.content


def test_completions_logprobs_and_their_text_offsets(server, demo):
    model, tokenizer = demo
    reply = server.client.completions.create(model="demo", prompt=LONG_PROMPT, max_tokens=20, logprobs=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 20
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(20)]
    alone = generate_ids(model, tokenizer.encode(LONG_PROMPT), eos_token_id=sorted(tokenizer.eos_token_ids),
                         gen_length=20, logprobs=2)
    same_probabilities(lp.token_logprobs, [e[1] for e in expected_entries(tokenizer, alone)])
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = list(server.client.completions.create(model="demo", prompt=LONG_PROMPT, max_tokens=20, logprobs=2,
                                                     stream=True))
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert sum((p.tokens for p in pieces), []) == lp.tokens
    assert sum((p.text_offset for p in pieces), []) == lp.text_offset


def test_without_logprobs_none_come_back(server):
    reply = server.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=8, logprobs=False)
    assert reply.choices[0].logprobs is None


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": 1, "echo": True}, "logprobs"),
])
def test_logprob_requests_it_cannot_honour_are_one_json_400(server, path, body, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    status, answer = server.raw("POST", path, json.dumps({**base, **body, "max_tokens": 4}),
                                {"Content-Type": "application/json"})
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert param in answer["error"]["message"]


def test_chat_logprobs_bytes_join_into_the_text_when_tokens_split_characters(demo):
    """OpenAI's ``bytes`` are a token's own UTF-8 bytes, so that tokens holding parts of one
    character join into it. Each of these tokens decodes alone to U+FFFD, whose 3 bytes were given."""
    from types import SimpleNamespace

    from refusion_mlx.serving.answers import Answer, Reply
    from refusion_mlx.tokenizer_utils import token_bytes

    _, tokenizer = demo
    text = "猫😀 日本語, é and 👩‍👧"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case: pieces of characters
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == text.encode("utf-8")
    job = SimpleNamespace(eos=frozenset(), max_tokens=len(ids), settings=SimpleNamespace(logprobs=1))
    answer = Answer(tokenizer, job, [])
    entries = [(k, token, -0.5, [(token, -0.5)]) for k, token in enumerate(ids)]
    content = Reply(True, "demo", 1, [answer]).logprobs(answer, entries)["content"]
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8") == text
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in content)


def test_completions_text_offsets_are_the_whole_decodes_lengths_whole_and_streamed(demo):
    """``text_offset`` of each returned token is the length of the text of the tokens before it (a
    whole decode's, no longer than the answer), read as commits arrive out of order and a stop
    string cuts the text; streamed, each token's entry comes once, with the text that holds it."""
    from types import SimpleNamespace

    from refusion_mlx.serving.answers import Answer, Reply

    _, tokenizer = demo
    text = "猫😀 日本語, é and 👩‍👧 then the stop word and more after it"
    ids = tokenizer.encode(text)
    job = SimpleNamespace(eos=frozenset(), max_tokens=len(ids), settings=SimpleNamespace(logprobs=1))
    answer = Answer(tokenizer, job, ["stop word"])
    reply = Reply(False, "demo", 1, [answer], echo="Q: ")
    chunks = [list(range(k, min(k + 3, len(ids)))) for k in range(0, len(ids), 3)]
    streamed = []
    for chunk in chunks[1::2] + chunks[0::2]:  # every other chunk first: the gap-free start grows in jumps
        answer.add(Commit(chunk, [ids[p] for p in chunk], "infill", len(chunk), 1.0, [-0.5] * len(chunk),
                          [[(ids[p], -0.5)] for p in chunk]))
        answer.delta()
        entries = answer.scores()
        if entries:
            streamed += reply.logprobs(answer, entries)["text_offset"]
        if answer.finished:
            break
    answer.done()
    streamed += reply.logprobs(answer, answer.scores(final=True))["text_offset"]
    assert answer.finish_reason == "stop" and answer.text == text[:text.index("stop word")]
    whole = Answer(tokenizer, job, ["stop word"])
    whole.add(Commit(list(range(len(ids))), ids, "verify", len(ids), 1.0, [-0.5] * len(ids),
                     [[(t, -0.5)] for t in ids]))
    returned = whole.returned_tokens()
    assert answer.returned_tokens() == returned
    expected = [3 + min(len(tokenizer.decode(ids[:p])), len(answer.text)) for p in range(returned)]
    assert reply.logprobs(whole, whole.scores(final=True))["text_offset"] == expected
    assert streamed == expected
