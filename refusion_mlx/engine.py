"""The server's engine: the thread that owns the model and a ``scheduler.Scheduler``, admits accepted
requests (``Job``) between two steps and hands each one's commits back as typed events.

It knows nothing of HTTP: the server builds jobs and turns their events into OpenAI answers.
With a ``PromptCacheStore``, a request decodes in a copy of the stored cache that shares the
longest prefix with its prompt, and its own cache is stored when it ends.
"""

import dataclasses
import itertools
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .distributed import broadcast_json
from .errors import RefusionError
from .transcript import Commit

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
    """Tokens made final: one decoder ``Commit`` (positions in the generation, 0-based, and the
    tokens' logprobs when asked); it is never changed after it is made, so threads share it."""

    commit: Commit


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
    number: int = -1  # the engine's name for it, the same on every rank

    def spec(self) -> dict:
        """What another rank needs to decode this job as rank 0 does (JSON)."""
        return {"number": self.number, "prompt": list(self.prompt), "settings": dataclasses.asdict(self.settings),
                "decoder": self.decoder, "max_tokens": self.max_tokens, "eos": sorted(self.eos)}

    @classmethod
    def from_spec(cls, spec: dict) -> "Job":
        from .settings import DecodeSettings

        return cls(spec["prompt"], DecodeSettings(**spec["settings"]), spec["decoder"], spec["max_tokens"],
                   frozenset(spec["eos"]), number=spec["number"])


# --- the decode thread ----------------------------------------------------------------------

class Engine:
    """Owns the model and the scheduler: ``run`` admits jobs between steps and steps the batch.

    It runs in the thread that loaded the model (MLX streams belong to threads), the
    main one; the HTTP server's threads only hand jobs over and read their events.
    """

    def __init__(self, model, max_concurrency: int, max_queue: int, prompt_caches=None,
                 max_kv_size: Optional[int] = None, keep_answers: bool = True, prefill_step: Optional[int] = None):
        from .scheduler import Scheduler

        self.model = model
        self.scheduler = Scheduler(model, max_active=max_concurrency, prefill_step=prefill_step)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.prompt_caches = prompt_caches  # a kv.store.PromptCacheStore, or None
        self.max_kv_size, self.keep_answers = max_kv_size, keep_answers  # for the caches requests decode in
        self.incoming: "queue.Queue[Job]" = queue.Queue()
        self.running: Dict[int, Job] = {}  # by the scheduler's uid
        self.group = getattr(model, "group", None)  # split across ranks: rank 0 plans every step
        self.numbers = itertools.count()
        self.planned: Dict[int, Job] = {}  # rank 0: jobs in the plan being sent, by number
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
        """Admit and decode until ``stop`` (or Ctrl-C); jobs still open then get a 503.

        Split across ranks (``model.group``), every rank runs this loop: before each step rank 0
        sends what it decided (``_plan``: jobs to add, jobs to cancel, or stop) and every rank
        applies it (``_apply``), so every rank's scheduler holds the same sequences; what happens
        inside a step follows from logits that are identical on every rank.
        """
        try:
            while True:
                plan = broadcast_json(self._plan(), self.group)
                if plan["stop"]:
                    break
                self._apply(plan)
                if not self.scheduler.busy:
                    continue
                try:
                    left = self.scheduler.step()
                except Exception as e:  # never take the server down: fail the jobs in the batch
                    log.exception("decoding failed")
                    self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
                    if self.group is not None:
                        raise  # the ranks may no longer agree
                    continue
                for seq in left:
                    self._left(seq)
        finally:
            self._fail_all("the server is shutting down", waiting=True)

    def _plan(self) -> Optional[dict]:
        """Rank 0's decisions for the next step: new jobs, cancelled ones, or stop. Blocks for a new
        job only when nothing runs. None on the other ranks (they take rank 0's)."""
        if self.group is not None and self.group.rank() != 0:
            return None
        block, adds = not self.scheduler.busy, []
        while not (self.stopping.is_set() or self.halted):
            try:
                job = self.incoming.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if block:
                    continue
                break
            if job is None:
                break
            block = False
            if job.cancelled:
                job.events.put(Finished())
                continue
            job.number = next(self.numbers)
            if self.group is not None and job.settings.temperature > 0 and job.settings.seed is None:
                # Every rank must draw the same samples: one seed for all, from here.
                job.settings = dataclasses.replace(job.settings, seed=int.from_bytes(os.urandom(4), "little"))
            self.planned[job.number] = job
            adds.append(job.spec())
        if self.stopping.is_set() or self.halted:
            return {"stop": True}
        cancels = [job.number for job in self.running.values() if job.cancelled]
        return {"stop": False, "add": adds, "cancel": cancels}

    def _apply(self, plan: dict):
        """Hand the plan's jobs to the scheduler and cancel the plan's cancelled ones, the same on
        every rank (the one place where sequences are cancelled)."""
        for spec in plan["add"]:
            job = self.planned.pop(spec["number"], None) or Job.from_spec(spec)  # other ranks: a job of their own
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
        cancelled = set(plan["cancel"])
        for job in self.running.values():
            if job.number in cancelled:
                self.scheduler.cancel(job.sequence)

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
            job.events.put(Committed(commit))
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
