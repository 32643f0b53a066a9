"""From a job's commits to OpenAI's response objects: one ``Answer`` per choice (its text read by a
``transcript.TextTranscript``, and what of it was streamed), one ``Reply`` per request.
"""

import time
import uuid
from typing import List, Optional

from ..engine import Job
from ..transcript import Commit, TextTranscript


class Answer:
    """The text of one choice as its job's commits arrive (gap-free, cut at EOS, max_tokens and
    stops: ``TextTranscript``), and how much of it was streamed."""

    def __init__(self, tokenizer, job: Job, stops: List[str]):
        self.job = job
        self.transcript = TextTranscript(job.eos, job.max_tokens, tokenizer, stops)
        self.sent = 0  # characters of text already streamed
        self.scored = 0  # gap-free positions whose logprobs were already given

    def add(self, commit: Commit):
        self.transcript.add(commit)

    def done(self):
        self.transcript.end()

    @property
    def text(self) -> str:
        return self.transcript.text

    @property
    def finish_reason(self) -> Optional[str]:
        return self.transcript.finish_reason

    @property
    def finished(self) -> bool:
        return self.transcript.finished

    def returned_tokens(self) -> int:
        return self.transcript.returned_tokens()

    def delta(self, final: bool = False) -> str:
        """Text not streamed yet that can no longer change (all of it when ``final``)."""
        text = self.transcript.text if final else self.transcript.stable_text()
        if len(text) <= self.sent:
            return ""
        piece = text[self.sent:]
        self.sent = len(text)
        return piece

    @property
    def wants_logprobs(self) -> bool:
        return self.job.settings.logprobs is not None

    def scores(self, final: bool = False) -> List[tuple]:
        """(position, token, logprob, top pairs) of the returned tokens not given yet whose text is
        streamed (all of them when ``final``); EOS has no text and no entry."""
        t = self.transcript
        upto = t.returned_tokens() if final else t.covering(self.sent)
        if upto <= self.scored:
            return []
        entries = t.prefix_scores(self.scored, upto)
        self.scored = upto
        return [e for e in entries if e[1] not in t.eos_ids]


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

    def logprobs(self, answer: Answer, entries: List[tuple]) -> Optional[dict]:
        """OpenAI's logprobs object for these ``Answer.scores`` entries (None when not asked)."""
        if not answer.wants_logprobs:
            return None
        from ..tokenizer_utils import token_bytes

        tokenizer = answer.transcript.tokenizer
        decode = tokenizer.decode
        if self.chat:
            def item(token, logprob):  # bytes: the token's own, even when it holds part of a character
                return {"token": decode([token]), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}
            return {"content": [{**item(token, lp), "top_logprobs": [item(*pair) for pair in top]}
                                for _, token, lp, top in entries], "refusal": None}
        return {"tokens": [decode([token]) for _, token, _, _ in entries],
                "token_logprobs": [lp for _, _, lp, _ in entries],
                "top_logprobs": [{decode([t]): v for t, v in top} for _, _, _, top in entries],
                "text_offset": [len(self.echo) + answer.transcript.offset(position) for position, _, _, _ in entries]}

    def whole(self) -> dict:
        choices = []
        for i, a in enumerate(self.answers):
            logprobs = self.logprobs(a, a.scores(final=True)) if a.wants_logprobs else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": a.text},
                                "finish_reason": a.finish_reason, "logprobs": logprobs})
            else:
                choices.append({"index": i, "text": self.echo + a.text, "finish_reason": a.finish_reason,
                                "logprobs": logprobs})
        out = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        out["usage"] = self.usage()
        return out

    def chunk(self, index: int, content, finish_reason: Optional[str] = None, logprobs: Optional[dict] = None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": content or "", "finish_reason": finish_reason, "logprobs": logprobs}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = self.usage()
        return out
