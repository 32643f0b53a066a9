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
"""

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

from .cli import ArgumentParser, prog, run_command
from .engine import Committed, Engine, Failed, Job, RequestError
from .settings import KNOB_TABLE
from .errors import RefusionError

log = logging.getLogger("refusion_mlx.server")

DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAX_QUEUE = 256
DEFAULT_PROMPT_CACHE_SIZE = 10  # as mlx-lm's server
MAX_BODY = 4 * 2**20  # bytes in one request body
MAX_HEAD = 16 * 2**10  # bytes in a request line and its headers (beyond: 431)
MAX_TARGET = 8 * 2**10  # bytes in a request's path and query (beyond: 414)
HEAD_TIMEOUT = 10.0  # seconds a connection has to send a whole request head
BODY_TIMEOUT = 30.0  # seconds a request has to send its body
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
MODEL_ALIAS = "default_model"  # as mlx-lm: a name any client may use for the one model served
# MLX's CUDA backend keeps its CUDA graphs and cuDNN attention plans in LRU caches keyed by shape.
# A batch whose size and lengths change every step makes more shapes than the defaults hold, and
# rebuilding an evicted one costs more than the step; unless set, the server keeps more.
CUDA_CACHE_SIZES = {"MLX_CUDA_GRAPH_CACHE_SIZE": 4096, "MLX_CUDA_SDPA_CACHE_SIZE": 1024}
# The library's argument names as a request spells them (settings.KNOB_TABLE).
REQUEST_NAMES = {knob.name: knob.field for knob in KNOB_TABLE if knob.name != knob.field}


# --- turning committed tokens into OpenAI answers ----------------------------------------

def stop_overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with.

    Only the last len(stop)-1 characters of the text can take part, and only where stop[0]
    occurs in them; each candidate is one C-level comparison: a 200,000-character stop string
    costs what the answer's length does, never its own length squared.
    """
    if len(stop) < 2:
        return 0
    tail = text[-(len(stop) - 1):]
    start = tail.find(stop[0])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0


