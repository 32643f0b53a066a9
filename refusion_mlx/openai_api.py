"""OpenAI's chat and completions request bodies as typed models, and what we do with each field.

Every field of OpenAI's two schemas (and mlx-lm's sampling extras) is declared here, so a client
never gets "unrecognized argument" for a field it may send. Each one is either honoured, or
accepted as a no-op while its value is neutral (``frequency_penalty: 0``, ``tools: []``...) and refused with a 400 naming it when its value asks for something this
server does not do (``NEUTRAL``). ReFusion's own knobs (``slot_size``, ``blocks``...) come on top.
Parsing is strict: no string is read as a number, no number as a bool.
"""

import math
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import RequestError
from .sampling import MAX_TOP_LOGPROBS

MAX_STOPS = 4  # as OpenAI
MAX_N = 16  # choices per request: each is a sequence in the batch
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message. Content is a string, a list of text parts, or null (an assistant turn that
    only called tools); the fields OpenAI adds to messages are accepted and passed to the template."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal[ROLES]
    content: Union[str, List[Union[TextPart, Dict[str, Any]]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[Dict[str, Any]] = None
    refusal: Optional[str] = None
    audio: Optional[Dict[str, Any]] = None


class StreamOptions(Strict):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # we send no obfuscation padding either way


Stop = Union[str, List[str], None]


class Common(Strict):
    """Fields both endpoints take."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, ge=-1)  # mlx-lm's extra; 0 or -1: off
    min_p: Optional[float] = None  # mlx-lm's extra
    repetition_penalty: Optional[float] = None  # mlx-lm's extra
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    seed: Optional[int] = None
    stop: Stop = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[Dict[str, Any]] = None
    user: Optional[str] = None
    # ReFusion's knobs. Decoding knobs' bounds are checked by settings.KNOB_TABLE's one validator.
    slot_size: Optional[int] = None
    blocks: Optional[int] = None
    slot_threshold: Optional[float] = None
    token_threshold: Optional[float] = None
    plan_slots: Optional[int] = None
    preset: Optional[str] = None
    decoder: Optional[str] = None


class ChatRequest(Common):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[Dict[str, Any]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Union[str, Dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[List[Dict[str, Any]]] = None
    function_call: Union[str, Dict[str, Any], None] = None
    store: Optional[bool] = None  # nothing is stored either way
    metadata: Optional[Dict[str, Any]] = None
    service_tier: Optional[str] = None
    modalities: Optional[List[str]] = None
    audio: Optional[Dict[str, Any]] = None
    prediction: Optional[Dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[Dict[str, Any]] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None  # vLLM's and mlx-lm's extra


class CompletionRequest(Common):
    prompt: Union[str, List[str], List[int], None] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = Field(None, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI: 5; vLLM and we: 20
    suffix: Optional[str] = None


def _neutral_tool_choice(value) -> bool:
    return value in (None, "none", "auto")


# field -> (is the value neutral?, what to say when it is not). Only these values are no-ops.
NEUTRAL = {
    "repetition_penalty": (lambda v: v in (None, 1.0), "repetition_penalty is not supported (1: off)"),
    "frequency_penalty": (lambda v: not v, "frequency_penalty is not supported (0: off)"),
    "presence_penalty": (lambda v: not v, "presence_penalty is not supported (0: off)"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "response_format": (lambda v: v is None or v.get("type") == "text",
                        "response_format other than text is not supported"),
    "tools": (lambda v: not v, "tool calling is not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "tool_choice": (_neutral_tool_choice, "tool calling is not supported"),
    "function_call": (_neutral_tool_choice, "function calling is not supported"),
    "modalities": (lambda v: v is None or list(v) == ["text"], "only the text modality is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "chat_template_kwargs": (lambda v: not v or set(v) <= {"enable_thinking"},
                             "chat_template_kwargs takes only enable_thinking"),
}


def _path(loc) -> str:
    """pydantic's error location as a JSON path (union member tags left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += ("." if out else "") + part
    return out


def parse(body: dict, chat: bool):
    """The request body as a ChatRequest or CompletionRequest; RequestError naming the first bad field."""
    try:
        request = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        path = _path(error["loc"]) or ("messages" if chat else "prompt")
        param = path.split(".")[0].split("[")[0]
        if error["type"] == "extra_forbidden":
            raise RequestError(f"unrecognized request argument: {path}", param) from None
        if error["type"] == "missing":
            raise RequestError(f"'{path}' is required", param) from None
        raise RequestError(f"'{path}': {error['msg']}", param) from None
    for name in request.model_fields_set:
        rule = NEUTRAL.get(name)
        if rule and not rule[0](getattr(request, name)):
            raise RequestError(f"'{name}': {rule[1]}", name)
    for name in ("temperature", "top_p", "min_p", "slot_threshold", "token_threshold"):
        value = getattr(request, name)
        if value is not None and not math.isfinite(value):
            raise RequestError(f"'{name}' must be a finite number", name)
    if request.stop is not None:
        stops = [request.stop] if isinstance(request.stop, str) else request.stop
        if not all(stops) or len(stops) > MAX_STOPS:
            raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them",
                               "stop")
    if chat and request.top_logprobs and not request.logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not chat and request.logprobs is not None and request.echo:
        raise RequestError("'logprobs' with 'echo' is not supported (the prompt's logprobs are not computed)",
                           "logprobs")
    if not chat and request.best_of not in (None, request.n or 1):
        raise RequestError("'best_of' other than n is not supported", "best_of")
    return request


def logprobs_asked(request, chat: bool) -> Optional[int]:
    """How many alternatives per token the request wants logprobs for (0: the chosen token's
    only), or None when it wants none."""
    if chat:
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def stops(request) -> List[str]:
    if request.stop is None:
        return []
    return [request.stop] if isinstance(request.stop, str) else list(request.stop)


def messages(request: ChatRequest) -> List[dict]:
    """The messages as the chat template takes them: text parts joined, null content empty,
    ``developer`` (OpenAI's newer name for system) as ``system``."""
    out = []
    for k, m in enumerate(request.messages):
        content = m.content
        if isinstance(content, list):
            if not all(isinstance(p, TextPart) for p in content):
                raise RequestError(f"messages[{k}].content: only text parts are supported", "messages")
            content = "".join(p.text for p in content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        for extra in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, extra) is not None:
                message[extra] = getattr(m, extra)
        out.append(message)
    return out


def prompt_text_bytes(request, chat: bool) -> int:
    """UTF-8 bytes of the prompt's text: measured before any tokenizing (0 for token ids)."""
    if chat:
        texts = []
        for m in request.messages:
            if isinstance(m.content, str):
                texts.append(m.content)
            elif isinstance(m.content, list):
                texts.extend(p.text for p in m.content if isinstance(p, TextPart))
    else:
        texts = [request.prompt] if isinstance(request.prompt, str) else (
            [p for p in request.prompt if isinstance(p, str)] if isinstance(request.prompt, list) else [])
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
