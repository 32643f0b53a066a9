"""Our server against mlx-lm's on the same weights, in one run: streamed chat requests of the demo
tasks from 1 and 8 concurrent clients, tokens/s of each.

    python -m refusion_mlx.convert --hf-path refusion_mlx/demo/model --mlx-path /tmp/demo32 --dtype float32
    python -m mlx_lm.server --model /tmp/demo32 --port 8765 --decode-concurrency 16 &
    python examples/perf/vs_mlx_lm_server.py --port 8765

``--model`` runs another checkpoint in both (mlx-lm's server started on it), for example the
host-bound proxy of ``host_overhead.py --write``.

On Linux, start mlx-lm's server with an optimized BLAS preloaded (for example
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3``), as refusion_mlx
does for itself; otherwise its matrix products run on MLX's reference BLAS. Our server (the
demo model, float32) is started here, on a free port.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's refusion_mlx

from refusion_mlx import serve_bench  # noqa: E402
from refusion_mlx.demo.tasks import test_split  # noqa: E402


def body(query, decoder=None):
    request = {"messages": [{"role": "user", "content": query}], "stream": True,
               "stream_options": {"include_usage": True}, "max_tokens": 256, "temperature": 0.0}
    if decoder:
        request["decoder"] = decoder
    return request


def tokens_per_second(client, examples, warmup, clients, decoder=None):
    """Every example once, ``clients`` at a time, after an untimed pass over the ``warmup`` ones
    (other prompts: both servers keep prompt caches, which the timed prompts must not hit).
    MLX-CUDA compiles kernels on first use: on a fresh H200 a warm-up of 16 prompts left
    plan-and-infill's single-client row at 0.92x mlx-lm's, 5.04x on a second run."""
    post = lambda x: client.post("/v1/chat/completions", body(x["query"], decoder), True)  # noqa: E731
    serve_bench.run_clients(warmup, clients, post)
    tic = time.perf_counter()
    outcomes = serve_bench.run_clients(examples, clients, post)
    wall = time.perf_counter() - tic
    answered = [o for o in outcomes if o.status == 200 and o.complete]
    return sum(o.tokens for o in answered) / wall, len(answered)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="where mlx-lm's server listens")
    parser.add_argument("--requests", type=int, default=96, help="prompts per run")
    parser.add_argument("--warmup", type=int, help="untimed prompts (not the timed ones) before each run "
                                                   "(default: as many as --requests)")
    parser.add_argument("--model", help="the checkpoint mlx-lm's server runs, for ours too (default: the demo)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, run after run")
    parser.add_argument("--decoders", nargs="+", default=["plan-and-infill", "left-to-right"],
                        choices=["plan-and-infill", "left-to-right"], help="our decoders to measure")
    args = parser.parse_args()
    warmup = args.requests if args.warmup is None else args.warmup
    if warmup < 0 or args.requests < 1:
        parser.error("--requests must be at least 1 and --warmup at least 0")
    examples = test_split(size=args.requests + warmup)
    examples, warmup = examples[:args.requests], examples[args.requests:]
    theirs = serve_bench.Client("127.0.0.1", args.port)
    server = serve_bench.ServerProcess(args.model, 8)
    ours = serve_bench.Client(server.host, server.port)
    try:
        runs = [("mlx-lm server (left to right)", theirs, None)]
        runs += [(f"refusion_mlx {decoder}", ours, decoder) for decoder in args.decoders]
        for clients in args.clients:
            theirs_tps = None
            for name, client, decoder in runs:
                tps, answered = tokens_per_second(client, examples, warmup, clients, decoder)
                theirs_tps = tps if theirs_tps is None else theirs_tps  # mlx-lm's runs first
                ratio = tps / theirs_tps if theirs_tps else float("nan")
                print(f"{name:32s} {clients:2d} clients: {tps:8.1f} tokens/s {ratio:5.2f}x mlx-lm "
                      f"({answered}/{len(examples)} answered)", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
