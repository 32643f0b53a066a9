"""An OpenAI-compatible HTTP server with streaming and continuous batching.

    python -m refusion_mlx.server [--model PATH_OR_REPO] [--adapter-path DIR] [--host 127.0.0.1] [--port 8080]

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both also as
server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /health``.
Besides OpenAI's ``max_tokens``, ``temperature``, ``seed`` and ``stop``, a request
may carry ReFusion's knobs: ``slot_size``, ``blocks``, ``slot_threshold``,
``token_threshold``, ``preset``, and ``decoder`` (``plan-and-infill`` or
``left-to-right``).

The standard library's ``ThreadingHTTPServer`` (as ``mlx_lm.server``) parses
requests in one thread each; the main thread owns the model and a ``Batch``:
requests that arrive while others decode join the batch between two steps (up to
``--max-concurrency`` at once, the rest wait in a queue), and each step is one
forward for all of them. A streaming client that goes away frees its sequence.
"""

import argparse
import dataclasses
import gc
import itertools
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Sequence

from .cli import ArgumentParser, run_command
from .distributed import broadcast_json
from .errors import RefusionError

DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAX_QUEUE = 256
MAX_BODY = 4 * 2**20  # bytes in one request body
MAX_STOPS = 4  # as OpenAI
# MLX's CUDA backend keeps its CUDA graphs and cuDNN attention plans in LRU caches keyed by shape.
# A batch whose size and lengths change every step makes more shapes than the defaults hold, and
# rebuilding an evicted one costs more than the step; unless set, the server keeps more.
CUDA_CACHE_SIZES = {"MLX_CUDA_GRAPH_CACHE_SIZE": 4096, "MLX_CUDA_SDPA_CACHE_SIZE": 1024}


