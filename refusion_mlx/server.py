"""An OpenAI-compatible HTTP server with streaming and continuous batching.

    python -m refusion_mlx.server [--model PATH_OR_REPO] [--adapter-path DIR] [--host 127.0.0.1] [--port 8080]
                                  [--served-model-name NAME] [--cors-origin ORIGIN ...]

Endpoints, each also without the ``/v1`` prefix: ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both also as server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /v1/models/{id}``; and ``GET /health``. Request bodies are OpenAI's
schemas (``openai_api``: every field honoured, or accepted while neutral, or refused by name),
plus ReFusion's knobs: ``slot_size``, ``blocks``, ``slot_threshold``, ``token_threshold``,
``plan_slots``, ``preset``, and ``decoder`` (``plan-and-infill`` or ``left-to-right``).

HTTP is uvicorn's (h11: strict parsing, keep-alive, timeouts) with Starlette's routing; every
answer that is not a 200, the protocol's own 400/431 included, is OpenAI's JSON error shape.
The main thread owns the model and the engine (``engine.Engine``: a ``scheduler.Scheduler`` that requests
join between two steps, up to ``--max-concurrency`` at once, the rest queued); the HTTP event
loop runs in another thread, tokenizes prompts in a worker thread after measuring them, and
hands jobs over. A client that goes away, streaming or not, frees its sequences.

This module is the command line (flags, start-up, shutdown); the server itself is the
``serving`` package: ``service`` (request intake: checks, tokenizing, jobs), ``answers`` (commits
into OpenAI's response objects), ``http`` (Starlette's routes, bodies, streaming) and
``transport`` (uvicorn's protocol, the socket, ``make_server``).
"""

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from .cli import ArgumentParser, prog, run_command
from .engine import Engine
from .errors import RefusionError
from .serving.transport import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_STEP, make_server

DEFAULT_PROMPT_CACHE_SIZE = 10  # as mlx-lm's server
# MLX's CUDA backend keeps its CUDA graphs and cuDNN attention plans in LRU caches keyed by shape.
# A batch whose size and lengths change every step makes more shapes than the defaults hold, and
# rebuilding an evicted one costs more than the step; unless set, the server keeps more.
CUDA_CACHE_SIZES = {"MLX_CUDA_GRAPH_CACHE_SIZE": 4096, "MLX_CUDA_SDPA_CACHE_SIZE": 1024}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog("server"),
                            description="Serve ReFusion over an OpenAI-compatible HTTP API.")
    parser.add_argument("--model", help="local folder or Hugging Face repo id; default: the packaged demo model")
    parser.add_argument("--adapter-path", help="folder with fine-tuned adapters")
    parser.add_argument("--served-model-name",
                        help="the model's id for clients (default: the folder's name, the repo id, or demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one; the address is printed)")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="sequences decoded at once; more requests wait in a queue")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="sequences allowed to wait; beyond that a request gets 429")
    parser.add_argument("--prompt-cache-size", type=int, default=DEFAULT_PROMPT_CACHE_SIZE,
                        help="finished requests whose KV caches are kept for later requests sharing their "
                             f"prefix (least recently used dropped first; 0: none; default {DEFAULT_PROMPT_CACHE_SIZE})")
    parser.add_argument("--prompt-cache-bytes", type=int,
                        help="most bytes the kept KV caches may take (default: no limit beyond their number)")
    parser.add_argument("--max-kv-size", type=int,
                        help="bound every request's KV cache to this many entries (the first few and the most "
                             "recent kept)")
    parser.add_argument("--reprefill-answers", action="store_true",
                        help="a kept cache is reused up to the prompts it was fed, never through an answer "
                             "(exactly a fresh prefill's tokens; answers are fed again)")
    parser.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                        help="most prompt tokens a request feeds per step, so a long prompt does not stall the "
                             f"other streams (0: a whole prompt at once; default {DEFAULT_PREFILL_STEP})")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let browser pages from ORIGIN call the server (repeatable; '*': any); default: none")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="cast the weights")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(serve, build_parser().parse_args(argv))


def served_name(model: Optional[str]) -> str:
    """What clients see as the model's id: never a local path (the folder's name instead)."""
    from .loading import DEMO_MODEL_NAME, is_demo

    if is_demo(model):
        return DEMO_MODEL_NAME
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def follow(model, args) -> int:
    """A rank other than 0: decode what rank 0 plans, serve nothing, until rank 0 says stop. Its
    scheduler admits and feeds sequences as rank 0's does (the same flags)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop, and says so
    Engine(model, args.max_concurrency, DEFAULT_MAX_QUEUE, prefill_step=args.prefill_step_size or None).run()
    return 0


def serve(args) -> int:
    from .distributed import is_leader, load_for_command

    if args.max_concurrency < 1 or args.max_queue < 1:
        raise RefusionError("--max-concurrency and --max-queue must be positive")
    if args.prompt_cache_size < 0 or (args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 1):
        raise RefusionError("--prompt-cache-size must be >= 0 and --prompt-cache-bytes positive")
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise RefusionError(f"--max-kv-size must be a positive integer, got {args.max_kv_size}")
    if args.prefill_step_size < 0:
        raise RefusionError(f"--prefill-step-size must be >= 0, got {args.prefill_step_size}")
    if not 0 <= args.port <= 65535:
        raise RefusionError(f"--port must be in [0, 65535], got {args.port}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise RefusionError("--served-model-name must not be empty")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if args.verbose else logging.ERROR)
    for name, size in CUDA_CACHE_SIZES.items():  # read by MLX's CUDA backend on first use
        os.environ.setdefault(name, str(size))
    # Launched by mlx.launch: this rank's shard; rank 0 serves, the others decode what it plans.
    model, tokenizer, group = load_for_command(args.model, args.adapter_path, args.dtype, args.verbose)
    if not is_leader(group):
        return follow(model, args)
    # What loading made (~200k objects: tokenizer, templates, modules) lives as long as the server:
    # out of the collector's sight, a full collection no longer stalls every sequence for ~0.1 s.
    gc.collect()
    gc.freeze()
    model_id = args.served_model_name or served_name(args.model)
    server, sock, engine = make_server(model, tokenizer, model_id, args.host, args.port, args.max_concurrency,
                                       args.max_queue, args.verbose, args.cors_origin, args.prompt_cache_size,
                                       args.prompt_cache_bytes, args.max_kv_size, not args.reprefill_answers,
                                       args.prefill_step_size or None)
    # From here on SIGTERM and SIGINT only ask the engine to stop: whenever they come (even before
    # the banner is out), the server winds down the same way and exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: engine.halt())
    http_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    http_thread.start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model_id} on http://{shown}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        engine.run()
    finally:
        print("shutting down", file=sys.stderr, flush=True)
        server.should_exit = True
        http_thread.join(timeout=10)
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
