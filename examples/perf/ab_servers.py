"""Two checkouts' servers side by side on this machine: the same streamed chat requests (the demo
tasks' test prompts) alternate between them, level by level and round by round, so a machine
shared with other work slows both alike. Prints tokens/s of each and whether the answers match.

    git worktree add /tmp/before <commit>
    python examples/perf/ab_servers.py /tmp/before . --prompts 8 --rounds 2 [--decoder left-to-right]
"""

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def start(root: str, model=None):
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    extra = ["--model", str(Path(model).resolve())] if model else []
    process = subprocess.Popen([sys.executable, "-m", "refusion_mlx.server", "--port", "0", "--max-concurrency", "8",
                                *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    line = process.stdout.readline()  # "serving NAME on http://HOST:PORT/v1 ..."
    return process, int(line.split()[3].rsplit(":", 1)[1].split("/")[0])


def ask(port: int, query: str, decoder=None, max_tokens=None):
    request = {"messages": [{"role": "user", "content": query}], "stream": True,
               "stream_options": {"include_usage": True}}
    if max_tokens:
        request["max_tokens"] = max_tokens
    if decoder:
        request["decoder"] = decoder
    body = json.dumps(request)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    tokens, text = 0, []
    for line in conn.getresponse():
        line = line.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            event = json.loads(line[6:])
            tokens = event["usage"]["completion_tokens"] if event.get("usage") else tokens
            text += [c["delta"].get("content") or "" for c in event["choices"]]
    conn.close()
    return tokens, "".join(text)


def level(port: int, queries, clients: int, decoder=None, max_tokens=None):
    """Tokens/s of every query once, ``clients`` at a time, and the answers in order."""
    results, todo, lock = [None] * len(queries), iter(range(len(queries))), threading.Lock()

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = ask(port, queries[i], decoder, max_tokens)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r[0] for r in results) / (time.perf_counter() - tic), [r[1] for r in results]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="checkout A (e.g. before)")
    parser.add_argument("b", help="checkout B (e.g. after)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--decoder", choices=("plan-and-infill", "left-to-right"), default=None,
                        help="the requests' decoder (default: the server's, plan-and-infill)")
    parser.add_argument("--model", help="the checkpoint both servers run (default: the demo)")
    parser.add_argument("--max-tokens", type=int, help="per request (default: the server's)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, level by level")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.b).resolve()))
    from refusion_mlx.demo.tasks import test_split

    queries = [example["query"] for example in test_split()][: args.prompts]
    servers = {"A": start(args.a, args.model), "B": start(args.b, args.model)}
    for _, port in servers.values():
        level(port, queries[:2], 2, args.decoder, args.max_tokens)  # warm-up
    rows = {}
    try:
        for r in range(args.rounds):
            for clients in args.clients:
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    tps, texts = level(servers[name][1], queries, clients, args.decoder, args.max_tokens)
                    rows.setdefault((name, clients), []).append((tps, texts))
                    print(f"round {r} {name} {clients} clients: {tps:.1f} tokens/s", flush=True)
        for clients in args.clients:
            a = statistics.median(t for t, _ in rows[("A", clients)])
            b = statistics.median(t for t, _ in rows[("B", clients)])
            same = all(x[1] == y[1] for x, y in zip(rows[("A", clients)], rows[("B", clients)]))
            print(f"{clients} clients: A {a:.1f}, B {b:.1f} tokens/s (medians), B/A {b / a:.2f}, same answers: {same}")
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