class RequestError(Exception):
    """A request we refuse: becomes an OpenAI-style JSON error with this status."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- reading a request ---------------------------------------------------------------------

COMMON_FIELDS = {"model", "max_tokens", "temperature", "seed", "stop", "stream", "stream_options", "n",
                 "user", "slot_size", "blocks", "slot_threshold", "token_threshold", "preset", "decoder"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}


def _integer(body: dict, name: str, low: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if value < low:
        raise RequestError(f"'{name}' must be >= {low}, got {value}", name)
    return value


def _number(body: dict, name: str, low: float, high: Optional[float] = None) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(value)}", name)
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
    return float(value)


def _choice(body: dict, name: str, choices: Sequence[str]) -> Optional[str]:
    value = body.get(name)
    if value is None:
        return None
    if value not in choices:
        raise RequestError(f"'{name}' must be one of {', '.join(choices)}; got {json.dumps(value)}", name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def _stops(body: dict) -> List[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' takes at most {MAX_STOPS} strings", "stop")
    return stops


def _messages(body: dict) -> List[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{k}] needs a 'role' of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{k}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{k}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


@dataclass
class Job:
    """One accepted request, as the decode thread and the HTTP thread share it."""

    prompt: List[int]
    settings: object  # DecodeSettings
    decoder: str
    max_tokens: int
    eos: frozenset
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: bool = False
    sequence: object = None  # the batch's Generation, once admitted
    filled: Dict[int, int] = field(default_factory=dict)  # position -> token (decode thread only)
    prefix: int = 0  # filled positions from 0 without a hole (decode thread only)
    number: int = -1  # the engine's name for it, the same on every rank

    def spec(self) -> dict:
        """What another rank needs to decode this job as rank 0 does (JSON)."""
        return {"number": self.number, "prompt": list(self.prompt), "settings": dataclasses.asdict(self.settings),
                "decoder": self.decoder, "max_tokens": self.max_tokens, "eos": sorted(self.eos)}

    @classmethod
    def from_spec(cls, spec: dict) -> "Job":
        from .decode import DecodeSettings

        return cls(spec["prompt"], DecodeSettings(**spec["settings"]), spec["decoder"], spec["max_tokens"],
                   frozenset(spec["eos"]), number=spec["number"])


# --- the decode thread ----------------------------------------------------------------------

class Engine:
    """Owns the model and the batch: ``run`` admits jobs between steps and steps the batch.

    It runs in the thread that loaded the model (MLX streams belong to threads), the
    main one; the HTTP server's threads only hand jobs over and read their events.
    """

    def __init__(self, model, max_concurrency: int, max_queue: int):
        from .batch import Batch

        self.batch = Batch(model)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.incoming: "queue.Queue[Job]" = queue.Queue()
        self.waiting: List[Job] = []
        self.running: Dict[int, Job] = {}
        self.stopping = threading.Event()
        self.group = getattr(model, "group", None)  # several ranks: rank 0 plans every step
        self.numbers = itertools.count()
        self.planned: Dict[int, Job] = {}  # rank 0: jobs in the plan being sent, by number

    @property
    def queued(self) -> int:
        return self.incoming.qsize() + len(self.waiting)

    def submit(self, job: Job):
        if self.queued >= self.max_queue:
            raise RequestError("too many requests waiting; retry later", status=429, kind="server_error",
                               code="queue_full")
        self.incoming.put(job)

    def stop(self):
        """Make ``run`` return (from another thread)."""
        self.stopping.set()
        self.incoming.put(None)

    def run(self):
        """Admit and decode until ``stop`` (or Ctrl-C); jobs still open then get a 503.

        Split across ranks (``model.group``), every rank runs this loop: before each step
        rank 0 sends what it decided (``_plan``: jobs to add, jobs to cancel, stop) and every
        rank applies it (``_apply``), so all batches stay the same; what happens inside a
        step (commits, finished and full sequences) follows from logits that are identical
        on every rank.
        """
        try:
            while True:
                plan = broadcast_json(self._plan(), self.group)
                if plan["stop"]:
                    break
                self._apply(plan)
                if not self.batch.active:
                    continue
                try:
                    left = self.batch.step()
                except Exception as e:  # never take the server down: fail the jobs in the batch
                    if self.group is not None:
                        raise  # unless the ranks may no longer agree
                    self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
                    continue
                for seq in left:
                    job = self.running.pop(id(seq))
                    job.events.put(("done", None))
        finally:
            self._fail_all("the server is shutting down", waiting=True)

    def _plan(self) -> Optional[dict]:
        """Rank 0's decisions for the next step: new jobs (up to the free room), cancelled ones,
        or stop. Blocks for a new job only when nothing runs. None on the other ranks."""
        if self.group is not None and self.group.rank() != 0:
            return None
        block = not self.batch.active and not self.waiting
        while not self.stopping.is_set():
            try:
                job = self.incoming.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                break
            if job is not None:
                self.waiting.append(job)
            block = False
        if self.stopping.is_set():
            return {"stop": True}
        adds = []
        while self.waiting and len(self.batch.active) + len(adds) < self.max_concurrency:
            job = self.waiting.pop(0)
            if job.cancelled:
                job.events.put(("done", None))
                continue
            job.number = next(self.numbers)
            if self.group is not None and job.settings.temperature > 0 and job.settings.seed is None:
                # Every rank must draw the same samples: one seed for all, from here.
                job.settings = dataclasses.replace(job.settings, seed=int.from_bytes(os.urandom(4), "little"))
            self.planned[job.number] = job
            adds.append(job.spec())
        cancels = [job.number for job in self.running.values() if job.cancelled]
        return {"stop": False, "add": adds, "cancel": cancels}

    def _apply(self, plan: dict):
        """Put the plan's jobs in the batch and drop the cancelled ones, the same on every rank."""
        for spec in plan["add"]:
            job = self.planned.pop(spec["number"], None) or Job.from_spec(spec)  # other ranks: a job of their own
            try:
                job.sequence = self.batch.add(job.prompt, job.settings, decoder=job.decoder,
                                              eos_token_id=job.eos, on_commit=self._committed(job))
            except RefusionError as e:
                job.events.put(("error", RequestError(str(e))))
                continue
            self.running[id(job.sequence)] = job
        cancelled = set(plan["cancel"])
        for job in self.running.values():
            if job.number in cancelled:
                self.batch.cancel(job.sequence)

    def _committed(self, job: Job):
        def on_commit(seq, commit):
            job.filled.update(zip(commit.positions, commit.tokens))
            while job.prefix in job.filled:
                job.prefix += 1
            job.events.put(("commit", (list(commit.positions), list(commit.tokens))))
            # Everything the client can get is decided: leave the batch now.
            eos = any(job.filled[p] in job.eos for p in range(job.prefix))
            if job.prefix >= job.max_tokens or eos:
                self.batch.cancel(seq)
        return on_commit

    def _fail_all(self, message: str, waiting: bool = False):
        error = RequestError(message, status=503 if waiting else 500, kind="server_error")
        for job in list(self.running.values()) + (self.waiting if waiting else []):
            job.events.put(("error", error))
        if waiting:
            while True:
                try:
                    job = self.incoming.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.events.put(("error", error))
            self.waiting = []
        for seq in list(self.batch.active):
            self.batch.cancel(seq)
        self.running = {}
        try:
            self.batch.step()  # drops the cancelled sequences
        except Exception:
            pass


