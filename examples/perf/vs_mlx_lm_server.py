"""Our server against mlx-lm's on the same weights, in one run: streamed chat requests of the demo
tasks from 1 and 8 concurrent clients, tokens/s of each.

    python -m refusion_mlx.convert --hf-path refusion_mlx/demo/model --mlx-path /tmp/demo32 --dtype float32
    python -m mlx_lm.server --model /tmp/demo32 --port 8765 --decode-concurrency 16 &
    python examples/perf/vs_mlx_lm_server.py --port 8765

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


def tokens_per_second(client, examples, clients, decoder=None):
    """After a warm-up on 16 prompts, every example once, ``clients`` at a time."""
    post = lambda x: client.post("/v1/chat/completions", body(x["query"], decoder), True)  # noqa: E731
    serve_bench.run_clients(examples[:16], clients, post)
    tic = time.perf_counter()
    outcomes = serve_bench.run_clients(examples, clients, post)
    wall = time.perf_counter() - tic
    answered = [o for o in outcomes if o.status == 200 and o.complete]
    return sum(o.tokens for o in answered) / wall, len(answered)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="where mlx-lm's server listens")
    parser.add_argument("--requests", type=int, default=96, help="prompts per run (after 16 warm-up ones)")
    args = parser.parse_args()
    examples = test_split(size=args.requests)
    theirs = serve_bench.Client("127.0.0.1", args.port)
    server = serve_bench.ServerProcess(None, 8)
    ours = serve_bench.Client(server.host, server.port)
    try:
        for clients in (1, 8):
            theirs_tps = None
            for name, client, decoder in (("mlx-lm server (left to right)", theirs, None),
                                          ("refusion_mlx plan-and-infill", ours, "plan-and-infill"),
                                          ("refusion_mlx left-to-right", ours, "left-to-right")):
                tps, answered = tokens_per_second(client, examples, clients, decoder)
                theirs_tps = tps if theirs_tps is None else theirs_tps  # mlx-lm's runs first
                ratio = tps / theirs_tps if theirs_tps else float("nan")
                print(f"{name:32s} {clients:2d} clients: {tps:8.1f} tokens/s {ratio:5.2f}x mlx-lm "
                      f"({answered}/{len(examples)} answered)", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
