"""From a request body to the engine's jobs: the model's name and limits, the checks a request
passes before and after its prompt is tokenized, and one ``Job`` per choice.

Knob names and bounds come from ``settings.KNOB_TABLE``; a library error about a knob is said
in the request's names (``max_tokens``, ``blocks``...).
"""

import asyncio
import threading
import time
from dataclasses import replace
from typing import List, Optional

from ..engine import Engine, Job, RequestError
from ..errors import RefusionError
from ..settings import KNOB_TABLE

MODEL_ALIAS = "default_model"  # as mlx-lm: a name any client may use for the one model served
# The library's argument names as a request spells them (settings.KNOB_TABLE).
REQUEST_NAMES = {knob.name: knob.field for knob in KNOB_TABLE if knob.name != knob.field}


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
             or f"{n} must" in message or f"unknown {n} " in message]
    return RequestError(message, named[0] if named else None)


class Service:
    """What the HTTP handlers need: the model's name and limits, the tokenizer, the engine."""

    def __init__(self, model, tokenizer, model_id: str, engine: Engine):
        from ..tokenizer_utils import default_eos

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
        from ..openai_api import logprobs_asked
        from ..settings import settings_for

        max_tokens = request.max_tokens
        if chat and request.max_completion_tokens is not None:
            max_tokens = request.max_completion_tokens
        knobs = {knob.name: getattr(request, knob.field) for knob in KNOB_TABLE}
        knobs.update(gen_length=max_tokens, temperature=request.temperature or 0.0,
                     logprobs=logprobs_asked(request, chat))
        if request.top_k is not None:  # as mlx-lm: a negative top_k means no limit
            knobs["top_k"] = max(request.top_k, 0)
        try:
            return settings_for(self.model, prompt_length, preset=request.preset, **knobs)
        except RefusionError as e:
            raise _request_error(e, chat) from None

    def check_before_tokenizing(self, request, chat: bool):
        """Everything that can be refused without tokenizing: the knobs (for the shortest prompt)
        and the prompt's size in bytes."""
        from ..batch import DECODERS
        from ..openai_api import prompt_text_bytes

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
        from ..openai_api import messages
        from ..tokenizer_utils import prompt_ids

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
        from ..batch import PLAN_AND_INFILL

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
