"""What a hostile or careless client sends the server: every answer is OpenAI's JSON error shape
(or a normal answer), nothing crashes it, nothing one request asks for takes the machine."""

import json
import socket
import time

import pytest
from serving import CORS_ORIGIN

from refusion_mlx.serving.http import MAX_BODY
from refusion_mlx.transcript import stop_overlap

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def post(server, body, path=CHAT, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})


def openai_error(data: bytes) -> dict:
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def exchange(server, data: bytes, timeout: float = 30) -> bytes:
    """Raw bytes in, everything the server answers until it closes (or ``timeout``)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    return out


def status_and_body(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head.decode("latin-1").lower(), body


@pytest.mark.parametrize("knobs, param", [
    (dict(max_tokens=8, slot_size=1, blocks=10**9), "slot_size"),  # was a 768 GB allocation and SIGSEGV
    (dict(max_tokens=8, slot_size=10**6), "slot_size"),  # was 4 GB within seconds
    (dict(slot_size=2048, blocks=128), "slot_size"),  # was 2.5 GB and 10 s for everyone else
    (dict(max_tokens=10**30), "messages"),
    (dict(n=10**6), "n"),
    (dict(n=16), "n"),  # more than --max-concurrency (4 here): one request would hold the whole batch
    (dict(max_tokens=8, seed=2**64), "seed"),
])
def test_knobs_that_would_allocate_too_much_are_refused_by_name(server, knobs, param):
    status, _, data = post(server, {"messages": HI, **knobs})
    assert status == 400 and openai_error(data)["param"] == param
    assert server.health()["running"] == 0


@pytest.mark.parametrize("knobs, param", [
    (dict(preset="nope"), "preset"),  # was param null: a client could not tell which field to fix
    (dict(decoder="x"), "decoder"),
    (dict(slot_threshold=2), "slot_threshold"),
    (dict(top_logprobs=2), "top_logprobs"),
])
def test_every_refused_knob_is_named_in_param(server, knobs, param):
    status, _, data = post(server, {"messages": HI, "max_tokens": 4, **knobs})
    assert status == 400 and openai_error(data)["param"] == param


def test_a_prompt_too_long_is_refused_by_its_size_before_tokenizing(server):
    """3.9 MB of text cannot fit the demo's 2048 positions whatever the tokenizer does: refused on its bytes."""
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": "ab " * 1_300_000}]}),
                       ("/v1/completions", {"prompt": "ab " * 1_300_000})):
        status, _, data = post(server, body, path)
        error = openai_error(data)
        assert status == 400 and error["code"] == "context_length_exceeded" and "bytes" in error["message"]


@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
    (b'\xff\xfe{}', "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_malformed_bodies_get_400_json(server, body, words):
    status, _, data = post(server, body)
    assert status == 400 and words in openai_error(data)["message"]


def test_a_lone_surrogate_in_a_completion_prompt_is_refused(server):
    status, _, data = post(server, b'{"prompt": "a\\ud800b", "max_tokens": 4}', "/v1/completions")
    assert status == 400 and "surrogate" in openai_error(data)["message"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405_json(server, method):
    status, headers, data = server.request(method, CHAT)
    assert status == 405 and openai_error(data)["code"] == "method_not_allowed"
    assert "POST" in headers["allow"]


def test_head_get_and_query_strings(server):
    status, headers, data = server.request("HEAD", "/health")
    assert status == 200 and data == b"" and headers["content-type"] == "application/json"
    assert server.request("HEAD", CHAT)[0] == 405
    assert server.raw("GET", "/health?x=1")[0] == 200
    status, _, data = server.request("GET", "/nowhere")
    assert status == 404 and openai_error(data)["code"] == "not_found"


def test_no_server_version_header(server):
    _, headers, _ = server.request("GET", "/v1/models")
    assert "server" not in headers


def test_a_body_too_large_is_refused_before_it_is_read(server):
    response = exchange(server, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                f"Content-Length: {50 * 2**20}\r\n\r\n".encode())  # the 50 MB never sent
    status, head, body = status_and_body(response)
    assert status == 413 and openai_error(body)["code"] == "body_too_large" and "connection: close" in head
    # Chunked, no length announced: counted as it arrives.
    chunk = b"x" * 2**20
    data = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 1))
    response = exchange(server, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                        + data + b"0\r\n\r\n")
    assert status_and_body(response)[0] == 413


