"""CORS, SIGTERM and path cases: each starts its own server."""
import http.client, json, os, signal, subprocess, sys, threading, time, socket
sys.path.insert(0, "tests")
from serving import Server
R = []
def rec(name, exp, ok, act):
    R.append((name, exp, str(act)[:300], ok)); print(("PASS" if ok else "FAIL"), name, "| exp:", exp, "| act:", str(act)[:250], flush=True)
HI = [{"role": "user", "content": "hi"}]
# CORS on
s = Server("--cors-origin", "http://app.example", "--max-concurrency", "2")
pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"}
st, h, d = s.request("OPTIONS", "/v1/chat/completions", None, pre)
rec("CORS preflight allowed origin", "200/204 + ACAO + methods + headers", st in (200, 204) and h.get("access-control-allow-origin") == "http://app.example" and "POST" in h.get("access-control-allow-methods", "") and "authorization" in h.get("access-control-allow-headers", "").lower(), f"{st} {h}")
st, h, d = s.request("OPTIONS", "/chat/completions", None, pre)
rec("CORS preflight on route without /v1", "200 + ACAO", st in (200, 204) and "access-control-allow-origin" in h, f"{st}")
st, h, d = s.request("OPTIONS", "/v1/chat/completions", None, {**pre, "Origin": "http://evil.example"})
ok = st == 400 and "access-control-allow-origin" not in h and json.loads(d)["error"]["message"]
rec("CORS preflight other origin", "400 JSON, no ACAO", bool(ok), f"{st} {h} {d[:120]}")
st, h, d = s.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 4}), {"Origin": "http://app.example", "Content-Type": "application/json"})
rec("CORS simple POST", "200 + ACAO", st == 200 and h.get("access-control-allow-origin") == "http://app.example", f"{st} {h.get('access-control-allow-origin')}")
st, h, d = s.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "stream": True, "max_tokens": 4}), {"Origin": "http://app.example", "Content-Type": "application/json"})
rec("CORS stream POST", "200 + ACAO", st == 200 and h.get("access-control-allow-origin") == "http://app.example", f"{st} {h.get('access-control-allow-origin')}")
st, h, d = s.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "slot_size": 10**6}), {"Origin": "http://app.example", "Content-Type": "application/json"})
rec("CORS on a 400 error", "400 + ACAO (browser can read error)", st == 400 and h.get("access-control-allow-origin") == "http://app.example", f"{st} {h.get('access-control-allow-origin')}")
st, h, d = s.request("GET", "/v1/nope", None, {"Origin": "http://app.example"})
rec("CORS on 404", "404 + ACAO", st == 404 and h.get("access-control-allow-origin") == "http://app.example", f"{st} {h.get('access-control-allow-origin')}")
st, h, d = s.request("OPTIONS", "/v1/models", None, {"Origin": "http://app.example", "Access-Control-Request-Method": "GET"})
rec("CORS preflight GET /v1/models", "200 + ACAO", st in (200, 204) and "access-control-allow-origin" in h, f"{st}")
# SIGTERM with streams in flight
outs = []
def stream():
    try:
        c = http.client.HTTPConnection(s.host, s.port, timeout=60)
        c.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 400, "stream": True}), {"Content-Type": "application/json"})
        r = c.getresponse(); outs.append((r.status, r.read()))
    except Exception as e:
        outs.append((None, repr(e).encode()))
ts = [threading.Thread(target=stream) for _ in range(6)]
[t.start() for t in ts]; time.sleep(1.5)
t0 = time.time()
code, err = s.stop(signal.SIGTERM)
dt = time.time() - t0
[t.join(30) for t in ts]
ends = [(st, d[-80:]) for st, d in outs]
# every stream ends with [DONE] or an error event, none cut without a word
clean = all(st in (200, 503) and (d.rstrip().endswith(b"[DONE]") or b'"error"' in d) for st, d in outs)
rec("SIGTERM with 6 streams in flight", "exit 0 quickly, every stream ends with error event or [DONE], no traceback", code == 0 and dt < 10 and "Traceback" not in err and clean, f"code={code} {dt:.1f}s ends={ends} err={err[-300:]!r}")
# SIGTERM right after banner
s = Server()
code, err = s.stop(signal.SIGTERM)
rec("SIGTERM right after banner", "exit 0", code == 0 and "Traceback" not in err, f"{code} {err[-200:]!r}")
# SIGINT idle
s = Server(); time.sleep(1)
code, err = s.stop(signal.SIGINT)
rec("SIGINT idle", "exit 0", code == 0 and "Traceback" not in err, f"{code} {err[-200:]!r}")
# --model absolute path
demo = os.path.abspath("refusion_mlx/demo/model")
s = Server("--model", demo)
st, h, d = s.request("GET", "/v1/models")
st2, h2, d2 = s.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "model": "nope"}), {"Content-Type": "application/json"})
rec("--model /abs/path not shown", "no path in /v1/models or 404", demo not in d.decode() and demo not in d2.decode() and "/" not in json.loads(d)["data"][0]["id"], f"{d[:120]} {d2[:150]}")
st, h, d = s.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "model": json.loads(d)["data"][0]["id"], "max_tokens": 4}), {"Content-Type": "application/json"})
rec("served name accepted as model", "200", st == 200, st)
st, h, d = s.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "model": demo, "max_tokens": 4}), {"Content-Type": "application/json"})
rec("model = the absolute path", "404 (never loads) or 200", st in (200, 404), f"{st} {d[:100]}")
code, err = s.stop(signal.SIGTERM)
rec("abs-path server stop", "exit 0", code == 0 and "Traceback" not in err, code)
print(f"TOTAL {len(R)}: {sum(r[3] for r in R)} passed")
json.dump(R, open("/tmp/results2.json", "w"), indent=1)