# --- turning committed tokens into OpenAI answers ----------------------------------------

class Answer:
    """The text of one job as its commits arrive: gap-free, cut at EOS, max_tokens and stop strings."""

    def __init__(self, tokenizer, lock, job: Job, stops: List[str]):
        self.tokenizer, self.lock, self.job, self.stops = tokenizer, lock, job, stops
        self.placed: Dict[int, int] = {}
        self.tokens: List[int] = []  # the gap-free answer tokens so far
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.sent = 0  # characters of text already streamed

    def add(self, positions, tokens):
        if self.finished:  # commits that were under way when the answer was complete
            return
        self.placed.update(zip(positions, tokens))
        before = len(self.tokens)
        while len(self.tokens) < self.job.max_tokens and len(self.tokens) in self.placed:
            token = self.placed[len(self.tokens)]
            self.tokens.append(token)
            if token in self.job.eos:
                self.finish_reason = "stop"
                break
        if len(self.tokens) != before:
            self._decode()
        if self.finish_reason is None and len(self.tokens) >= self.job.max_tokens:
            self.finish_reason = "length"

    def _decode(self):
        ids = [t for t in self.tokens if t not in self.job.eos]
        with self.lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                self.finish_reason = "stop"
        self.text = text

    def done(self):
        if self.finish_reason is None:
            self.finish_reason = "length"

    def delta(self, final: bool = False) -> str:
        """Text not streamed yet that can no longer change (all of it when ``final``)."""
        text = self.text
        if not final:
            text = text.rstrip("\ufffd")  # half a character
            # Hold back a tail that may turn out to be the start of a stop string.
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if len(text) <= self.sent:
            return ""
        piece = text[self.sent:]
        self.sent = len(text)
        return piece

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# --- HTTP ------------------------------------------------------------------------------------

