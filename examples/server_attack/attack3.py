import sys, json, time, gzip, threading
sys.argv = [sys.argv[0], sys.argv[1], sys.argv[2]]
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import attack as A
from attack import case, req, raw, parse_raw, is_oai_error, expect_ok, expect_error, HI, CHAT, COMP
A.BASE = A.normal()[1]
def j(st_h_d): return json.loads(st_h_d[2])
def stream_text(d, idx=0):
    t = ""
    for line in d.decode().split("\n\n"):
        if line.startswith("data: {"):
            for ch in json.loads(line[6:])["choices"]:
                if ch["index"] == idx: t += (ch.get("delta", {}).get("content") if "delta" in ch else ch.get("text")) or ""
    return t
def stop_stream_eq():
    full = j(req("POST", CHAT, {"messages": HI, "max_tokens": 16}))["choices"][0]["message"]["content"]
    s = full[5:8]
    w = j(req("POST", CHAT, {"messages": HI, "max_tokens": 16, "stop": [s]}))["choices"][0]["message"]["content"]
    st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 16, "stop": [s], "stream": True})
    t = stream_text(d)
    return t == w == full[:full.index(s)], f"{full!r} stop={s!r} whole={w!r} stream={t!r}"
case("stop streamed == whole (no partial stop leaked)", "equal, cut")(stop_stream_eq)
def stop_at_start():
    full = j(req("POST", CHAT, {"messages": HI, "max_tokens": 16}))["choices"][0]["message"]["content"]
    r = j(req("POST", CHAT, {"messages": HI, "max_tokens": 16, "stop": full[:3]}))
    c = r["choices"][0]
    return c["message"]["content"] == "" and c["finish_reason"] == "stop", f"{c} {r['usage']}"
