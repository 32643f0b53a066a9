"""The server's prompt cache: requests sharing a prefix reuse it, exactly, and say so in usage."""

import pytest
from serving import Server

from refusion_mlx.decode import generate_ids
from refusion_mlx.loading import load
from refusion_mlx.tokenizer_utils import prompt_ids

SYSTEM = "You are a careful assistant. " * 6
QUESTIONS = ["What is 682 + 459? Work column by column.", "What is 314 + 275? Work column by column."]


@pytest.fixture(scope="module")
def cached_server():
    server = Server("--prompt-cache-size", "4", "--max-concurrency", "2")
    yield server
    server.stop()


def ask(server, question, **fields):
    return server.client.chat.completions.create(
        model="demo", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        **fields)


def test_a_shared_system_prompt_is_reused_and_answers_are_a_fresh_calls(cached_server):
    model, tokenizer = load()
    first = ask(cached_server, QUESTIONS[0])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = ask(cached_server, QUESTIONS[1])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    ids = prompt_ids(tokenizer, messages)
    shared = prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}])
    common = next(i for i, (a, b) in enumerate(zip(ids, shared)) if a != b)
    assert second.usage.prompt_tokens_details.cached_tokens == common > 40  # the system prompt's tokens
    alone = generate_ids(model, ids, eos_token_id=sorted(tokenizer.eos_token_ids))
    eos = tokenizer.eos_token_ids
    assert second.choices[0].message.content == tokenizer.decode([t for t in alone.tokens if t not in eos],
                                                                 skip_special_tokens=True)
    # Streamed, the same request reuses its own earlier prompt (all but its last token).
    chunks = list(ask(cached_server, QUESTIONS[1], stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content


def test_without_a_prompt_cache_nothing_is_reused():
    server = Server("--prompt-cache-size", "0")
    try:
        ask(server, QUESTIONS[0])
        assert ask(server, QUESTIONS[1]).usage.prompt_tokens_details.cached_tokens == 0
    finally:
        server.stop()
