"""The HTTP application: Starlette's routes over one ``Service``, request bodies read with their
bounds, answers whole or as server-sent events, every error in OpenAI's JSON shape.
"""

import asyncio
import json
import logging
from typing import List, Optional, Sequence

from ..engine import Committed, Failed, Job, RequestError
from .answers import Answer, Reply
from .service import Service

log = logging.getLogger("refusion_mlx.server")

MAX_BODY = 4 * 2**20  # bytes in one request body
BODY_TIMEOUT = 30.0  # seconds a request has to send its body


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
        app = Starlette(routes=routes, middleware=middleware,
                        exception_handlers={HTTPException: self.http_error, Exception: self.server_error})

        async def asgi(scope, receive, send):
            # A trailing slash names the same endpoint (Starlette would answer a bare 307 with no body).
            path = scope.get("path", "")
            if len(path) > 1 and path.endswith("/"):
                scope = {**scope, "path": path.rstrip("/") or "/"}
            await app(scope, receive, send)

        return asgi

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
        # running: sequences decoding now (at most --max-concurrency); waiting: the queue behind them
        return JSONResponse({"status": "ok", "running": len(engine.scheduler.active), "waiting": engine.queued,
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

        from ..openai_api import parse, stops

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
                    answer.add(event.commit)
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
                    answer.add(event.commit)
                else:
                    answer.done()
                piece = answer.delta(final=answer.finished)
                entries = answer.scores(final=answer.finished) if answer.wants_logprobs else []
                if piece or entries:
                    yield sse(reply.chunk(index, piece, logprobs=reply.logprobs(answer, entries)))
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