case("stop matching at the very start", "'' finish stop")(stop_at_start)
case("max_tokens=1", "1 token")(lambda: expect_ok({"messages": HI, "max_tokens": 1}, check=lambda r: r["usage"]["completion_tokens"] == 1))
case("content with NUL, emoji, RTL", "200")(lambda: expect_ok({"messages": [{"role": "user", "content": "a\u0000b 😀 שלום \u202e"}], "max_tokens": 4}))
case("1000 tiny messages", "200 or 400 context_length_exceeded")(lambda: (lambda r: (r[0] == 200 or (r[0] == 400 and is_oai_error(r[2])[1]["code"] == "context_length_exceeded"), f"{r[0]} {r[2][:150]}"))(req("POST", CHAT, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 500 + HI, "max_tokens": 4})))
case("message with name", "200")(lambda: expect_ok({"messages": [{"role": "user", "content": "hi", "name": "bob"}], "max_tokens": 4}))
case("gzip Content-Encoding body", "400 JSON (or 200)")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(req("POST", CHAT, gzip.compress(json.dumps({"messages": HI, "max_tokens": 4}).encode()), {"Content-Encoding": "gzip"})))
case("UTF-16 body", "200 or 400 JSON")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(req("POST", CHAT, json.dumps({"messages": HI, "max_tokens": 4}).encode("utf-16"))))
case("query string on POST", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4}, CHAT + "?api-version=2024"))
case("trailing slash POST /v1/chat/completions/", "200 or 404 JSON (not an HTML/empty redirect)")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[1].get('location')} {r[2][:120]}"))(req("POST", CHAT + "/", {"messages": HI, "max_tokens": 4})))
case("trailing slash GET /v1/models/", "200 or 404 JSON")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[1].get('location')} {r[2][:120]}"))(req("GET", "/v1/models/")))
case("double slash //v1/models", "200 or 404 JSON")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(parse_raw(raw(b"GET //v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))))
case("lowercase method 'get'", "405/400/501 JSON")(lambda: (lambda r: (r[0] >= 400 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(parse_raw(raw(b"get /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))))
case("method TRACE", "405 JSON")(lambda: (lambda r: (r[0] == 405 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(req("TRACE", "/health")))
case("method CONNECT", "4xx JSON")(lambda: (lambda r: (r[0] >= 400 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(parse_raw(raw(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n"))))
case("long method 5000 chars", "4xx JSON")(lambda: (lambda r: (r[0] >= 400 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(parse_raw(raw(b"A" * 5000 + b" /health HTTP/1.1\r\nHost: x\r\n\r\n"))))
case("Upgrade: websocket", "200 or 4xx JSON, no crash")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(parse_raw(raw(b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", timeout=6))))
case("Upgrade: h2c", "200 (ignored)")(lambda: (lambda r: (r[0] == 200, f"{r[0]} {r[2][:80]}"))(parse_raw(raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", timeout=6))))
case("chat with 'prompt' field", "400 unrecognized prompt")(lambda: expect_error(400, {"messages": HI, "prompt": "x"}, param="prompt"))
case("3000 token ids", "400 context_length_exceeded")(lambda: expect_error(400, {"prompt": [1] * 3000}, COMP, code="context_length_exceeded"))
case("prompt ['a'] list of one", "200")(lambda: expect_ok({"prompt": ["Once"], "max_tokens": 4}, COMP))
for k, v in [("max_tokens", None), ("n", None), ("stream", None), ("logit_bias", None), ("stop", []), ("user", ""), ("temperature", 1), ("seed", None), ("tool_choice", "auto"), ("tools", [])]:
    case(f"neutral2 {k}={json.dumps(v)}", "200")(lambda k=k, v=v: expect_ok({"messages": HI, "max_tokens": 4, k: v} if k != "max_tokens" else {"messages": HI, k: v}))
def n2_lp():
    r = j(req("POST", CHAT, {"messages": HI, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 1}))
    return all(c["logprobs"] and len(c["logprobs"]["content"]) >= 1 for c in r["choices"]) and r["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in r["choices"]), r["usage"]
case("n=2 + logprobs", "each choice has its logprobs; usage sums both")(n2_lp)
def n2_stream_usage():
    st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 4, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    ev = [json.loads(l[6:]) for l in d.decode().split("\n\n") if l.startswith("data: {")]
    u = ev[-1].get("usage")
    return u is not None and ev[-1]["choices"] == [] and u["completion_tokens"] == 8, u
case("n=2 stream include_usage", "usage sums both choices")(n2_stream_usage)
def comp_stream_shape():
    st, _, d = req("POST", COMP, {"prompt": "Once", "max_tokens": 4, "stream": True})
    ev = [json.loads(l[6:]) for l in d.decode().split("\n\n") if l.startswith("data: {")]
    ok = all(e["object"] == "text_completion" and set(e["choices"][0]) >= {"index", "text", "finish_reason", "logprobs"} for e in ev)
    return ok and ev[-1]["choices"][0]["finish_reason"] in ("length", "stop") and d.endswith(b"data: [DONE]\n\n"), ev[-1]
case("completions stream chunk shape", "text_completion chunks, finish, [DONE]")(comp_stream_shape)
def chat_stream_shape():
    st, h, d = req("POST", CHAT, {"messages": HI, "max_tokens": 4, "stream": True})
    ev = [json.loads(l[6:]) for l in d.decode().split("\n\n") if l.startswith("data: {")]
    ok = h["content-type"].startswith("text/event-stream") and ev[0]["choices"][0]["delta"].get("role") == "assistant"
    ok &= all(e["object"] == "chat.completion.chunk" and e["id"] == ev[0]["id"] for e in ev)
    return ok and ev[-1]["choices"][0]["finish_reason"] == "length", h["content-type"]
case("chat stream chunk shape", "role first, same id, finish last")(chat_stream_shape)
def whole_shape():
    r = j(req("POST", CHAT, {"messages": HI, "max_tokens": 4}))
    return set(r) >= {"id", "object", "created", "model", "choices", "usage"} and r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-"), list(r)
case("chat whole shape", "OpenAI fields")(whole_shape)
def many_keepalive_429():
    out = []
    def one():
        st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 8, "n": 4}, timeout=120); out.append((st, d))
    ts = [threading.Thread(target=one) for _ in range(6)]
    [t.start() for t in ts]; [t.join() for t in ts]
    sts = [s for s, _ in out]
    return set(sts) <= {200, 429} and all(len(json.loads(d)["choices"]) == 4 for s, d in out if s == 200) and all(is_oai_error(d)[0] for s, d in out if s == 429), sts
case("6 x n=4 against queue 6", "200 (4 choices) or 429 JSON, all-or-nothing")(many_keepalive_429)
npass = sum(r[3] for r in A.RESULTS)
print(f"\nTOTAL {len(A.RESULTS)} cases: {npass} passed, {len(A.RESULTS) - npass} failed")
json.dump(A.RESULTS, open("/tmp/results3.json", "w"), indent=1)
