import http.client, json, signal, sys, threading, time
sys.path.insert(0, "tests")
from serving import Server
HI = [{"role": "user", "content": "hi"}]
s = Server("--max-concurrency", "1")
outs = []
def stream(i):
    try:
        c = http.client.HTTPConnection(s.host, s.port, timeout=60)
        c.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 400, "stream": i % 2 == 0, "temperature": 1, "seed": i}), {"Content-Type": "application/json"})
        r = c.getresponse(); outs.append((i, r.status, r.read()))
    except Exception as e:
        outs.append((i, None, repr(e).encode()))
ts = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
[t.start() for t in ts]; time.sleep(1.0)
print(s.health())
t0 = time.time(); code, err = s.stop(signal.SIGTERM); dt = time.time() - t0
[t.join(30) for t in ts]
for i, st, d in sorted(outs): print(i, st, d[-110:])
print("code", code, f"{dt:.1f}s", repr(err[-500:]))