class Service:
    """What the HTTP handlers need: the model's name and limits, the tokenizer, the engine."""

    def __init__(self, model, tokenizer, model_id: str, engine: Engine, verbose: bool = False):
        from .tokenizer_utils import default_eos

        self.model, self.tokenizer, self.model_id, self.engine = model, tokenizer, model_id, engine
        self.verbose = verbose
        self.disconnected = 0  # streams whose client went away
        self.eos = frozenset(default_eos(tokenizer))
        self.tokenizer_lock = threading.Lock()
        self.created = int(time.time())

    def job(self, body: dict, chat: bool) -> Job:
        """Check a request's fields and build its job; RequestError for anything wrong."""
        from .batch import DECODERS, PLAN_AND_INFILL
        from .decode import settings_for
        from .presets import PRESETS

        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(f"unrecognized request argument: {unknown[0]}", unknown[0])
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise RequestError(f"the model '{model}' does not exist (this server serves '{self.model_id}')",
                               "model", 404, "model_not_found")
        if _integer(body, "n", 1) not in (None, 1):
            raise RequestError("only n=1 is supported", "n")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise RequestError("'user' must be a string", "user")
        _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise RequestError("'stream_options' takes only include_usage", "stream_options")
        if options is not None:
            _bool(options, "include_usage")
        prompt = self._prompt(body, chat)
        preset = _choice(body, "preset", sorted(PRESETS))
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"'seed' must be an integer, got {json.dumps(seed)}", "seed")
        max_tokens = _integer(body, "max_tokens", 1)
        if chat:
            max_tokens = _integer(body, "max_completion_tokens", 1) or max_tokens
        knobs = {"gen_length": max_tokens, "slot_size": _integer(body, "slot_size", 1),
                 "serial_num_blocks": _integer(body, "blocks", 1),
                 "slot_threshold": _number(body, "slot_threshold", 0.0, 1.0),
                 "token_threshold": _number(body, "token_threshold", 0.0, 1.0),
                 "temperature": _number(body, "temperature", 0.0, 2.0) or 0.0,
                 "seed": None if seed is None else seed % 2**32}
        decoder = _choice(body, "decoder", DECODERS) or PLAN_AND_INFILL
        _stops(body)
        # Unset knobs: the preset's, then the model's own, then the library's (as generate);
        # an unset max_tokens is fitted to the room the prompt leaves.
        try:
            settings = settings_for(self.model, len(prompt), preset=preset, **knobs)
        except RefusionError as e:
            raise RequestError(str(e)) from None
        limit = self.model.args.max_position_embeddings
        if len(prompt) + settings.gen_length > limit:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({settings.gen_length}) exceeds the "
                               f"model's {limit} positions", "messages" if chat else "prompt",
                               code="context_length_exceeded")
        return Job(prompt, settings, decoder, settings.gen_length, self.eos)

    def _prompt(self, body: dict, chat: bool) -> List[int]:
        from .tokenizer_utils import prompt_ids

        vocab = self.model.args.vocab_size
        if chat:
            messages = _messages(body)
            try:
                with self.tokenizer_lock:  # the prompt builder shared with training and generate
                    ids = prompt_ids(self.tokenizer, messages)
            except RefusionError as e:
                raise RequestError(str(e), "messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str):
                with self.tokenizer_lock:
                    ids = self.tokenizer.encode(prompt)
            elif (isinstance(prompt, list) and prompt
                  and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
                if not all(0 <= t < vocab for t in prompt):
                    raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
                ids = list(prompt)
            else:
                raise RequestError("'prompt' must be a string, or a list of token ids", "prompt")
        if not ids:
            raise RequestError("the prompt is empty", "messages" if chat else "prompt")
        return ids


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (its own thread)."""

    service: Service  # set on the subclass made by make_server
    server_version = "refusion-mlx"

    def log_message(self, format, *args):  # one line per request on stderr, as the base class, quieter
        if self.service.verbose:
            super().log_message(format, *args)

    # -- plumbing --
    def _send_json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: RequestError):
        self._send_json(error.status, error.body())

    def _event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/health":
            engine = self.service.engine
            self._send_json(200, {"status": "ok", "running": len(engine.running), "waiting": engine.queued,
                                  "disconnected": self.service.disconnected})
        elif self.path == "/v1/models":
            svc = self.service
            self._send_json(200, {"object": "list", "data": [
                {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "refusion-mlx"}]})
        else:
            self._error(RequestError(f"no such endpoint: GET {self.path}", status=404, code="not_found"))

    def do_POST(self):
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._error(RequestError(f"no such endpoint: POST {self.path}", status=404, code="not_found"))
            return
        try:
            body = self._body()
            job = self.service.job(body, chat)
            stream = _bool(body, "stream")
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stops = _stops(body)
            self.service.engine.submit(job)
        except RequestError as e:
            self._error(e)
            return
        answer = Answer(self.service.tokenizer, self.service.tokenizer_lock, job, stops)
        reply = Reply(chat, self.service.model_id, job, answer)
        try:
            if stream:
                self._stream(reply, usage)
            else:
                self._whole(reply)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            job.cancelled = True  # the client went away: free its sequence
            self.service.disconnected += 1

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("a JSON body with a Content-Length is required") from None
        if not 0 <= length <= MAX_BODY:
            raise RequestError(f"the body must be at most {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def _events(self, job: Job):
        """The job's commits as they come; raises RequestError if decoding failed."""
        while True:
            kind, value = job.events.get()
            if kind == "commit":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def _whole(self, reply: "Reply"):
        try:
            for positions, tokens in self._events(reply.job):
                reply.answer.add(positions, tokens)
                if reply.answer.finished:
                    reply.job.cancelled = True  # a stop string: nothing more is needed
        except RequestError as e:
            self._error(e)
            return
        reply.answer.done()
        self._send_json(200, reply.whole())

    def _stream(self, reply: "Reply", usage: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        answer = reply.answer
        if reply.chat:
            self._event(reply.chunk({"role": "assistant", "content": ""}))
        try:
            for positions, tokens in self._events(reply.job):
                answer.add(positions, tokens)
                piece = answer.delta(final=answer.finished)
                if piece:
                    self._event(reply.chunk(piece))
                if answer.finished:
                    reply.job.cancelled = True
        except RequestError as e:
            self._event(e.body())
            return
        answer.done()
        piece = answer.delta(final=True)
        if piece:
            self._event(reply.chunk(piece))
        self._event(reply.chunk(None, answer.finish_reason))
        if usage:
            self._event(reply.usage_chunk())
        self._event("[DONE]")


class Reply:
    """OpenAI's response objects for one job."""

    def __init__(self, chat: bool, model_id: str, job: Job, answer: Answer):
        self.chat, self.model_id, self.job, self.answer = chat, model_id, job, answer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "choices": choices}

    def usage(self) -> dict:
        prompt, completion = len(self.job.prompt), len(self.answer.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        a = self.answer
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": a.text},
                      "finish_reason": a.finish_reason, "logprobs": None}
            out = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
            out = self._envelope("text_completion", [choice])
        out["usage"] = self.usage()
        return out

    def chunk(self, content, finish_reason: Optional[str] = None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = self.usage()
        return out


class Server(ThreadingHTTPServer):
    """The standard library's threading server with a listen backlog for many clients at once."""

    daemon_threads = True
    request_queue_size = 256  # the default 5 drops connections when a burst of clients arrives


def make_server(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8080,
                max_concurrency: int = DEFAULT_MAX_CONCURRENCY, max_queue: int = DEFAULT_MAX_QUEUE,
                verbose: bool = False):
    """An HTTP server (not yet serving) and its engine (not yet running)."""
    engine = Engine(model, max_concurrency, max_queue)
    service = Service(model, tokenizer, model_id, engine, verbose)
    handler = type("BoundHandler", (Handler,), {"service": service})
    try:
        httpd = Server((host, port), handler)
    except OSError as e:
        raise RefusionError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return httpd, engine


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m refusion_mlx.server",
                            description="Serve ReFusion over an OpenAI-compatible HTTP API.")
    parser.add_argument("--model", help="local folder or Hugging Face repo id; default: the packaged demo model")
    parser.add_argument("--adapter-path", help="folder with fine-tuned adapters")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one; the address is printed)")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help="sequences decoded at once; more requests wait in a queue")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests allowed to wait; beyond that a request gets 429")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="cast the weights")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(serve, build_parser().parse_args(argv))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args) -> int:
    from .distributed import is_leader, load_for_command
    from .loading import DEMO_MODEL_NAME, is_demo

    if args.max_concurrency < 1 or args.max_queue < 1:
        raise RefusionError("--max-concurrency and --max-queue must be positive")
    if not 0 <= args.port <= 65535:
        raise RefusionError(f"--port must be in [0, 65535], got {args.port}")
    for name, size in CUDA_CACHE_SIZES.items():  # read by MLX's CUDA backend on first use
        os.environ.setdefault(name, str(size))
    model, tokenizer, group = load_for_command(args.model, args.adapter_path, args.dtype, args.verbose)
    # What loading made (~200k objects: tokenizer, templates, modules) lives as long as the server:
    # out of the collector's sight, a full collection no longer stalls every sequence for ~0.1 s.
    gc.collect()
    gc.freeze()
    if not is_leader(group):
        return follow(model)
    model_id = DEMO_MODEL_NAME if is_demo(args.model) else args.model
    httpd, engine = make_server(model, tokenizer, model_id, args.host, args.port,
                                args.max_concurrency, args.max_queue, args.verbose)
    if group is None:
        # SIGTERM ends the server the way Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
    else:
        # Across ranks, stop between two steps (the others must be told, and must not be left mid-step).
        def stop(signum, frame):
            print("shutting down", file=sys.stderr, flush=True)
            engine.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)
    http_thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    http_thread.start()
    host, port = httpd.server_address[:2]
    print(f"serving {model_id} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        engine.run()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
    return 0


def follow(model) -> int:
    """A rank other than 0: decode what rank 0 plans, serve nothing, until rank 0 stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop, and says so
    Engine(model, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
