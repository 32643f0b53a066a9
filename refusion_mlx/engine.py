"""The server's engine: the thread that owns the model and a ``scheduler.Scheduler``, admits accepted
requests (``Job``) between two steps and hands each one's commits back as typed events.

It knows nothing of HTTP: the server builds jobs and turns their events into OpenAI answers.
With a ``PromptCacheStore``, a request decodes in a copy of the stored cache that shares the
longest prefix with its prompt, and its own cache is stored when it ends.
"""

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .errors import RefusionError

log = logging.getLogger("refusion_mlx.server")


class RequestError(Exception):
    """A request we refuse: becomes an OpenAI-style JSON error with this status."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- what the engine tells the HTTP side ------------------------------------------------------

@dataclass
class Committed:
    """Tokens made final (positions in the generation, 0-based)."""

    positions: List[int]
    tokens: List[int]


@dataclass
class Finished:
    """The sequence is over: nothing more will come."""


@dataclass
class Failed:
    """The request failed (``error`` becomes its answer)."""

    error: RequestError


@dataclass
class Job:
    """One accepted request, as the decode thread and the HTTP side share it: the engine ``put``s
    ``Committed`` events, then ``Finished`` or ``Failed``, on ``events`` (anything with a
    thread-safe ``put``). The HTTP side sets ``cancelled`` (its client left, or it has its answer);
    the engine acts on it at its next step, the one place where sequences are cancelled."""

    prompt: List[int]
    settings: object  # DecodeSettings
    decoder: str
    max_tokens: int
    eos: frozenset
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens the prompt cache held (set when admitted)
    sequence: object = None  # the scheduler's Generation, once admitted


# --- the decode thread ----------------------------------------------------------------------

class Engine:
    """Owns the model and the scheduler: ``run`` admits jobs between steps and steps the batch.

    It runs in the thread that loaded the model (MLX streams belong to threads), the
    main one; the HTTP server's threads only hand jobs over and read their events.
    """

    def __init__(self, model, max_concurrency: int, max_queue: int, prompt_caches=None,
                 max_kv_size: Optional[int] = None, keep_answers: bool = True):
        from .scheduler import Scheduler

        self.model = model
        self.scheduler = Scheduler(model, max_active=max_concurrency)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.prompt_caches = prompt_caches  # a kv.store.PromptCacheStore, or None
        self.max_kv_size, self.keep_answers = max_kv_size, keep_answers  # for the caches requests decode in
        self.incoming: "queue.Queue[Job]" = queue.Queue()
        self.running: Dict[int, Job] = {}  # by the scheduler's uid
        self.stopping = threading.Event()
        self.halted = False  # set by a signal handler: no lock taken there (see ``halt``)

    @property
    def queued(self) -> int:
        return self.incoming.qsize() + len(self.scheduler.waiting)

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
                if not self.scheduler.busy:
                    continue
                for job in self.running.values():
                    if job.cancelled:
                        self.scheduler.cancel(job.sequence)
                try:
                    left = self.scheduler.step()
                except Exception as e:  # never take the server down: fail the jobs in the batch
                    log.exception("decoding failed")
                    self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
                    continue
                for seq in left:
                    self._left(seq)
        finally:
            self._fail_all("the server is shutting down", waiting=True)

    def _admit(self):
        """Hand new jobs to the scheduler (it admits them as rows free up); block only when idle."""
        block = not self.scheduler.busy
        while True:
            try:
                job = self.incoming.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if job is None:
                return
            block = False
            if job.cancelled:
                job.events.put(Finished())
                continue
            cache = self._prompt_cache(job.prompt)
            try:
                job.sequence = self.scheduler.add(job.prompt, job.settings, decoder=job.decoder,
                                                  eos_token_id=job.eos, on_commit=self._committed(job),
                                                  prompt_cache=cache)
            except RefusionError as e:
                job.events.put(Failed(RequestError(str(e))))
                continue
            job.cached_tokens = job.sequence.state.cached_tokens
            self.running[job.sequence.uid] = job

    def _prompt_cache(self, prompt: List[int]):
        """The cache a new request decodes in: a copy of the best stored one, or a fresh one (None
        without a store or a bound: the scheduler sizes the sequence's row to the request)."""
        from .kv import make_prompt_cache

        kept = self.prompt_caches.fetch(prompt) if self.prompt_caches is not None else None
        if kept is not None:
            return kept
        if self.prompt_caches is None and self.max_kv_size is None:
            return None
        return make_prompt_cache(self.model, self.max_kv_size, self.keep_answers)

    def _committed(self, job: Job):
        def on_commit(seq, commit):
            job.events.put(Committed(list(commit.positions), list(commit.tokens)))
            if seq.transcript.ended:  # everything the client can get is decided: finish now
                self.scheduler.finish_early(seq)
        return on_commit

    def _left(self, seq):
        job = self.running.pop(seq.uid)
        if seq.result is not None and seq.prompt_cache is not None and self.prompt_caches is not None:
            self.prompt_caches.store(seq.prompt_cache)
        job.events.put(Finished())

    def _fail_all(self, message: str, waiting: bool = False):
        error = RequestError(message, status=503 if waiting else 500, kind="server_error")
        for job in self.running.values():
            job.events.put(Failed(error))
        if waiting:
            while True:
                try:
                    job = self.incoming.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.events.put(Failed(error))
        for job in self.running.values():
            self.scheduler.cancel(job.sequence)
        self.running = {}
        try:
            self.scheduler.step()  # drops the cancelled sequences
        except Exception:
            log.exception("dropping the failed sequences failed")
