"""Load benchmark of the server: concurrent clients sending the demo tasks' test prompts.

    python -m refusion_mlx.serve_bench [--model PATH_OR_REPO] [--concurrency 1 4 8 16] [--requests 192] [--repeat 3]

Starts its own server (``python -m refusion_mlx.server`` on a free port, as a
subprocess) and, for plan-and-infill and for left-to-right decoding of the same
model, sends ``--requests`` streamed chat requests at each concurrency level:
prints total tokens/s, requests/s, p50/p95 latency, p50/p95 time to the first
streamed token, and how many answers are right (the tasks' exact-match check).
Then a mixed run (``--mixed`` requests: both decoders, streamed or not, chat
and completions, and malformed ones) counts requests that failed (a wrong
status or a server error) or were lost (no complete answer). ``--repeat``
runs the sweep several times in turn and prints medians (for shared machines). ``--long-prompt``
measures instead how much long prompts stall the streams (gaps between streamed pieces), with whole
prompts and with chunked prefill. Clients are plain ``http.client``; every request is timed from
sending it to the last byte.
"""

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .cli import ArgumentParser, prog, run_command
from .errors import RefusionError
from .scheduler import DECODERS


@dataclass
class Outcome:
    status: int
    latency: float
    first_token: Optional[float]
    tokens: int
    text: str
    complete: bool  # a whole answer (or a whole error body) came back
    error: str = ""  # why no answer came back
    gaps: List[float] = field(default_factory=list)  # seconds between a stream's pieces of text


class Client:
    """Plain HTTP requests to one server."""

    def __init__(self, host: str, port: int, timeout: float = 600):
        self.host, self.port, self.timeout = host, port, timeout

    def post(self, path: str, body, stream: bool) -> Outcome:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        tic = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", path, raw, {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200 or not stream:
                data = json.loads(response.read())
                latency = time.perf_counter() - tic
                if response.status != 200:
                    return Outcome(response.status, latency, None, 0, "", "error" in data)
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
                return Outcome(200, latency, None, data["usage"]["completion_tokens"], text, True)
            first, text, tokens, done, gaps, last = None, [], 0, False, [], None
            for line in response.fp:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    break
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
                    if piece:
                        now = time.perf_counter()
                        first = first if first is not None else now - tic
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        text.append(piece)
            return Outcome(200, time.perf_counter() - tic, first, tokens, "".join(text), done, gaps=gaps)
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            return Outcome(0, time.perf_counter() - tic, None, 0, "", False, f"{type(e).__name__}: {e}")
        finally:
            conn.close()


