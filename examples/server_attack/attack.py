"""Hostile-client and frontend table against a running refusion_mlx server (loopback)."""
import http.client, json, socket, sys, threading, time, os, signal, subprocess
import openai

HOST = "127.0.0.1"
PORT = int(sys.argv[1]); ERR = sys.argv[2]
HI = [{"role": "user", "content": "hi"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
RESULTS = []
BASE = None
err_pos = 0

def req(method, path, body=None, headers=None, timeout=60, port=None):
    conn = http.client.HTTPConnection(HOST, port or PORT, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse(); data = r.read(); conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data

def raw(data, timeout=15, port=None, half_close=False):
    with socket.create_connection((HOST, port or PORT), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try: c = s.recv(65536)
            except (socket.timeout, ConnectionResetError): break
            if not c: break
            out += c
    return out

def parse_raw(out):
    head, _, body = out.partition(b"\r\n\r\n")
    try: st = int(head.split(b" ")[1])
    except Exception: st = None
    return st, head.decode("latin-1").lower(), body

def is_oai_error(data):
    try:
        e = json.loads(data)["error"]
        return set(e) == {"message", "type", "param", "code"} and bool(e["message"]), e
    except Exception:
        return False, None

def normal():
    st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 8})
    return st, (json.loads(d)["choices"][0]["message"]["content"] if st == 200 else d)

def healthy():
    global err_pos
    try:
        st, text = normal()
        ok = st == 200 and text == BASE
        hs, _, hd = req("GET", "/health")
        h = json.loads(hd)
    except Exception as e:
        return False, f"health fail {e!r}"
    with open(ERR, errors="replace") as f:
        f.seek(err_pos); new = f.read(); err_pos = f.tell()
    tb = "Traceback" in new
    note = ""
    if new.strip(): note = "stderr: " + new.strip().replace("\n", " | ")[:300]
    return ok and not tb and hs == 200, note + (f" health={h}" if not ok else "")

def case(name, expected):
    def deco(fn):
        t0 = time.time()
        try:
            passed, actual = fn()
        except Exception as e:
            passed, actual = False, f"EXC {type(e).__name__}: {e}"[:300]
        dt = time.time() - t0
        alive, note = healthy()
        if not alive: passed = False
        RESULTS.append((name, expected, str(actual)[:300], passed, alive, note, dt))
        print(f"{'PASS' if passed else 'FAIL'} {name} ({dt:.1f}s) | exp: {expected} | act: {str(actual)[:200]} | {'' if alive else 'UNHEALTHY '}{note}", flush=True)
        return fn
    return deco

def expect_error(status, body, path=CHAT, param=None, headers=None, code=None):
    st, h, d = req("POST", path, body, headers)
    ok, e = is_oai_error(d)
    good = st == status and ok and (param is None or e["param"] == param) and (code is None or e["code"] == code)
    return good, f"{st} {e if e else d[:150]}"

def expect_ok(body, path=CHAT, check=None):
    st, h, d = req("POST", path, body)
    if st != 200: return False, f"{st} {d[:200]}"
    j = json.loads(d)
    if check:
        r = check(j)
        return bool(r), f"200 check={r} {json.dumps(j)[:150]}"
    return True, f"200 {json.dumps(j)[:150]}"

def main():
    global BASE
    BASE = normal()[1]
    print("baseline:", repr(BASE))
    # ---------- bounds before work ----------
    for knobs, param in [(dict(max_tokens=8, slot_size=1, blocks=10**9), "slot_size"),
                         (dict(max_tokens=8, slot_size=10**6), "slot_size"),
                         (dict(slot_size=2048, blocks=128), "slot_size"),
                         (dict(max_tokens=10**30), "messages"),
                         (dict(max_tokens=100000), "messages"),
                         (dict(n=10**6), "n"), (dict(n=5), "n"),
                         (dict(blocks=-1), "blocks"), (dict(slot_size=0), "slot_size")]:
        case(f"bounds {knobs}", f"400 param={param}")(lambda: expect_error(400, {"messages": HI, **knobs}, param=param))
    # plan_slots only narrows which slots a plan drafts: any large value allocates nothing.
    case("plan_slots 10**9", "200")(lambda: expect_ok({"messages": HI, "plan_slots": 10**9, "max_tokens": 8}))
    big = "ab " * 1_300_000
    case("3.9MB chat prompt", "400 context_length_exceeded fast")(lambda: (lambda t0: (lambda r: (r[0] and time.time()-t0 < 3, r[1]))(expect_error(400, {"messages": [{"role": "user", "content": big}]}, code="context_length_exceeded")))(time.time()))
    case("3.9MB completions prompt", "400 context_length_exceeded")(lambda: expect_error(400, {"prompt": big}, COMP, code="context_length_exceeded"))
    case("3.9MB prompt as many messages", "400")(lambda: expect_error(400, {"messages": [{"role": "user", "content": "ab " * 1000}] * 1300}))
    case("prompt of 3000 token ids", "400 context_length_exceeded")(lambda: expect_error(400, {"prompt": [1] * 3000}, COMP, code="context_length_exceeded"))
    case("prompt token id out of vocab", "400 param=prompt")(lambda: expect_error(400, {"prompt": [10**9]}, COMP, param="prompt"))
    case("prompt token id negative", "400 param=prompt")(lambda: expect_error(400, {"prompt": [-5]}, COMP, param="prompt"))
    case("prompt token id 2**70", "400 param=prompt")(lambda: expect_error(400, {"prompt": [2**70]}, COMP, param="prompt"))
    case("prompt list of token lists [[1,2]]", "200 or 400 naming prompt")(lambda: (lambda st_d: (st_d[0] == 200 or (st_d[0] == 400 and is_oai_error(st_d[2])[0]), f"{st_d[0]} {st_d[2][:150]}"))(req("POST", COMP, {"prompt": [[1, 2]], "max_tokens": 4})))
    case("Content-Length 50MB", "413 JSON")(lambda: (lambda r: (r[0] == 413 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:120]}"))(parse_raw(raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{"))))
    case("5MB real body", "413 JSON")(lambda: expect_error(413, b'{"messages": [], "x": "' + b"a" * 5_000_000 + b'"}'))
    def chunked_big():
        with socket.create_connection((HOST, PORT), timeout=20) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"a" * 65536
            out = b""
            try:
                for _ in range(80):
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                while True:
                    c = s.recv(65536)
                    if not c: break
                    out += c
            except Exception: pass
        st, h, b = parse_raw(out)
        return st == 413 and is_oai_error(b)[0], f"{st} {b[:120]}"
    case("chunked body over 4MB", "413 JSON")(chunked_big)
    # ---------- malformed JSON ----------
    for name, body in [("nested [ 100000", b"[" * 100000 + b"]" * 100000),
                       ("nested { 100000 in messages", b'{"messages": ' + b'{"a":' * 100000 + b'1' + b'}' * 100000 + b'}'),
                       ("nested 900 inside content", b'{"messages": [{"role": "user", "content": ' + b"[" * 900 + b"]" * 900 + b"}]}"),
                       ("max_tokens 5000 digits", b'{"messages": [{"role":"user","content":"hi"}], "max_tokens": ' + b"9" * 5000 + b"}"),
                       ("NaN", b'{"messages": [{"role":"user","content":"hi"}], "temperature": NaN}'),
                       ("-Infinity", b'{"messages": [{"role":"user","content":"hi"}], "top_p": -Infinity}'),
                       ("1e999", b'{"messages": [{"role":"user","content":"hi"}], "temperature": 1e999}'),
                       ("surrogate chat", b'{"messages": [{"role":"user","content":"a\\ud800b"}]}'),
                       ("surrogate completions", b'{"prompt": "a\\ud800b"}'),
                       ("surrogate in key", b'{"messages": [{"role":"user","content":"hi"}], "\\udc00": 1}'),
                       ("surrogate in stop", b'{"messages": [{"role":"user","content":"hi"}], "stop": "\\udfff"}'),
                       ("surrogate in model", b'{"messages": [{"role":"user","content":"hi"}], "model": "\\ud800"}'),
                       ("bad utf-8", b'\xff\xfe{}'), ("bad utf-8 in string", b'{"prompt": "\xc3\x28"}'),
                       ("garbage", b"hello world"), ("empty body", b""), ("JSON array", b"[1,2]"),
                       ("JSON string", b'"hi"'), ("JSON null", b"null"), ("truncated JSON", b'{"messages": [')]:
        p = COMP if "completions" in name or b'"prompt"' in body else CHAT
        case(f"json: {name}", "400 JSON error")(lambda body=body, p=p: expect_error(400, body, p))
    # A 5000-digit fraction is valid JSON and a valid temperature (just under 1).
    case("json: float 5000 digits", "200")(lambda: expect_ok(b'{"messages": [{"role":"user","content":"hi"}], "max_tokens": 4, "temperature": 0.' + b"9" * 5000 + b"}"))
    case("json: duplicate keys (last wins)", "200")(lambda: (lambda r: (r[0] == 200, f"{r[0]} {r[2][:100]}"))(req("POST", CHAT, b'{"max_tokens": 99999, "messages": [{"role":"user","content":"hi"}], "max_tokens": 4}')))
    case("json: UTF-8 BOM", "200 or 400 JSON")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:100]}"))(req("POST", CHAT, b'\xef\xbb\xbf{"max_tokens": 4, "messages": [{"role":"user","content":"hi"}]}')))
    # ---------- wrong types for every field ----------
    wrong = [("model", 5), ("messages", "hi"), ("messages", []), ("messages", [{"role": "bogus", "content": "x"}]),
             ("messages", [{"content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
             ("messages", [{"role": "user", "content": "x", "extra": 1}]), ("messages", ["hi"]),
             ("max_tokens", "8"), ("max_tokens", 8.5), ("max_tokens", True), ("max_tokens", 0), ("max_tokens", -1),
             ("max_completion_tokens", "x"), ("temperature", "1"), ("temperature", -1), ("temperature", [1]),
             ("top_p", "x"), ("top_p", 0), ("top_p", 1.5), ("top_k", "3"), ("top_k", -2), ("min_p", 2),
             ("n", True), ("n", 0), ("n", 1.5), ("seed", "1"), ("seed", 1.5), ("seed", -1), ("seed", 2**64), ("seed", 2**100),
             ("stop", 5), ("stop", [1]), ("stop", ["a"] * 5), ("stop", ""), ("stop", {"a": 1}),
             ("stream", "yes"), ("stream", 1), ("stream_options", 5), ("stream_options", {"foo": 1}),
             ("logprobs", 1), ("logprobs", "true"), ("top_logprobs", "2"), ("top_logprobs", 21), ("top_logprobs", -1),
             ("response_format", "json"), ("response_format", {"type": "json_object"}), ("tools", {}),
             ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"), ("tool_choice", 5),
             ("parallel_tool_calls", "yes"), ("store", "no"), ("user", 5), ("presence_penalty", "0"), ("presence_penalty", 0.5),
             ("frequency_penalty", 3), ("frequency_penalty", 0.5), ("logit_bias", []), ("logit_bias", {"1": 5}),
             ("repetition_penalty", 1.2), ("slot_size", "4"), ("blocks", 1.5), ("preset", 5), ("preset", "nope"),
             ("decoder", "x"), ("slot_threshold", 2), ("token_threshold", "x"), ("plan_slots", -1),
             ("chat_template_kwargs", {"evil": 1}), ("modalities", ["audio"]), ("foo", 1), ("metadata", "x")]
    for field, value in wrong:
        param = "messages" if field == "messages" else field
        if field == "foo": param = "foo"
        case(f"wrong {field}={json.dumps(value)[:30]}", f"400 param={param}")(
            lambda field=field, value=value, param=param: expect_error(400, {"messages": HI, "max_tokens": 4, field: value}, param=param))
    wrongc = [("prompt", {}), ("prompt", 5), ("prompt", ""), ("prompt", []), ("prompt", ["a", "b"]), ("prompt", None),
              ("echo", "y"), ("logprobs", True), ("logprobs", 21), ("logprobs", -1), ("best_of", 3), ("suffix", "x"),
              ("messages", HI)]
    for field, value in wrongc:
        body = {"prompt": "hi", "max_tokens": 4, field: value}
        if field == "prompt" and value is None: body.pop("prompt")
        case(f"completions wrong {field}={json.dumps(value)[:30]}", f"400 param={field}")(
            lambda body=body, field=field: expect_error(400, body, COMP, param=field))
    # ---------- neutral values accepted ----------
    neutral = dict(top_p=1, frequency_penalty=0, presence_penalty=0, logprobs=False, response_format={"type": "text"},
                   tools=None, tool_choice="none", parallel_tool_calls=True, store=False, user="u", metadata={"a": "b"},
                   logit_bias={}, n=1, stream=False, service_tier="auto", stop=None, seed=0, top_k=-1, min_p=0.0,
                   repetition_penalty=1.0, modalities=["text"], top_logprobs=None)
    for k, v in neutral.items():
        case(f"neutral {k}={json.dumps(v)}", "200")(lambda k=k, v=v: expect_ok({"messages": HI, "max_tokens": 4, k: v}))
    case("all neutral at once", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4, **neutral, "tools": []}))
    case("completions neutral echo=false, suffix=null, best_of=1, logprobs=null", "200")(lambda: expect_ok({"prompt": "hi", "max_tokens": 4, "echo": False, "suffix": None, "best_of": 1, "logprobs": None}, COMP))
    case("seed 2**64-1", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "seed": 2**64 - 1, "temperature": 1}))
    case("seed 2**64-1 with n=2 (seed+1 overflows)", "400 seed or 200")(lambda: (lambda r: (r[0] in (200, 400) and (r[0] == 200 or is_oai_error(r[2])[1]["param"] == "seed"), f"{r[0]} {r[2][:150]}"))(req("POST", CHAT, {"messages": HI, "max_tokens": 4, "seed": 2**64 - 1, "n": 2})))
    case("temperature 2 (OpenAI max)", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "temperature": 2}))
    case("temperature 1e308", "400 (OpenAI: temperature <= 2) or 200")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:150]}"))(req("POST", CHAT, {"messages": HI, "max_tokens": 4, "temperature": 1e308})))
    # ---------- frontends ----------
    case("role developer", "200")(lambda: expect_ok({"messages": [{"role": "developer", "content": "be brief"}] + HI, "max_tokens": 4}))
    case("role tool + assistant null content with tool_calls", "200")(lambda: expect_ok({"messages": HI + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}], "max_tokens": 4}))
    case("content list of text parts", "200 same as string")(lambda: expect_ok({"messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}], "max_tokens": 8}, check=lambda j: j["choices"][0]["message"]["content"] == BASE))
    case("content image part", "400 messages")(lambda: expect_error(400, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, param="messages"))
    case("user content null", "200 or 400 JSON")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:150]}"))(req("POST", CHAT, {"messages": [{"role": "user", "content": None}], "max_tokens": 4})))
    case("system only", "200")(lambda: expect_ok({"messages": [{"role": "system", "content": "x"}], "max_tokens": 4}))
    case("n=2", "200 2 choices idx 0,1")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "n": 2}, check=lambda j: [c["index"] for c in j["choices"]] == [0, 1]))
    case("max_completion_tokens=3", "200 completion_tokens<=3")(lambda: expect_ok({"messages": HI, "max_completion_tokens": 3}, check=lambda j: j["usage"]["completion_tokens"] <= 3))
    case("max_tokens=8 + max_completion_tokens=3", "200 completion_tokens<=3")(lambda: expect_ok({"messages": HI, "max_tokens": 8, "max_completion_tokens": 3}, check=lambda j: j["usage"]["completion_tokens"] <= 3))
    case("model alias default_model", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "model": "default_model"}))
    case("model DEMO (case)", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "model": "DEMO"}))
    case("model gpt-4o", "404 model_not_found")(lambda: expect_error(404, {"messages": HI, "model": "gpt-4o"}, param="model", code="model_not_found"))
    case("model null", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "model": None}))
    # stop strings
    def stop_case():
        full = json.loads(req("POST", CHAT, {"messages": HI, "max_tokens": 16})[2])
        text = full["choices"][0]["message"]["content"]
        s = text[len(text)//2: len(text)//2 + 2]
        j = json.loads(req("POST", CHAT, {"messages": HI, "max_tokens": 16, "stop": s})[2])
        t2 = j["choices"][0]["message"]["content"]
        ok = t2 == text[:text.index(s)] and j["choices"][0]["finish_reason"] == "stop" and j["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
        return ok, f"full={text!r} stop={s!r} got={t2!r} fr={j['choices'][0]['finish_reason']} usage={j['usage']['completion_tokens']}/{full['usage']['completion_tokens']}"
    case("stop string cuts and usage counts returned", "text cut before stop, finish stop")(stop_case)
    case("4 stop strings of 200k chars", "200 quickly")(lambda: (lambda t0: (lambda r: (r[0] and time.time() - t0 < 10, r[1] + f" {time.time()-t0:.1f}s"))(expect_ok({"messages": HI, "max_tokens": 16, "stop": ["x" * 200000 + str(i) for i in range(4)]})))(time.time()))
    case("4 stop strings of 200k chars streamed", "200")(lambda: (lambda r: (r[0] == 200 and r[2].endswith(b"data: [DONE]\n\n"), f"{r[0]} {r[2][-60:]}"))(req("POST", CHAT, {"messages": HI, "max_tokens": 16, "stream": True, "stop": ["y" * 200000 + str(i) for i in range(4)]})))
    case("stop with unicode/emoji", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 8, "stop": ["😀", "\u0000"]}))
    # logprobs shapes
    def chat_lp(top):
        st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 8, "logprobs": True, "top_logprobs": top})
        j = json.loads(d); c = j["choices"][0]; lp = c["logprobs"]
        ents = lp["content"]
        ok = set(lp) >= {"content"} and all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in ents)
        ok &= all(len(e["top_logprobs"]) == top for e in ents)
        ok &= all(e["logprob"] <= 0 for e in ents)
        ok &= all(all(t["logprob"] <= 0 and set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"]) for e in ents)
        ok &= all([t["logprob"] for t in e["top_logprobs"]] == sorted([t["logprob"] for t in e["top_logprobs"]], reverse=True) for e in ents)
        ok &= "".join(e["token"] for e in ents) == c["message"]["content"]
        ok &= len(ents) == j["usage"]["completion_tokens"] or c["finish_reason"] == "stop"
        ok &= all(bytes(e["bytes"]).decode("utf-8", "replace") == e["token"] or True for e in ents)
        return ok, f"{len(ents)} entries, usage {j['usage']['completion_tokens']}, first {json.dumps(ents[0])[:150] if ents else None}"
    case("chat logprobs top 3 shape", "content[] entries with token/logprob/bytes/top_logprobs(3), concat==text")(lambda: chat_lp(3))
    case("chat logprobs top 0 shape", "top_logprobs [] per entry")(lambda: chat_lp(0))
    case("chat logprobs top 20", "20 per entry")(lambda: chat_lp(20))
    case("chat logprobs false -> null", "logprobs null")(lambda: expect_ok({"messages": HI, "max_tokens": 4, "logprobs": False}, check=lambda j: j["choices"][0]["logprobs"] is None))
    case("chat top_logprobs without logprobs", "400 top_logprobs (OpenAI)")(lambda: expect_error(400, {"messages": HI, "top_logprobs": 2}, param="top_logprobs"))
    def comp_lp(k):
        st, _, d = req("POST", COMP, {"prompt": "Once upon", "max_tokens": 8, "logprobs": k})
        j = json.loads(d); c = j["choices"][0]; lp = c["logprobs"]
        n = len(lp["tokens"])
        ok = set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        ok &= len(lp["token_logprobs"]) == n == len(lp["top_logprobs"]) == len(lp["text_offset"])
        ok &= "".join(lp["tokens"]) == c["text"]
        ok &= all(k <= len(t) <= k + 1 for t in lp["top_logprobs"]) if k else True
        ok &= lp["text_offset"] == sorted(lp["text_offset"])
        off = 0; offs = []
        for t in lp["tokens"]: offs.append(off); off += len(t)
        ok &= offs == lp["text_offset"]
        return ok, f"n={n} offs={lp['text_offset']} top0={lp['top_logprobs'][0] if n else None}"
    case("completions logprobs=2 shape", "tokens/token_logprobs/top_logprobs(dicts)/text_offset consistent")(lambda: comp_lp(2))
    case("completions logprobs=0 shape", "consistent")(lambda: comp_lp(0))
    def stream_vs_whole_lp():
        b = {"messages": HI, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
        j = json.loads(req("POST", CHAT, b)[2])
        st, _, d = req("POST", CHAT, {**b, "stream": True})
        ents, text = [], ""
        for line in d.decode().split("\n\n"):
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"]
                if ch and ch[0].get("logprobs"): ents += ch[0]["logprobs"]["content"]
                if ch: text += ch[0]["delta"].get("content") or ""
        return ents == j["choices"][0]["logprobs"]["content"] and text == j["choices"][0]["message"]["content"], f"{len(ents)} vs {len(j['choices'][0]['logprobs']['content'])}"
    case("chat logprobs streamed == whole", "same entries")(stream_vs_whole_lp)
    def comp_stream_lp():
        b = {"prompt": "Once upon", "max_tokens": 8, "logprobs": 1}
        j = json.loads(req("POST", COMP, b)[2])
        st, _, d = req("POST", COMP, {**b, "stream": True})
        toks, offs = [], []
        for line in d.decode().split("\n\n"):
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"]
                if ch and ch[0].get("logprobs"):
                    toks += ch[0]["logprobs"]["tokens"]; offs += ch[0]["logprobs"]["text_offset"]
        w = j["choices"][0]["logprobs"]
        return toks == w["tokens"] and offs == w["text_offset"], f"{toks[:4]} {offs[:6]} vs {w['text_offset'][:6]}"
    case("completions logprobs streamed == whole", "same tokens/offsets")(comp_stream_lp)
    case("echo + logprobs completions", "400 logprobs (or 200 with prompt logprobs)")(lambda: expect_error(400, {"prompt": "hi", "echo": True, "logprobs": 1}, COMP, param="logprobs"))
    case("echo true", "text starts with prompt")(lambda: expect_ok({"prompt": "Once upon", "max_tokens": 4, "echo": True}, COMP, check=lambda j: j["choices"][0]["text"].startswith("Once upon")))
    case("stream_options include_usage", "last chunk usage, choices []")(lambda: (lambda r: (b'"choices": [], "usage"' in r[2] or b'"choices":[],"usage"' in r[2], r[2][-250:]))(req("POST", CHAT, {"messages": HI, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})))
    case("stream_options without stream", "400 stream_options (OpenAI) or 200")(lambda: (lambda r: (r[0] == 200 or is_oai_error(r[2])[0], f"{r[0]} {r[2][:150]}"))(req("POST", CHAT, {"messages": HI, "max_tokens": 4, "stream_options": {"include_usage": True}})))
    def n2_stream():
        st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 6, "n": 2, "stream": True, "seed": 1, "temperature": 1})
        texts = {0: "", 1: ""}; fin = {}
        for line in d.decode().split("\n\n"):
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    texts[ch["index"]] += ch["delta"].get("content") or ""
                    if ch["finish_reason"]: fin[ch["index"]] = ch["finish_reason"]
        w = json.loads(req("POST", CHAT, {"messages": HI, "max_tokens": 6, "n": 2, "seed": 1, "temperature": 1})[2])
        return [texts[0], texts[1]] == [c["message"]["content"] for c in w["choices"]] and len(fin) == 2, f"{texts} {fin}"
    case("n=2 streamed == whole (seeded)", "equal, both finish")(n2_stream)
    # ---------- HTTP layer ----------
    for m in ("PUT", "DELETE", "PATCH"):
        case(f"{m} /v1/chat/completions", "405 JSON + Allow")(lambda m=m: (lambda r: (r[0] == 405 and is_oai_error(r[2])[0] and "allow" in r[1], f"{r[0]} allow={r[1].get('allow')} {r[2][:80]}"))(req(m, CHAT, b"{}")))
    case("OPTIONS without CORS", "405 JSON or 204, no ACAO")(lambda: (lambda r: (r[0] in (204, 405) and "access-control-allow-origin" not in r[1], f"{r[0]} {r[1]}"))(req("OPTIONS", CHAT, None, {"Origin": "http://evil", "Access-Control-Request-Method": "POST"})))
    case("HEAD /v1/models", "200 no body")(lambda: (lambda r: (r[0] == 200 and r[2] == b"", f"{r[0]} {r[2][:50]}"))(req("HEAD", "/v1/models")))
    case("HEAD /health", "200")(lambda: (lambda r: (r[0] == 200, f"{r[0]}"))(req("HEAD", "/health")))
    case("GET /health?x=1", "200")(lambda: (lambda r: (r[0] == 200, f"{r[0]} {r[2][:80]}"))(req("GET", "/health?x=1")))
    case("GET /v1/nope", "404 JSON")(lambda: (lambda r: (r[0] == 404 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:100]}"))(req("GET", "/v1/nope")))
    case("GET /v1/chat/completions", "405 JSON")(lambda: (lambda r: (r[0] == 405 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:100]}"))(req("GET", CHAT)))
    case("POST /chat/completions (no /v1)", "200")(lambda: expect_ok({"messages": HI, "max_tokens": 4}, "/chat/completions"))
    case("POST /completions (no /v1)", "200")(lambda: expect_ok({"prompt": "hi", "max_tokens": 4}, "/completions"))
    case("GET /models", "200 list")(lambda: (lambda r: (r[0] == 200 and json.loads(r[2])["object"] == "list", f"{r[0]} {r[2][:100]}"))(req("GET", "/models")))
    case("GET /v1/models/demo", "200 model card")(lambda: (lambda r: (r[0] == 200 and json.loads(r[2])["id"] == "demo", f"{r[0]} {r[2][:100]}"))(req("GET", "/v1/models/demo")))
    case("GET /v1/models/default_model", "200")(lambda: (lambda r: (r[0] == 200, f"{r[0]} {r[2][:100]}"))(req("GET", "/v1/models/default_model")))
    case("GET /v1/models/nope", "404 model_not_found")(lambda: (lambda r: (r[0] == 404 and is_oai_error(r[2])[1]["code"] == "model_not_found", f"{r[0]} {r[2][:100]}"))(req("GET", "/v1/models/nope")))
    case("GET /v1/models/../../etc/passwd", "404 JSON")(lambda: (lambda r: (r[0] == 404 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:100]}"))(parse_raw(raw(b"GET /v1/models/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))))
    case("GET /v1/models/%00%ff", "404 JSON")(lambda: (lambda r: (r[0] == 404 and is_oai_error(r[2])[0], f"{r[0]} {r[2][:100]}"))(parse_raw(raw(b"GET /v1/models/%00%ff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))))
    case("no Server header", "absent")(lambda: (lambda r: ("server" not in r[1], f"{r[1]}"))(req("GET", "/health")))
    case("text/plain content-type", "200")(lambda: (lambda r: (r[0] == 200, f"{r[0]}"))(req("POST", CHAT, json.dumps({"messages": HI, "max_tokens": 4}).encode(), {"Content-Type": "text/plain"})))
    def rawcase(name, data, status, exp=None):
        def f():
            st, head, body = parse_raw(raw(data))
            ok = st == status and (is_oai_error(body)[0] if status >= 400 else True)
            return ok, f"{st} {body[:120]}"
        case(name, exp or f"{status} JSON")(f)
    body = json.dumps({"messages": HI, "max_tokens": 4}).encode()
    rawcase("duplicate different Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(body) + body, 400)
    rawcase("duplicate same Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body)) + body, 200, "200 (RFC allows identical) or 400")
    rawcase("TE chunked + CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400)
    rawcase("TE gzip (unsupported)", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "501 or 400 JSON")
    rawcase("bad chunk size", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400)
    rawcase("CL negative", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400)
    rawcase("CL non-numeric", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400)
    rawcase("CL with plus sign", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400)
    rawcase("garbage request line", b"HELLO\r\n\r\n", 400)
    rawcase("binary garbage", bytes(range(256)) * 4 + b"\r\n\r\n", 400)
    rawcase("414 long target", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414)
    rawcase("431 big header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 40000 + b"\r\n\r\n", 431)
    rawcase("431 many headers", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(4000)) + b"\r\n", 431)
    rawcase("header without colon", b"GET /health HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", 400)
    rawcase("no Host HTTP/1.1", b"GET /health HTTP/1.1\r\n\r\n", 400)
    rawcase("HTTP/1.0 GET", b"GET /health HTTP/1.0\r\n\r\n", 200, "200 and close")
    rawcase("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505)
    rawcase("HTTP/9.9", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 505)
    rawcase("absolute-form target", b"GET http://x/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200, "200 or 4xx JSON")
    rawcase("obs-fold header (unfolded, as RFC 7230 allows)", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n", 200, "200")
    rawcase("bare LF line endings", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n", 200, "200 (h11 tolerates) or 400 JSON")
    rawcase("NUL in header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400)
    def expect100():
        with socket.create_connection((HOST, PORT), timeout=20) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            first = s.recv(100)
            s.sendall(body)
            out = first
            while True:
                c = s.recv(65536)
                if not c: break
                out += c
        return out.startswith(b"HTTP/1.1 100") and b"200 OK" in out, out[:60]
    case("Expect: 100-continue", "100 then 200")(expect100)
    def keepalive():
        conn = http.client.HTTPConnection(HOST, PORT, timeout=20)
        sts = []
        for _ in range(3):
            conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse(); r.read(); sts.append(r.status)
        conn.close()
        return sts == [200] * 3, sts
    case("keep-alive 3 requests one connection", "200 x3")(keepalive)
    def pipelined():
        one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        out = raw(one * 3 + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return out.count(b"HTTP/1.1 200") == 4, out.count(b"HTTP/1.1 200")
    case("pipelined 4 requests", "4 x 200")(pipelined)
    # ---------- disconnects / slow / idle ----------
    def leave_mid_stream():
        for _ in range(5):
            s = socket.create_connection((HOST, PORT), timeout=20)
            b = json.dumps({"messages": HI, "max_tokens": 64, "stream": True}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
            s.recv(200); s.close()
        time.sleep(2)
        h = json.loads(req("GET", "/health")[2])
        return h["running"] == 0, h
    case("5 clients leave mid-stream", "sequences freed, no traceback")(leave_mid_stream)
    def leave_mid_whole():
        before = json.loads(req("GET", "/health")[2])["disconnected"]
        s = socket.create_connection((HOST, PORT), timeout=20)
        b = json.dumps({"messages": HI, "max_tokens": 400, "slot_size": 4, "blocks": 1}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
        time.sleep(0.3); s.close(); time.sleep(2)
        h = json.loads(req("GET", "/health")[2])
        return h["running"] == 0 and h["disconnected"] > before, h
    case("client leaves mid non-stream", "cancelled (disconnected++), running 0")(leave_mid_whole)
    def leave_mid_body():
        s = socket.create_connection((HOST, PORT), timeout=20)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
        time.sleep(0.3); s.close(); time.sleep(0.5)
        return True, "closed"
    case("client leaves mid-body", "no traceback")(leave_mid_body)
    def rst_mid_stream():
        import struct
        s = socket.create_connection((HOST, PORT), timeout=20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b = json.dumps({"messages": HI, "max_tokens": 64, "stream": True}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
        s.recv(100); s.close(); time.sleep(2)
        h = json.loads(req("GET", "/health")[2])
        return h["running"] == 0, h
    case("RST mid-stream", "freed, no traceback")(rst_mid_stream)
    def slowloris():
        s = socket.create_connection((HOST, PORT), timeout=30)
        t0 = time.time(); closed = None
        try:
            for ch in b"GET /health HTTP/1.1\r\nHost: x\r\nX-" + b"a" * 100:
                s.sendall(bytes([ch])); time.sleep(0.5)
                if time.time() - t0 > 20: break
        except (BrokenPipeError, ConnectionResetError):
            closed = time.time() - t0
        if closed is None:
            try:
                closed = time.time() - t0 if s.recv(10) == b"" else None
            except Exception: closed = time.time() - t0
        s.close()
        return closed is not None and closed < 15, f"closed after {closed}"
    case("slowloris head (1 byte/0.5s)", "closed within ~10s")(slowloris)
    def idle_many():
        socks = [socket.create_connection((HOST, PORT), timeout=30) for _ in range(300)]
        st, text = normal()
        t0 = time.time()
        for s in socks: s.settimeout(max(0.1, 15 - (time.time() - t0)))
        closed = 0
        for s in socks:
            try:
                if s.recv(10) == b"": closed += 1
            except Exception: pass
            s.close()
        return st == 200 and text == BASE and closed == 300, f"normal={st} closed {closed}/300 in {time.time()-t0:.1f}s"
    case("300 idle connections", "server answers; all closed by the head deadline")(idle_many)
    def slow_body():
        s = socket.create_connection((HOST, PORT), timeout=60)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        t0 = time.time(); out = b""
        try:
            while True:
                c = s.recv(4096)
                if not c: break
                out += c
        except Exception as e: out += repr(e).encode()
        s.close()
        st, h, b = parse_raw(out)
        return st == 408 and is_oai_error(b)[0] and time.time() - t0 < 40, f"{st} after {time.time()-t0:.0f}s {b[:80]}"
    case("body never completes", "408 JSON within ~30s")(slow_body)
    # ---------- concurrency ----------
    def flood():
        out = []
        def one():
            try:
                st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 8}, timeout=120)
                out.append((st, d))
            except Exception as e:
                out.append((None, repr(e).encode()))
        ts = [threading.Thread(target=one) for _ in range(40)]
        [t.start() for t in ts]; [t.join() for t in ts]
        sts = [s for s, _ in out]
        ok200 = all(json.loads(d)["choices"][0]["message"]["content"] == BASE for s, d in out if s == 200)
        ok429 = all(is_oai_error(d)[0] for s, d in out if s == 429)
        return len(out) == 40 and set(sts) <= {200, 429} and 429 in sts and ok200 and ok429, f"200x{sts.count(200)} 429x{sts.count(429)} other={[s for s in sts if s not in (200, 429)]} exact={ok200}"
    case("40 concurrent, queue 6 → 429s", "200 exact + 429 JSON, none lost")(flood)
    def flood_stream():
        out = []
        def one():
            try:
                st, _, d = req("POST", CHAT, {"messages": HI, "max_tokens": 8, "stream": True}, timeout=120)
                out.append((st, d))
            except Exception as e:
                out.append((None, repr(e).encode()))
        ts = [threading.Thread(target=one) for _ in range(20)]
        [t.start() for t in ts]; [t.join() for t in ts]
        sts = [s for s, _ in out]
        done = all(d.endswith(b"data: [DONE]\n\n") for s, d in out if s == 200)
        return set(sts) <= {200, 429} and done, f"200x{sts.count(200)} 429x{sts.count(429)} done={done}"
    case("20 concurrent streams", "200 [DONE] or 429")(flood_stream)
    # ---------- openai client ----------
    c = openai.OpenAI(base_url=f"http://{HOST}:{PORT}/v1", api_key="x", max_retries=0, timeout=60)
    case("openai chat whole", "200 text")(lambda: (lambda r: (r.choices[0].message.content == BASE, r.choices[0].message.content))(c.chat.completions.create(model="demo", messages=HI, max_tokens=8)))
    def oc_stream():
        parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="demo", messages=HI, max_tokens=8, stream=True, stream_options={"include_usage": True}) if ch.choices]
        return "".join(parts) == BASE, "".join(parts)
    case("openai chat stream", "same text")(oc_stream)
    case("openai chat frontend fields", "200")(lambda: (lambda r: (len(r.choices) == 2 and r.choices[0].logprobs.content is not None, r.choices[0].logprobs.content[0]))(c.chat.completions.create(model="demo", messages=[{"role": "developer", "content": "x"}] + HI, max_completion_tokens=6, n=2, top_p=1, frequency_penalty=0, presence_penalty=0, logprobs=True, top_logprobs=2, seed=3, temperature=0.7, response_format={"type": "text"}, parallel_tool_calls=True, store=False, user="u")))
    case("openai completions whole", "200")(lambda: (lambda r: (isinstance(r.choices[0].text, str) and r.usage.completion_tokens <= 6, r.choices[0].text))(c.completions.create(model="demo", prompt="Once upon", max_tokens=6, echo=False, logprobs=2)))
    def oc_cstream():
        t = "".join(ch.choices[0].text for ch in c.completions.create(model="demo", prompt="Once upon", max_tokens=6, stream=True) if ch.choices)
        w = c.completions.create(model="demo", prompt="Once upon", max_tokens=6).choices[0].text
        return t == w, f"{t!r} vs {w!r}"
    case("openai completions stream == whole", "equal")(oc_cstream)
    case("openai models.list", "[demo]")(lambda: (lambda r: ([m.id for m in r.data] == ["demo"], [m.id for m in r.data]))(c.models.list()))
    case("openai models.retrieve demo", "demo")(lambda: (lambda r: (r.id == "demo", r.id))(c.models.retrieve("demo")))
    def oc_404():
        try: c.models.retrieve("nope")
        except openai.NotFoundError as e: return e.body.get("code") == "model_not_found" if isinstance(e.body, dict) else True, repr(e)[:200]
        return False, "no error"
    case("openai models.retrieve nope", "NotFoundError")(oc_404)
    def oc_400():
        try: c.chat.completions.create(model="demo", messages=HI, response_format={"type": "json_object"})
        except openai.BadRequestError as e: return e.body.get("param") == "response_format", repr(e)[:200]
        return False, "no error"
    case("openai BadRequestError json_object", "param response_format")(oc_400)
    def oc_stream_err():
        try:
            list(c.chat.completions.create(model="demo", messages=HI, stream=True, slot_size=10**6) if False else c.chat.completions.create(model="demo", messages=HI, stream=True, extra_body={"slot_size": 10**6}))
        except openai.BadRequestError as e: return True, repr(e)[:200]
        return False, "no error"
    case("openai stream with bad knob", "BadRequestError before stream")(oc_stream_err)

    npass = sum(r[3] for r in RESULTS)
    print(f"\nTOTAL {len(RESULTS)} cases: {npass} passed, {len(RESULTS) - npass} failed")
    with open("/tmp/results.json", "w") as f: json.dump(RESULTS, f, indent=1)

if __name__ == "__main__":
    main()
