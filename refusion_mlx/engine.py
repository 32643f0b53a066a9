"""The server's engine: the thread that owns the model and a ``Batch``, admits accepted requests
(``Job``) between two steps and hands each one's commits back as events.

It knows nothing of HTTP: the server builds jobs and turns their events into OpenAI answers.
"""

import queue
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .errors import RefusionError


class RequestError(Exception):
    """A request we refuse: becomes an OpenAI-style JSON error with this status."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One accepted request, as the decode thread and the HTTP side share it: the engine ``put``s
    ``("commit", (positions, tokens))``, then ``("done", None)`` or ``("error", RequestError)`` on
    ``events`` (anything with a thread-safe ``put``)."""

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
        self.halted = False  # set by a signal handler: no lock taken there (see ``halt``)

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

    def halt(self):
        """Make ``run`` return within one step or half a second; safe in a signal handler, which may
        interrupt this very thread while it holds a queue's lock (``stop`` would wait on it forever)."""
        self.halted = True

    def run(self):
        """Admit and decode until ``stop`` (or Ctrl-C); jobs still open then get a 503."""
        try:
            while not (self.stopping.is_set() or self.halted):
                self._admit()
                if not self.batch.active:
                    continue
                for job in self.running.values():
                    if job.cancelled:
                        self.batch.cancel(job.sequence)
                try:
                    left = self.batch.step()
                except Exception as e:  # never take the server down: fail the jobs in the batch
                    self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
                    continue
                for seq in left:
                    job = self.running.pop(id(seq))
                    job.events.put(("done", None))
        finally:
            self._fail_all("the server is shutting down", waiting=True)

    def _admit(self):
        """Move new jobs into the batch while there is room; block only when nothing runs."""
        block = not self.batch.active and not self.waiting
        while True:
            try:
                job = self.incoming.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                break
            if job is None:
                return
            self.waiting.append(job)
            block = False
        while self.waiting and len(self.batch.active) < self.max_concurrency:
            job = self.waiting.pop(0)
            if job.cancelled:
                job.events.put(("done", None))
                continue
            try:
                job.sequence = self.batch.add(job.prompt, job.settings, decoder=job.decoder,
                                              eos_token_id=job.eos, on_commit=self._committed(job))
            except RefusionError as e:
                job.events.put(("error", RequestError(str(e))))
                continue
            self.running[id(job.sequence)] = job

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
