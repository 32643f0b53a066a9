"""The server under the application: uvicorn's h11 protocol with our bounds and JSON errors, the
listening socket, and ``make_server``, which puts the engine, the service and the app together.
"""

import json
import socket
from typing import Optional, Sequence

from ..engine import Engine, RequestError
from ..errors import RefusionError
from .http import App
from .service import Service

MAX_HEAD = 16 * 2**10  # bytes in a request line and its headers (beyond: 431)
MAX_TARGET = 8 * 2**10  # bytes in a request's path and query (beyond: 414)
HEAD_TIMEOUT = 10.0  # seconds a connection has to send a whole request head
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
LINGER = 2.0  # seconds a connection answered before its body was read still reads (and drops) that body
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAX_QUEUE = 256
DEFAULT_PREFILL_STEP = 512  # prompt tokens a request feeds per step: a long prompt never stalls the others


def logged_once(app):
    """``app`` without the re-raise Starlette does after its 500 handler has answered and logged an
    error in one line: uvicorn would print the traceback again."""
    async def asgi(scope, receive, send):
        try:
            await app(scope, receive, send)
        except Exception:
            pass
    return asgi


class Lingering:
    """A transport whose ``close`` is a lingering close while the client is still sending a body
    that was refused unread (a 413): the answer is followed by FIN, what the client still sends is
    dropped, and the socket is closed ``LINGER`` seconds later. Closing at once would make the
    kernel answer the unread bytes with a reset, and a client that writes its whole body before
    reading (``http.client``) would see the reset instead of the 413."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self):
        import h11

        t = self._transport
        if self.lingering or t.is_closing():
            return
        if self._protocol.conn.their_state is not h11.SEND_BODY or not t.can_write_eof():
            t.close()
            return
        self.lingering = True
        t.write_eof()
        t.resume_reading()  # uvicorn may have paused it while the unread body piled up
        self._protocol.loop.call_later(LINGER, t.close)


def checked_request(event):
    """An h11 ``Request`` as the app may take it, or ``h11.RemoteProtocolError`` with its status:
    h11 bounds only a head that arrives in pieces, reads any HTTP/d.d and accepts both lengths."""
    import h11

    if len(event.target) > MAX_TARGET:
        raise h11.RemoteProtocolError("request target too long", 414)
    if len(event.target) + sum(len(k) + len(v) for k, v in event.headers) > MAX_HEAD:
        raise h11.RemoteProtocolError("request head too large", 431)
    if event.http_version not in (b"1.0", b"1.1"):  # HTTP/2's preface reads as HTTP/2.0
        raise h11.RemoteProtocolError(f"HTTP/{event.http_version.decode()} is not supported (HTTP/1.1 is)", 505)
    names = {k for k, _ in event.headers}
    if b"transfer-encoding" in names and b"content-length" in names:  # smuggling, as two lengths
        raise h11.RemoteProtocolError("both Transfer-Encoding and Content-Length", 400)
    if event.target.lower().startswith((b"http://", b"https://")):  # absolute-form (RFC 9112 3.2.2)
        path = event.target.split(b"/", 3)[3] if event.target.count(b"/") >= 3 else b""
        return h11.Request(method=event.method, target=b"/" + path, headers=event.headers,
                           http_version=event.http_version)
    return event


def h11_protocol():
    """uvicorn's h11 protocol, with OpenAI's JSON for the errors it answers itself (a request h11
    cannot parse: 400; a head over MAX_HEAD: 431; an HTTP version other than 1.0/1.1: 505) and a
    deadline for every request head."""
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
                    if isinstance(event, h11.Request):
                        if self.head_timer is not None:
                            self.head_timer.cancel()
                        event = checked_request(event)
                except h11.RemoteProtocolError as e:
                    self.protocol_error = e
                    raise
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
            super().connection_made(Lingering(transport, self))
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def data_received(self, data: bytes):
            if self.transport.lingering:  # answered and closing: the rest of a refused body is dropped
                return
            super().data_received(data)

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
                keep_answers: bool = True, prefill_step: Optional[int] = DEFAULT_PREFILL_STEP):
    """(uvicorn server, its listening socket, engine): nothing serving or running yet.

    ``prompt_cache_size`` > 0 keeps that many finished requests' KV caches (at most
    ``prompt_cache_bytes``) for later requests that share their prefix. ``prefill_step``: most
    prompt tokens one request feeds per step (None: its whole prompt at once)."""
    import uvicorn

    from ..kv.store import PromptCacheStore

    store = PromptCacheStore(prompt_cache_size, prompt_cache_bytes) if prompt_cache_size else None
    engine = Engine(model, max_concurrency, max_queue, store, max_kv_size, keep_answers, prefill_step)
    service = Service(model, tokenizer, model_id, engine)
    sock = listening_socket(host, port)
    config = uvicorn.Config(logged_once(App(service, cors_origins).build()), http=h11_protocol(), lifespan="off", ws="none",
                            log_config=None, access_log=verbose, server_header=False,
                            timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=3,
                            h11_max_incomplete_event_size=MAX_HEAD)
    return uvicorn.Server(config), sock, engine
