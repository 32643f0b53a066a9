"""The OpenAI-compatible server, driven by the official ``openai`` client against the demo model."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
from conftest import with_root_on_path
from serving import LONG_PROMPT, Server

from refusion_mlx.autoregressive import generate_ar_ids
from refusion_mlx.decode import generate_ids
from refusion_mlx.loading import DEMO_MODEL_PATH, load
from refusion_mlx.tokenizer_utils import prompt_ids

ADD = "What is 682 + 459? Work column by column."
SORT = "Sort these numbers from smallest to largest: 512, 47, 903, 268, 131"
REVERSE = "Reverse the order of the words: apple river stone cloud"


@pytest.fixture(scope="module")
def demo():
    return load()


def chat(server, content, **fields):
    extra = {k: fields.pop(k) for k in list(fields) if k in ("slot_size", "blocks", "slot_threshold",
                                                            "token_threshold", "preset", "decoder")}
    return server.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                                  extra_body=extra or None, **fields)


def decoded(tokenizer, tokens):
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids], skip_special_tokens=True)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["demo"]
    assert server.health()["status"] == "ok"


def test_chat_answer_is_the_decoders(server, demo):
    model, tokenizer = demo
    reply = chat(server, ADD)
    ids = prompt_ids(tokenizer, ADD)
    alone = generate_ids(model, ids, eos_token_id=sorted(tokenizer.eos_token_ids))  # the model's own knobs
    assert reply.choices[0].message.content == decoded(tokenizer, alone.tokens)
    assert reply.choices[0].message.content.endswith("Answer: 1141")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(alone.tokens)


def test_completion_cut_at_max_tokens(server, demo):
    model, tokenizer = demo
    reply = server.client.completions.create(model="demo", prompt=LONG_PROMPT, max_tokens=20)
    # 20 tokens are decoded as 32 (4 blocks of 8-token slots) and the answer cut at 20.
    alone = generate_ids(model, tokenizer.encode(LONG_PROMPT), eos_token_id=sorted(tokenizer.eos_token_ids),
                         gen_length=20)
    assert reply.choices[0].text == decoded(tokenizer, alone.tokens)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 20


def test_streams_add_up_to_the_whole_answer(server):
    whole = chat(server, SORT).choices[0].message.content
    chunks = list(chat(server, SORT, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    plain = server.client.completions.create(model="demo", prompt=LONG_PROMPT, max_tokens=5).choices[0]
    streamed = list(server.client.completions.create(model="demo", prompt=LONG_PROMPT, max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.text
    assert streamed[-1].choices[0].finish_reason == plain.finish_reason == "length"


def test_seeds_make_sampling_reproducible(server):
    def sample(seed, temperature=1.0):
        return server.client.completions.create(model="demo", prompt=REVERSE, temperature=temperature, seed=seed,
                                                max_tokens=16).choices[0].text

    assert sample(5) == sample(5)
    assert len({sample(s) for s in (5, 6, 7)}) > 1
    assert sample(5, 0.0) == sample(6, 0.0)  # greedy: the seed plays no part

    def truncated(seed, **knobs):
        return server.client.completions.create(model="demo", prompt=REVERSE, temperature=1.0, seed=seed,
                                                max_tokens=16, extra_body=knobs).choices[0].text

    assert truncated(5, top_k=1) == truncated(6, top_k=1) == sample(5, 0.0)  # one token left: greedy's
    nucleus = server.client.completions.create(model="demo", prompt=REVERSE, temperature=1.0, seed=5, top_p=0.9,
                                               max_tokens=16).choices[0].text
    assert nucleus == server.client.completions.create(model="demo", prompt=REVERSE, temperature=1.0, seed=5,
                                                       top_p=0.9, max_tokens=16).choices[0].text


def test_knobs_and_decoder_per_request(server, demo):
    model, tokenizer = demo
    ids = prompt_ids(tokenizer, ADD)
    eos = sorted(tokenizer.eos_token_ids)
    knobs = dict(gen_length=96, slot_size=4, serial_num_blocks=8, slot_threshold=0.8, token_threshold=0.7)
    reply = chat(server, ADD, max_tokens=96, slot_size=4, blocks=8, slot_threshold=0.8, token_threshold=0.7)
    assert reply.choices[0].message.content == decoded(tokenizer, generate_ids(model, ids, eos_token_id=eos,
                                                                                **knobs).tokens)
    ar = chat(server, ADD, max_tokens=120, decoder="left-to-right")
    assert ar.choices[0].message.content == decoded(tokenizer, generate_ar_ids(model, ids, max_tokens=120,
                                                                                eos_token_id=eos).tokens)
    preset = chat(server, ADD, max_tokens=64, preset="mmlu-pro")  # 16-token slots, 4 blocks
    assert preset.usage.completion_tokens <= 64


def test_stop_strings_end_the_answer(server):
    whole = chat(server, ADD).choices[0].message.content
    assert "carry" in whole
    cut = chat(server, ADD, stop=["carry", "zzz"])
    assert cut.choices[0].message.content == whole[: whole.index("carry")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = chat(server, ADD, stop="carry", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole[: whole.index("carry")]


def test_usage_counts_only_the_tokens_returned(server, demo):
    """A stop string cuts the answer: completion_tokens counts the tokens of what is returned."""
    _, tokenizer = demo
    whole = chat(server, ADD)
    text = whole.choices[0].message.content
    cut = chat(server, ADD, stop="carry")
    returned = cut.choices[0].message.content
    assert returned == text[: text.index("carry")]
    assert cut.usage.completion_tokens < whole.usage.completion_tokens
    # The returned text is the decoding of exactly that many of the answer's tokens (and no fewer).
    ids = generate_ids(demo[0], prompt_ids(tokenizer, ADD), eos_token_id=sorted(tokenizer.eos_token_ids)).tokens
    n = cut.usage.completion_tokens
    assert decoded(tokenizer, ids[:n]).startswith(returned) and len(decoded(tokenizer, ids[: n - 1])) < len(returned)


def test_what_frontends_send_is_accepted(server):
    """Fields OpenAI clients and frontends send with neutral values, roles developer and tool,
    content as parts or null, max_completion_tokens, n > 1, the model alias in any case."""
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "What is 682 + 459? "},
                                             {"type": "text", "text": "Work column by column."}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "1141"}]
    reply = server.client.chat.completions.create(
        model="DEFAULT_MODEL", messages=messages, max_completion_tokens=24, top_p=1, frequency_penalty=0,
        presence_penalty=0, logprobs=False, response_format={"type": "text"}, parallel_tool_calls=True,
        store=False, user="u1", n=2, temperature=0.8, seed=3, metadata={"a": "b"},
        stream_options=None, extra_body={"top_k": 0, "min_p": 0, "tools": None, "tool_choice": "none"})
    assert [c.index for c in reply.choices] == [0, 1] and reply.model == "demo"
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert 0 < reply.usage.completion_tokens <= 48
    # n choices sample with seeds seed, seed+1: each is what a request with that seed gets alone.
    alone = [server.client.chat.completions.create(model="Demo", messages=messages, max_completion_tokens=24,
                                                   temperature=0.8, seed=seed).choices[0].message.content
             for seed in (3, 4)]
    assert [c.message.content for c in reply.choices] == alone


def test_n_choices_stream_with_their_index(server):
    chunks = list(server.client.completions.create(model="demo", prompt=REVERSE, max_tokens=12, n=3, stream=True,
                                                   temperature=1.0, seed=9))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    whole = server.client.completions.create(model="demo", prompt=REVERSE, max_tokens=12, n=3, temperature=1.0,
                                             seed=9)
    assert texts == [c.text for c in whole.choices]
    echoed = server.client.completions.create(model="demo", prompt=REVERSE, max_tokens=4, echo=True)
    assert echoed.choices[0].text.startswith(REVERSE)


def test_models_retrieve_and_routes_without_v1(server):
    assert server.client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    bare = openai.OpenAI(base_url=server.url[: -len("/v1")], api_key="unused", max_retries=0, timeout=120)
    assert bare.chat.completions.create(model="demo", messages=[{"role": "user", "content": ADD}],
                                        max_tokens=8).choices[0].finish_reason == "length"
    assert [m.id for m in bare.models.list().data] == ["demo"]


def test_the_served_id_is_never_a_local_path(tiny_path):
    from refusion_mlx.server import served_name

    assert served_name(str(tiny_path)) == tiny_path.name
    assert served_name(str(tiny_path) + "/") == tiny_path.name
    assert served_name("GSAI-ML/ReFusion") == "GSAI-ML/ReFusion"  # a repo id is not a path here
    assert served_name(None) == "demo"


def test_concurrent_clients_get_what_they_get_alone(server):
    """Eight clients at once (four decode, the rest queue and join the batch as others leave)."""
    requests = [
        dict(content=ADD), dict(content=SORT, stream=True), dict(content=REVERSE, max_tokens=24),
        dict(content=SORT, slot_size=4, blocks=8, max_tokens=64), dict(content=ADD, decoder="left-to-right"),
        dict(content=REVERSE, temperature=0.8, seed=11), dict(content="Count: 3, 6, 9", token_threshold=0.3),
        dict(content=ADD, stop="Column 3", stream=True),
    ]

    def ask(fields):
        fields = dict(fields)
        reply = chat(server, fields.pop("content"), **fields)
        if fields.get("stream"):
            return "".join(c.choices[0].delta.content or "" for c in reply)
        return reply.choices[0].message.content

    alone = [ask(r) for r in requests]
    together = [None] * len(requests)

    def client(i):
        together[i] = ask(requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    assert server.health()["running"] == 0


DEMO_POSITIONS = json.loads((DEMO_MODEL_PATH / "config.json").read_text())["max_position_embeddings"]
BAD = [
    # (path, body, status, words in the message)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400,
     "integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "slot_threshold": 1.5}, 400,
     "slot_threshold"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "slot_size": 0}, 400, "slot_size"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "preset": "nope"}, 400, "preset"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "decoder": "x"}, 400, "decoder"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "'n'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_p": 2}, 400, "min_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400,
     "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "only text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**100}, 400, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "wat": 1}, 400, "wat"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * (DEMO_POSITIONS + 100)}]}, 400,
     "max_position_embeddings"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": DEMO_POSITIONS}, 400,
     "max_position_embeddings"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "token ids"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4"),
    ("/v1/nowhere", {}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("path, body, status, words", BAD, ids=[f"{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, path, body, status, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = server.raw("POST", path, raw, {"Content-Type": "application/json"})
    assert got == status, reply
    assert words in reply["error"]["message"] and reply["error"]["type"]


def test_the_openai_client_sees_the_errors(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(server, "hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert chat(server, REVERSE, max_tokens=8).choices[0].finish_reason == "length"  # still serving


def test_a_client_leaving_mid_stream_frees_its_sequence(server):
    before = server.health()["disconnected"]
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    body = {"model": "demo", "prompt": "1, 2, 3,", "max_tokens": 480, "decoder": "left-to-right", "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event: decoding is under way
    response.close()
    conn.close()
    other = chat(server, REVERSE, max_tokens=16)  # the others go on
    assert other.choices[0].finish_reason == "length"
    health = server.health_after_disconnect(before)
    assert health["disconnected"] == before + 1 and health["running"] == 0


def test_ctrl_c_stops_cleanly_while_decoding():
    s = Server("--max-concurrency", "1")
    outcome = {}

    def long_request():
        try:
            outcome["reply"] = s.client.completions.create(model="demo", prompt="1, 2, 3,", max_tokens=480,
                                                           extra_body={"decoder": "left-to-right"})
        except openai.APIError as e:
            outcome["error"] = e

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.5)
    code, err = s.stop()
    thread.join(timeout=30)
    assert code == 0 and "shutting down" in err and "Traceback" not in err, err
    assert not thread.is_alive() and outcome  # the client got an answer or an error, never a hang


def test_sigterm_right_after_the_banner_exits_0():
    s = Server()
    code, err = s.stop(signal.SIGTERM)
    assert code == 0 and "Traceback" not in err and "interrupted" not in err, err


def test_bad_flags_are_one_line():
    env = {**os.environ, "PYTHONPATH": with_root_on_path()}
    out = subprocess.run([sys.executable, "-m", "refusion_mlx.server", "--port", "99999"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "error:" in out.stderr


def test_the_load_benchmark_runs_headless():
    """serve_bench starts its own server, loads it and reports no failed or lost request."""
    env = {**os.environ, "PYTHONPATH": with_root_on_path()}
    out = subprocess.run([sys.executable, "-m", "refusion_mlx.serve_bench", "--requests", "3", "--concurrency",
                          "1", "3", "--mixed", "12"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| plan-and-infill") or
            line.startswith("| left-to-right")]
    assert len(rows) == 4 and all(row.endswith("| 0 |") for row in rows)  # no failed request
    assert "0 failed, 0 lost" in out.stdout