def report_failures(outcomes: List[Outcome]):
    """Say on stderr why requests got no answer (connection errors, cut streams)."""
    for o in outcomes:
        if o.status == 0 or (o.status == 200 and not o.complete):
            print(f"no answer: status {o.status}, {o.error or 'the stream ended early'}", file=sys.stderr)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_clients(jobs: List, concurrency: int, work) -> List:
    """Run ``work(job)`` for every job with ``concurrency`` client threads; results in job order."""
    results = [None] * len(jobs)
    next_job = iter(range(len(jobs)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_job, None)
            if i is None:
                return
            results[i] = work(jobs[i])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


WARM_UP = 32  # prompts, after the measured ones in the test split
SHARED_SENTENCE = "You answer exactly, and you show your work column by column when you add numbers. "


def shared_system_prompt(tokens: int, encode) -> str:
    """A system prompt of about ``tokens`` tokens (the same for every request of a run)."""
    per = max(len(encode(SHARED_SENTENCE)), 1)
    return SHARED_SENTENCE * max(tokens // per, 1)


def chat_body(query: str, decoder: str, stream: bool = True, system: str = "") -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
    body = {"messages": messages, "decoder": decoder, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def load_level(client: Client, examples: List[dict], decoder: str, concurrency: int, system: str = "") -> dict:
    """One row of the table: every example once, ``concurrency`` at a time."""
    from .demo.tasks import check

    tic = time.perf_counter()
    outcomes = run_clients(examples, concurrency, lambda x: client.post(
        "/v1/chat/completions", chat_body(x["query"], decoder, system=system), True))
    wall = time.perf_counter() - tic
    ok = [o for o in outcomes if o.status == 200 and o.complete]
    report_failures(outcomes)
    tokens = sum(o.tokens for o in ok)
    return {
        "decoder": decoder, "concurrency": concurrency, "requests": len(examples), "failed": len(examples) - len(ok),
        "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "p50": percentile([o.latency for o in ok], 0.5), "p95": percentile([o.latency for o in ok], 0.95),
        "ttft50": percentile([o.first_token for o in ok if o.first_token], 0.5),
        "ttft95": percentile([o.first_token for o in ok if o.first_token], 0.95),
        "correct": sum(check(x, o.text) for x, o in zip(examples, outcomes) if o in ok),
    }


def mixed_run(client: Client, examples: List[dict], size: int, concurrency: int, seed: int = 0) -> dict:
    """``size`` requests of every kind at once; counts answers, refusals, failures and losses."""
    rng = random.Random(seed)
    bad = [
        (b"{not json", 400), ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400),  # over the demo's 2048 positions
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
        ({"prompt": [1, 2, 10 ** 9]}, 400),
    ]
    jobs = []
    for k in range(size):
        x = examples[k % len(examples)]
        roll = rng.random()
        if roll < 0.2:
            body, expect = bad[rng.randrange(len(bad))]
            path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
            jobs.append((path, body, False, expect))
        elif roll < 0.35:
            jobs.append(("/v1/completions", {"prompt": x["query"], "max_tokens": 48, "stream": roll < 0.28},
                         roll < 0.28, 200))
        else:
            decoder = DECODERS[rng.random() < 0.3]
            stream = rng.random() < 0.5
            body = chat_body(x["query"], decoder, stream)
            if rng.random() < 0.3:
                body.update(temperature=0.7, seed=k)
            jobs.append(("/v1/chat/completions", body, stream, 200))
    tic = time.perf_counter()
    outcomes = run_clients(jobs, concurrency, lambda j: client.post(j[0], j[1], j[2]))
    wall = time.perf_counter() - tic
    report_failures(outcomes)
    lost = sum(1 for o in outcomes if o.status == 0 or not o.complete)
    failed = sum(1 for (_, _, _, expect), o in zip(jobs, outcomes) if o.status not in (0, expect))
    return {"requests": size, "answered": sum(o.status == 200 and o.complete for o in outcomes),
            "refused": sum(o.status in (400, 404) and o.complete for o in outcomes),
            "failed": failed, "lost": lost, "seconds": wall}


class ServerProcess:
    """``python -m refusion_mlx.server`` on a free port, stopped with Ctrl-C."""

    def __init__(self, model: Optional[str], max_concurrency: int, extra: Sequence[str] = ()):
        cmd = [sys.executable, "-m", "refusion_mlx.server", "--port", "0", "--max-concurrency",
               str(max_concurrency), *extra]
        if model:
            cmd += ["--model", model]
        # Its stderr goes to a file: a pipe nobody reads could fill up and stall the server.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=dict(os.environ))
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            self.process.communicate()
            self.log.seek(0)
            err = self.log.read().strip().splitlines()
            self.log.close()
            raise RefusionError(f"the server did not start: {err[-1] if err else line.strip()}")
        host_port = line.split("//")[1].split("/")[0]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)

    def stop(self):
        import signal

        self.process.send_signal(signal.SIGINT)
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        self.log.close()


def median_row(runs: List[dict]) -> dict:
    """One row from repeated runs of it: the median of every number (counts added up)."""
    row = dict(runs[0])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs)
    for key in ("requests", "failed", "correct"):
        row[key] = sum(r[key] for r in runs)
    return row