def test_a_client_that_sends_its_whole_body_before_reading_still_gets_the_413(server):
    """http.client writes all 5 MB before it reads: the server answers before reading them, and
    must not reset the connection under that answer (it was ConnectionResetError every time)."""
    import http.client

    body = json.dumps({"messages": [{"role": "user", "content": "a" * (MAX_BODY + 2**20)}]}).encode()
    for _ in range(2):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and openai_error(response.read())["code"] == "body_too_large"
        conn.close()
    assert post(server, {"messages": HI, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
     400),  # two lengths: a request-smuggling hazard behind a proxy
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),  # both framings: the same hazard
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 505),  # was served as HTTP/1.1
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),  # HTTP/2's preface: was a 404 for "PRI /*"
])
def test_what_the_http_parser_refuses_is_json_too(server, request_bytes, status):
    got, head, body = status_and_body(exchange(server, request_bytes))
    assert got == status and "application/json" in head
    assert openai_error(body)["code"] == "invalid_http_request"


def test_an_absolute_form_target_is_served_as_its_path(server):
    """RFC 9112: a server must accept ``GET http://host/path`` (was a 404 for "/http://x/health")."""
    for target in (b"http://x/health?x=1", b"HTTP://x:80/v1/models/demo"):
        got, _, body = status_and_body(exchange(server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
                                                b"Connection: close\r\n\r\n"))
        assert got == 200 and json.loads(body), target


def test_a_trailing_slash_names_the_same_endpoint(server):
    """``POST /v1/chat/completions/`` was a 307 with an empty body; ``GET /v1/models/`` a 404."""
    status, _, data = post(server, {"messages": HI, "max_tokens": 2}, CHAT + "/")
    assert status == 200 and json.loads(data)["object"] == "chat.completion"
    assert server.raw("GET", "/v1/models/")[1]["object"] == "list"


def test_health_counts_as_running_only_what_decodes(server):
    """Six requests on a server of --max-concurrency 4: 'running' never says more than 4 (it counted
    the queued ones too), 'waiting' has the rest, and both go back to 0."""
    import threading

    body = {"prompt": "1, 2, 3,", "max_tokens": 96, "decoder": "left-to-right"}
    threads = [threading.Thread(target=post, args=(server, body, "/v1/completions")) for _ in range(6)]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        health = server.health()
        seen.append((health["running"], health["waiting"]))
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert max(r for r, _ in seen) <= 4 and max(r + w for r, w in seen) >= 5, seen
    assert server.health()["running"] == 0 == server.health()["waiting"]


def test_keep_alive_serves_several_requests_on_one_connection(server):
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        for _ in range(3):
            s.sendall(one)
            data = b""
            while b"}" not in data:
                data += s.recv(4096)
            assert data.startswith(b"HTTP/1.1 200")


def test_cors_preflight_when_enabled(server):
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}
    status, headers, _ = server.request("OPTIONS", CHAT, headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    status, headers, _ = post(server, {"messages": HI, "max_tokens": 2}, headers={"Origin": CORS_ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == CORS_ORIGIN
    status, headers, data = server.request("OPTIONS", CHAT, headers={**preflight, "Origin": "http://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in headers and openai_error(data)["code"] == "cors"


def test_huge_stop_strings_are_matched_without_quadratic_work(server):
    """Four 200,000-character stop strings (one whose prefix the answer's tail may start): answered,
    streamed and whole, with the same text as without them."""
    body = {"messages": [{"role": "user", "content": "Count: 3, 6, 9"}], "max_tokens": 32}
    plain = json.loads(post(server, body)[2])["choices"][0]["message"]["content"]
    stops = ["x" * 200_000, plain[-3:] + "y" * 199_997, "\u00e9" * 200_000, "z" * 200_000]
    status, _, data = post(server, {**body, "stop": stops})
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == plain
    status, _, data = post(server, {**body, "stop": stops, "stream": True})
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == plain


def test_stop_overlap_is_the_longest_prefix_at_the_end():
    def naive(text, stop):
        return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)

    cases = [("abcab", "abd"), ("aaaa", "aaab"), ("xyz", "zq"), ("", "ab"), ("abc", "c"), ("abab", "ababc"),
             ("hello wor", "world"), ("aab", "abab")]
    for text, stop in cases:
        assert stop_overlap(text, stop) == naive(text, stop), (text, stop)


def test_a_non_streaming_client_that_leaves_frees_its_sequence(server):
    before = server.health()["disconnected"]
    body = json.dumps({"prompt": "1, 2, 3,", "max_tokens": 480, "decoder": "left-to-right"}).encode()
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while server.health()["running"] == 0 and time.time() < deadline:  # decoding has begun
            time.sleep(0.02)
    health = server.health_after_disconnect(before)
    assert health["disconnected"] == before + 1 and health["running"] == 0


def test_clients_leaving_leave_no_traceback_and_the_server_serves_on(server):
    body = json.dumps({"messages": HI, "max_tokens": 64, "stream": True}).encode()
    for _ in range(5):
        with socket.create_connection((server.host, server.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            s.recv(100)
    status, _, data = post(server, {"messages": HI, "max_tokens": 4})
    assert status == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"