class Answer:
    """The text of one choice as its job's commits arrive: gap-free, cut at EOS, max_tokens and stops."""

    def __init__(self, tokenizer, job: Job, stops: List[str]):
        self.tokenizer, self.job, self.stops = tokenizer, job, stops
        self.placed = {}
        self.tokens: List[int] = []  # the gap-free answer tokens so far
        self.text = ""
        self.cut = False  # a stop string cut the text
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

    def _text(self, ids) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.job.eos], skip_special_tokens=True)

    def _decode(self):
        text = self._text(self.tokens)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.cut = text[:at], True
                self.finish_reason = "stop"
        self.text = text

    def done(self):
        if self.finish_reason is None:
            self.finish_reason = "length"

    def returned_tokens(self) -> int:
        """Tokens the returned text is made of: all decoded ones, or, when a stop string cut the
        text, the fewest whose text covers what is returned (the stop string's are not counted)."""
        if not self.cut:
            return len(self.tokens)
        low, high = 0, len(self.tokens)  # the smallest k whose text reaches len(self.text)
        while low < high:
            mid = (low + high) // 2
            if len(self._text(self.tokens[:mid]).rstrip("\ufffd")) >= len(self.text):
                high = mid
            else:
                low = mid + 1
        return low

    def delta(self, final: bool = False) -> str:
        """Text not streamed yet that can no longer change (all of it when ``final``)."""
        text = self.text
        if not final:
            text = text.rstrip("\ufffd")  # half a character
            # Hold back a tail that may turn out to be the start of a stop string.
            hold = max((stop_overlap(text, s) for s in self.stops), default=0)
            text = text[: len(text) - hold]
        if len(text) <= self.sent:
            return ""
        piece = text[self.sent:]
        self.sent = len(text)
        return piece

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Reply:
    """OpenAI's response objects for one request's choices."""

    def __init__(self, chat: bool, model_id: str, prompt_tokens: int, answers: List[Answer], echo: str = ""):
        self.chat, self.model_id, self.prompt_tokens, self.answers = chat, model_id, prompt_tokens, answers
        self.echo = echo  # completions' echo: the prompt before each choice's text
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "choices": choices}

    def usage(self) -> dict:
        completion = sum(a.returned_tokens() for a in self.answers)
        cached = max(a.job.cached_tokens for a in self.answers)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def whole(self) -> dict:
        choices = []
        for i, a in enumerate(self.answers):
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": a.text},
                                "finish_reason": a.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": self.echo + a.text, "finish_reason": a.finish_reason,
                                "logprobs": None})
        out = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        out["usage"] = self.usage()
        return out

    def chunk(self, index: int, content, finish_reason: Optional[str] = None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = self.usage()
        return out


# --- from a request body to jobs ----------------------------------------------------------------

class Events:
    """A job's event sink: the engine's thread puts, the HTTP event loop gets (tagged with the
    choice's index) from one queue per request."""

    def __init__(self, loop, queue: "asyncio.Queue", index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass


def _request_error(e: RefusionError, chat: bool) -> RequestError:
    """A library error about a request's knobs, in the request's names."""
    message = str(e)
    for name, field in REQUEST_NAMES.items():
        message = message.replace(name, field)
    if "exceeds the model's max_position_embeddings" in message and "slot_size (" not in message:
        return RequestError(message, "messages" if chat else "prompt", code="context_length_exceeded")
    fields = [knob.field for knob in KNOB_TABLE] + ["preset"]
    named = [n for n in fields if message.startswith(n) or f"{n} (" in message or f"'{n}" in message
             or f"{n} must" in message]
    return RequestError(message, named[0] if named else None)


class Service:
    """What the HTTP handlers need: the model's name and limits, the tokenizer, the engine."""

    def __init__(self, model, tokenizer, model_id: str, engine: Engine):
        from .tokenizer_utils import default_eos

        self.model, self.tokenizer, self.model_id, self.engine = model, tokenizer, model_id, engine
        self.disconnected = 0  # requests whose client went away before their answer
        self.eos = frozenset(default_eos(tokenizer))
        self.positions = model.args.max_position_embeddings
        # A token never spans more bytes than the vocabulary's longest entry (byte-level BPE: one
        # character per byte): text longer than positions x that cannot fit, tokenized or not.
        try:
            self.token_bytes = max(len(t.encode("utf-8")) for t in tokenizer.get_vocab())
        except Exception:  # a tokenizer without a vocabulary to read: measure after tokenizing only
            self.token_bytes = None
        self.prompt_lock = threading.Lock()  # one prompt tokenized at a time, never with decoding's
        self.created = int(time.time())

    def check_model(self, name: Optional[str]):
        if name is not None and name.lower() not in (self.model_id.lower(), MODEL_ALIAS):
            raise RequestError(f"the model '{name}' does not exist (this server serves '{self.model_id}')",
                               "model", 404, "model_not_found")

    def settings(self, request, chat: bool, prompt_length: int):
        """The request's DecodeSettings, checked against the model for a prompt of that length."""
        from .settings import settings_for

        max_tokens = request.max_tokens
        if chat and request.max_completion_tokens is not None:
            max_tokens = request.max_completion_tokens
        knobs = {knob.name: getattr(request, knob.field) for knob in KNOB_TABLE}
        knobs.update(gen_length=max_tokens, temperature=request.temperature or 0.0)
        if request.top_k is not None:  # as mlx-lm: a negative top_k means no limit
            knobs["top_k"] = max(request.top_k, 0)
        try:
            return settings_for(self.model, prompt_length, preset=request.preset, **knobs)
        except RefusionError as e:
            raise _request_error(e, chat) from None

    def check_before_tokenizing(self, request, chat: bool):
        """Everything that can be refused without tokenizing: the knobs (for the shortest prompt)
        and the prompt's size in bytes."""
        from .batch import DECODERS
        from .openai_api import prompt_text_bytes

        if request.decoder is not None and request.decoder not in DECODERS:
            raise RequestError(f"'decoder' must be one of {', '.join(DECODERS)}; got {request.decoder!r}", "decoder")
        n = request.n or 1
        if n > self.engine.max_concurrency:  # one request never holds more than the whole batch
            raise RequestError(f"'n' must be at most {self.engine.max_concurrency} here (--max-concurrency)", "n")
        settings = self.settings(request, chat, 1)
        if request.seed is not None and request.n:
            self.settings(request.model_copy(update={"seed": request.seed + request.n - 1}), chat, 1)
        size = prompt_text_bytes(request, chat)
        if self.token_bytes and size > self.positions * self.token_bytes:
            raise RequestError(f"the prompt ({size} bytes) cannot fit the model's {self.positions} positions",
                               "messages" if chat else "prompt", code="context_length_exceeded")
        if not chat and isinstance(request.prompt, list) and request.prompt and len(request.prompt) > self.positions:
            raise RequestError(f"the prompt ({len(request.prompt)} token ids) exceeds the model's {self.positions} "
                               "positions", "prompt", code="context_length_exceeded")
        return settings

    def tokenize(self, request, chat: bool) -> List[int]:
        """The prompt's token ids (in a worker thread: never on the event loop, never under a lock
        that decoding takes)."""
        from .openai_api import messages
        from .tokenizer_utils import prompt_ids

        vocab = self.model.args.vocab_size
        where = "messages" if chat else "prompt"
        if chat:
            chat_messages = messages(request)
            thinking = (request.chat_template_kwargs or {}).get("enable_thinking", True)
            try:
                with self.prompt_lock:  # the prompt builder shared with training and generate
                    ids = prompt_ids(self.tokenizer, chat_messages, enable_thinking=bool(thinking))
            except RefusionError as e:
                raise RequestError(str(e), where) from None
            except Exception as e:  # the model's chat template refused these messages (jinja's raise_exception)
                raise RequestError(f"the chat template cannot render these messages: {str(e)[:300]}", where) from None
        else:
            prompt = request.prompt
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                if len(prompt) > 1:
                    raise RequestError("a list of prompts is not supported: send one prompt per request "
                                       "(n asks for several answers)", "prompt")
                prompt = prompt[0]
            if isinstance(prompt, str):
                with self.prompt_lock:
                    ids = self.tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt:
                if not all(0 <= t < vocab for t in prompt):
                    raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
                ids = list(prompt)
            else:
                raise RequestError("'prompt' must be a non-empty string, or a list of token ids", "prompt")
        if not ids:
            raise RequestError("the prompt is empty", where)
        return ids

    def jobs(self, request, chat: bool, ids: List[int], loop, queue) -> List[Job]:
        """One job per choice; choice i samples with seed + i."""
        from .batch import PLAN_AND_INFILL

        settings = self.settings(request, chat, len(ids))
        if len(ids) + settings.gen_length > self.positions:  # an unset max_tokens left no room
            raise RequestError(f"the prompt ({len(ids)} tokens) leaves no room in the model's {self.positions} "
                               "positions", "messages" if chat else "prompt", code="context_length_exceeded")
        decoder = request.decoder or PLAN_AND_INFILL
        out = []
        for i in range(request.n or 1):
            s = settings if settings.seed is None else replace(settings, seed=settings.seed + i)
            out.append(Job(ids, s, decoder, s.gen_length, self.eos, events=Events(loop, queue, i)))
        return out

    def submit(self, jobs: List[Job]):
        engine = self.engine
        if engine.queued + len(jobs) > engine.max_queue:
            raise RequestError("too many requests waiting; retry later", status=429, kind="server_error",
                               code="queue_full")
        for job in jobs:
            engine.submit(job)


# --- HTTP ------------------------------------------------------------------------------------

def error_response(error: RequestError, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request) -> dict:
    """The body as a JSON object: its size checked before it is read whole, deep nesting, huge
    numbers, NaN and lone surrogates refused, each as one RequestError."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise RequestError(f"the body must be at most {MAX_BODY} bytes", status=413, code="body_too_large")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise RequestError(f"the body must be at most {MAX_BODY} bytes", status=413, code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise RequestError("the body took too long to arrive", status=408, code="timeout") from None
    try:
        body = json.loads(b"".join(chunks), parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError("the body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # also bad UTF-8 and numbers of more digits than Python converts
        raise RequestError(f"the body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the body holds a lone surrogate (\\ud800-\\udfff): not valid UTF-8 text") from None
    return body


async def wait_for_disconnect(request):
    """Return once the client has gone (its body was read already: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class App:
    """The Starlette application over one Service."""

    def __init__(self, service: Service, cors_origins: Sequence[str] = ()):
        self.service = service
        self.cors_origins = list(cors_origins)

    def build(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.routing import Route

        routes = [Route("/health", self.health, methods=["GET"])]
        for prefix in ("/v1", ""):
            routes += [Route(prefix + "/models", self.models, methods=["GET"]),
                       Route(prefix + "/models/{model_id:path}", self.model, methods=["GET"]),
                       Route(prefix + "/chat/completions", self.chat, methods=["POST"]),
                       Route(prefix + "/completions", self.completions, methods=["POST"])]
        class CORS(CORSMiddleware):
            """Starlette's CORS, with a refused preflight in OpenAI's error shape too."""

            def preflight_response(self, request_headers):
                response = super().preflight_response(request_headers)
                if response.status_code == 200:
                    return response
                error = RequestError(response.body.decode(), status=response.status_code, code="cors")
                return error_response(error, {k: v for k, v in response.headers.items()
                                              if k.lower().startswith("access-control-")})

        middleware = []
        if self.cors_origins:
            middleware.append(Middleware(CORS, allow_origins=self.cors_origins,
                                         allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                         max_age=600))
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={HTTPException: self.http_error, Exception: self.server_error})

    # -- errors --
    async def http_error(self, request, exc):
        """Starlette's own errors (no route: 404, wrong method: 405) in OpenAI's shape."""
        path = request.url.path
        what = f"{request.method} {path if len(path) <= 200 else path[:200] + '...'}"
        if exc.status_code == 404:
            error = RequestError(f"no such endpoint: {what}", status=404, code="not_found")
        elif exc.status_code == 405:
            error = RequestError(f"method not allowed: {what}", status=405, code="method_not_allowed")
        else:
            error = RequestError(str(exc.detail), status=exc.status_code)
        return error_response(error, exc.headers)

    async def server_error(self, request, exc):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        return error_response(RequestError("internal server error", status=500, kind="server_error"))

    # -- GET --
    async def health(self, request):
        from starlette.responses import JSONResponse

        engine, svc = self.service.engine, self.service
        return JSONResponse({"status": "ok", "running": len(engine.running), "waiting": engine.queued,
                             "disconnected": svc.disconnected})

    def _model_card(self) -> dict:
        svc = self.service
        return {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "refusion-mlx"}

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        try:
            self.service.check_model(request.path_params["model_id"])
        except RequestError as e:
            return error_response(e)
        return JSONResponse(self._model_card())

    # -- POST --
    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def _generate(self, request, chat: bool):
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        from .openai_api import parse, stops

        svc = self.service
        try:
            body = await read_json(request)
            parsed = parse(body, chat)
            svc.check_model(parsed.model)
            svc.check_before_tokenizing(parsed, chat)
            ids = await run_in_threadpool(svc.tokenize, parsed, chat)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            jobs = svc.jobs(parsed, chat, ids, loop, queue)
            echo = ""
            if not chat and parsed.echo:
                echo = parsed.prompt if isinstance(parsed.prompt, str) else (
                    parsed.prompt[0] if isinstance(parsed.prompt[0], str) else svc.tokenizer.decode(ids))
            svc.submit(jobs)
        except RequestError as e:  # a body refused unread leaves the connection unusable: close it
            return error_response(e, {"Connection": "close"} if e.status in (408, 413) else None)
        except ClientDisconnect:
            log.info("a client left while sending its request")
            return Response(status_code=499)  # nobody reads it
        answers = [Answer(svc.tokenizer, job, stops(parsed)) for job in jobs]
        reply = Reply(chat, svc.model_id, len(ids), answers, echo)
        if parsed.stream:
            from starlette.responses import StreamingResponse

            usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(self._stream(reply, jobs, queue, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, reply, jobs, queue)

    def _left(self, jobs: List[Job], why: str):
        """The client went away: free its sequences, say so in one line."""
        for job in jobs:
            job.cancelled = True
        self.service.disconnected += 1
        log.info("a client left before its answer (%s); its sequences are cancelled", why)

    async def _whole(self, request, reply: Reply, jobs: List[Job], queue):
        from starlette.responses import JSONResponse, Response

        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            while not all(a.finished for a in reply.answers):
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self._left(jobs, "while its answer was decoded")
                    return Response(status_code=499)  # nobody reads it
                index, event = get.result()
                answer = reply.answers[index]
                if isinstance(event, Failed):
                    for job in jobs:
                        job.cancelled = True
                    return error_response(event.error)
                if isinstance(event, Committed):
                    answer.add(event.positions, event.tokens)
                else:
                    answer.done()
                if answer.finished:
                    jobs[index].cancelled = True  # a stop string or max_tokens: nothing more is needed
        finally:
            gone.cancel()
        return JSONResponse(reply.whole())

    async def _stream(self, reply: Reply, jobs: List[Job], queue, usage: bool):
        complete = False
        try:
            for i in range(len(jobs)):
                if reply.chat:
                    yield sse(reply.chunk(i, {"role": "assistant", "content": ""}))
                elif reply.echo:
                    yield sse(reply.chunk(i, reply.echo))
            open_choices = set(range(len(jobs)))
            while open_choices:
                index, event = await queue.get()
                if index not in open_choices:
                    continue
                answer = reply.answers[index]
                if isinstance(event, Failed):
                    complete = True
                    yield sse(event.error.body())
                    return
                if isinstance(event, Committed):
                    answer.add(event.positions, event.tokens)
                else:
                    answer.done()
                piece = answer.delta(final=answer.finished)
                if piece:
                    yield sse(reply.chunk(index, piece))
                if answer.finished:
                    jobs[index].cancelled = True
                    open_choices.discard(index)
                    yield sse(reply.chunk(index, None, answer.finish_reason))
            if usage:
                yield sse(reply.usage_chunk())
            yield sse("[DONE]")
            complete = True
        except Exception as e:  # the head is sent: the error can only be an event
            complete = True
            log.error("internal error in a stream: %s: %s", type(e).__name__, e)
            yield sse(RequestError("internal server error", status=500, kind="server_error").body())
        finally:
            if complete:
                for job in jobs:
                    job.cancelled = True
            else:
                self._left(jobs, "mid-stream")


def logged_once(app):
    """``app`` without the re-raise Starlette does after its 500 handler has answered and logged an
    error in one line: uvicorn would print the traceback again."""
    async def asgi(scope, receive, send):
        try:
            await app(scope, receive, send)
        except Exception:
            pass
    return asgi


def h11_protocol():
    """uvicorn's h11 protocol, with OpenAI's JSON for the errors it answers itself (a request h11
    cannot parse: 400; a head over MAX_HEAD: 431) and a deadline for every request head."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.protocol_error = None
            self.head_timer = None
            next_event = self.conn.next_event

            def watched():  # keeps h11's reason and status, which uvicorn drops
                try:
                    event = next_event()
                except h11.RemoteProtocolError as e:
                    self.protocol_error = e
                    raise
                if isinstance(event, h11.Request):
                    if self.head_timer is not None:
                        self.head_timer.cancel()
                    # h11 bounds only a head that arrives in pieces; one that came whole is measured here.
                    if len(event.target) > MAX_TARGET:
                        self.protocol_error = h11.RemoteProtocolError("request target too long", 414)
                        raise self.protocol_error
                    if len(event.target) + sum(len(k) + len(v) for k, v in event.headers) > MAX_HEAD:
                        self.protocol_error = h11.RemoteProtocolError("request head too large", 431)
                        raise self.protocol_error
                    names = {k for k, _ in event.headers}
                    if b"transfer-encoding" in names and b"content-length" in names:  # smuggling, as two lengths
                        self.protocol_error = h11.RemoteProtocolError(
                            "both Transfer-Encoding and Content-Length", 400)
                        raise self.protocol_error
                return event

            self.conn.next_event = watched

        def _arm(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timeout)

        def _head_timeout(self):
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str):
            e = self.protocol_error
            status = getattr(e, "error_status_hint", 400) if e is not None else 400
            error = RequestError(f"invalid HTTP request: {e or msg}", status=status, code="invalid_http_request")
            data = json.dumps(error.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                       (b"connection", b"close")]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers)))
                self.transport.write(self.conn.send(h11.Data(data=data)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # the request broke too early for h11 to answer it
                pass
            self.transport.close()

    return Protocol


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RefusionError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def make_server(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8080,
                max_concurrency: int = DEFAULT_MAX_CONCURRENCY, max_queue: int = DEFAULT_MAX_QUEUE,
                verbose: bool = False, cors_origins: Sequence[str] = (), prompt_cache_size: int = 0,
                prompt_cache_bytes: Optional[int] = None, max_kv_size: Optional[int] = None,
                keep_answers: bool = True):
    """(uvicorn server, its listening socket, engine): nothing serving or running yet.

    ``prompt_cache_size`` > 0 keeps that many finished requests' KV caches (at most
    ``prompt_cache_bytes``) for later requests that share their prefix."""
    import uvicorn

    from .kv.store import PromptCacheStore

    store = PromptCacheStore(prompt_cache_size, prompt_cache_bytes) if prompt_cache_size else None
    engine = Engine(model, max_concurrency, max_queue, store, max_kv_size, keep_answers)
    service = Service(model, tokenizer, model_id, engine)
    sock = listening_socket(host, port)
    config = uvicorn.Config(logged_once(App(service, cors_origins).build()), http=h11_protocol(), lifespan="off", ws="none",
                            log_config=None, access_log=verbose, server_header=False,
                            timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=3,
                            h11_max_incomplete_event_size=MAX_HEAD)
    return uvicorn.Server(config), sock, engine


# --- command line ----------------------------------------------------------------------------

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


def follow(model) -> int:
    """A rank other than 0: decode what rank 0 plans, serve nothing, until rank 0 says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop, and says so
    Engine(model, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE).run()
    return 0


def serve(args) -> int:
    from .distributed import is_leader, load_for_command

    if args.max_concurrency < 1 or args.max_queue < 1:
        raise RefusionError("--max-concurrency and --max-queue must be positive")
    if args.prompt_cache_size < 0 or (args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 1):
        raise RefusionError("--prompt-cache-size must be >= 0 and --prompt-cache-bytes positive")
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise RefusionError(f"--max-kv-size must be a positive integer, got {args.max_kv_size}")
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
        return follow(model)
    # What loading made (~200k objects: tokenizer, templates, modules) lives as long as the server:
    # out of the collector's sight, a full collection no longer stalls every sequence for ~0.1 s.
    gc.collect()
    gc.freeze()
    model_id = args.served_model_name or served_name(args.model)
    server, sock, engine = make_server(model, tokenizer, model_id, args.host, args.port, args.max_concurrency,
                                       args.max_queue, args.verbose, args.cors_origin, args.prompt_cache_size,
                                       args.prompt_cache_bytes, args.max_kv_size, not args.reprefill_answers)
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