def format_table(rows: List[dict]) -> str:
    lines = ["| decoder | clients | tokens/s | requests/s | p50 latency (s) | p95 latency (s) | "
             "p50 / p95 first token (s) | correct | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['p50']:.3f} | {r['p95']:.3f} | {r['ttft50']:.3f} / {r['ttft95']:.3f} | "
                     f"{r['correct']}/{r['requests']} | {r['failed']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog("serve_bench"), description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="served model (default: the packaged demo model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16], help="client counts")
    parser.add_argument("--requests", type=int, default=192,
                        help="requests per row (test-split prompts): enough that the end of a row, when "
                             "fewer clients are left, weighs little")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--repeat", type=int, default=1, help="sweeps to run in turn; the table shows medians")
    parser.add_argument("--mixed", type=int, default=200, help="size of the mixed run (0: skip)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server")
    parser.add_argument("--long-prompt", type=int, default=0, metavar="TOKENS",
                        help="while the clients stream, one more client sends prompts of about this many tokens "
                             "back to back; run against a server feeding whole prompts (--prefill-step-size 0), "
                             "then one with the --server-arg flags, and print the streams' gaps between pieces")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="give every request the same system prompt of about this many tokens, and run the "
                             "sweep against a server without a prompt cache, then with one (time to first token)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(bench, build_parser().parse_args(argv))


def bench(args) -> int:
    from .demo.tasks import test_split

    for flag, value, low in (("--requests", args.requests, 1), ("--repeat", args.repeat, 1),
                             ("--concurrency", min(args.concurrency), 1), ("--mixed", args.mixed, 0),
                             ("--shared-prefix", args.shared_prefix, 0), ("--long-prompt", args.long_prompt, 0)):
        if value < low:
            raise RefusionError(f"{flag} must be at least {low}, got {value}")
    # The warm-up's prompts are not measured (a prompt cache would already hold them).
    examples = test_split(size=args.requests + WARM_UP)
    if args.long_prompt:
        return long_prompt_bench(args, examples)
    if not args.shared_prefix:
        sweep(args, examples, args.server_arg, mixed=args.mixed)
        return 0
    from .loading import load

    system = shared_system_prompt(args.shared_prefix, load(args.model)[1].encode)
    rows = {}
    for label, flags in (("no prompt cache", ["--prompt-cache-size", "0"]), ("prompt cache", [])):
        print(f"== {label}, a shared system prompt of ~{args.shared_prefix} tokens")
        rows[label] = sweep(args, examples, args.server_arg + flags, system=system)
    for r0, r1 in zip(rows["no prompt cache"], rows["prompt cache"]):
        print(f"{r0['decoder']}, {r0['concurrency']} clients: p50 time to first token {r0['ttft50']:.3f} s without "
              f"the prompt cache, {r1['ttft50']:.3f} s with it ({r0['ttft50'] / r1['ttft50']:.2f}x lower); "
              f"tokens/s {r1['tokens_per_s'] / r0['tokens_per_s']:.2f}x")
    return 0


def long_prompt_bench(args, examples: List[dict]) -> int:
    """The streams' gaps between pieces while long prompts arrive: whole prompts, then chunked."""
    from .loading import load

    long_text = shared_system_prompt(args.long_prompt, load(args.model)[1].encode)
    runs = {}
    for label, flags in (("whole prompts", args.server_arg + ["--prefill-step-size", "0"]),
                         ("chunked prefill", args.server_arg)):
        server = ServerProcess(args.model, max(args.concurrency) + 1, flags)
        try:
            client = Client(server.host, server.port)
            for decoder in args.decoders:
                stall_run(client, examples[-max(max(args.concurrency), 4):], decoder, max(args.concurrency),
                          long_text)  # warm-up
                for _ in range(args.repeat):
                    runs.setdefault((decoder, label), []).append(
                        stall_run(client, examples[:-WARM_UP], decoder, max(args.concurrency), long_text))
        finally:
            server.stop()
    print("| decoder | server | gap p50 (s) | gap p99 (s) | gap max (s) | long prompts | long p50 (s) | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for (decoder, label), rows in runs.items():
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {decoder} | {label} | {m['gap50']:.4f} | {m['gap99']:.4f} | {m['gapmax']:.4f} | "
              f"{m['long']:.0f} | {m['long50']:.3f} | {m['tokens_per_s']:.1f} |")
    return 0


def stall_run(client: Client, examples: List[dict], decoder: str, concurrency: int, long_text: str) -> dict:
    """``concurrency`` clients stream every example once while one more sends ``long_text`` as a
    completions prompt (4 tokens asked) back to back until they are done."""
    done = threading.Event()
    longs: List[Outcome] = []

    def long_client():
        while not done.is_set():
            longs.append(client.post("/v1/completions", {"prompt": long_text, "max_tokens": 4,
                                                         "decoder": decoder}, False))

    thread = threading.Thread(target=long_client)
    tic = time.perf_counter()
    thread.start()
    outcomes = run_clients(examples, concurrency, lambda x: client.post(
        "/v1/chat/completions", chat_body(x["query"], decoder), True))
    wall = time.perf_counter() - tic
    done.set()
    thread.join()
    report_failures(outcomes + longs)
    gaps = [g for o in outcomes for g in o.gaps]
    return {"gap50": percentile(gaps, 0.5), "gap99": percentile(gaps, 0.99), "gapmax": max(gaps, default=0.0),
            "long": float(len(longs)), "long50": percentile([o.latency for o in longs if o.status == 200], 0.5),
            "tokens_per_s": sum(o.tokens for o in outcomes) / wall}


def sweep(args, examples: List[dict], server_flags: Sequence[str], system: str = "", mixed: int = 0) -> List[dict]:
    """Every decoder at every client count against one server; prints and returns the table's rows."""
    server = ServerProcess(args.model, max(args.concurrency), server_flags)
    try:
        client = Client(server.host, server.port)
        # Warm-up, every level once on a few prompts: kernels compiled and (CUDA) attention plans
        # built for the shapes each level makes, so the first row measured does not pay for them.
        warm, examples = examples[-WARM_UP:], examples[:-WARM_UP]
        for decoder in args.decoders:
            for level in args.concurrency:
                run_clients(warm[: max(2 * level, 8)], level, lambda x: client.post(
                    "/v1/chat/completions", chat_body(x["query"], decoder, system=system), True))
        runs = []
        for _ in range(args.repeat):  # whole sweeps in turn, so a noisy minute hits every row alike
            for decoder in args.decoders:
                for level in args.concurrency:
                    runs.append(load_level(client, examples, decoder, level, system))
                    r = runs[-1]
                    print(f"{decoder}, {level} clients: {r['tokens_per_s']:.1f} tokens/s, "
                          f"{r['requests_per_s']:.2f} requests/s", file=sys.stderr, flush=True)
        rows = [median_row([r for r in runs if (r["decoder"], r["concurrency"]) == (d, n)])
                for d in args.decoders for n in args.concurrency]
        if args.repeat > 1:
            print(f"medians of {args.repeat} runs")
        print(format_table(rows))
        for decoder in args.decoders:
            by_level = {r["concurrency"]: r for r in rows if r["decoder"] == decoder}
            if 1 in by_level:
                gains = ", ".join(f"{n} clients {by_level[n]['tokens_per_s'] / by_level[1]['tokens_per_s']:.2f}x"
                                  for n in sorted(by_level) if n != 1)
                print(f"{decoder}: throughput over one client at a time: {gains}")
        if mixed:
            m = mixed_run(client, examples, mixed, max(args.concurrency))
            print(f"mixed run: {m['requests']} requests ({m['answered']} answered, {m['refused']} bad ones "
                  f"refused as expected) in {m['seconds']:.1f} s: {m['failed']} failed, {m['lost']} lost")
    finally:
        server.stop()
    return rows

if __name__ == "__main__":
    sys.exit(main())
