"""ReFusion as an lm-evaluation-harness model, registered as ``refusion``.

Importing this module imports lm-eval (the ``eval`` extra) and registers the model, so that
``lm_eval.simple_evaluate(model="refusion", ...)`` and lm-eval's own command line
(``python -m refusion_mlx.lm_eval_cli``) find it. Nothing in the base package imports it.

- ``generate_until``: the prompts of each task decoded together by ``batch.batch_generate_ids``
  (plan-and-infill, or left to right with ``decoder="left-to-right"``), with the paper's knobs
  for the task (``presets.PRESETS``, chosen by task name) under any knob given explicitly. Each
  sequence runs to EOS or its budget, as upstream's harness does; the text is then cut at the
  first of the request's ``until`` strings.
- ``loglikelihood`` / ``loglikelihood_rolling``: exact causal scoring, a sum of next-token log
  probabilities from direct forwards of the model (several requests per forward, left-padded
  and masked). Upstream estimates these by Monte Carlo over random maskings instead; see
  docs/evaluation.md for what that means for comparing numbers.

``usage`` records per task what the requests cost (tokens, model calls, wall time).
"""

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
import lm_eval.models  # noqa: F401  (lm-eval's own names, which a first registration would hide)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .batch import DECODERS, PLAN_AND_INFILL, batch_generate_ids
from .errors import RefusionError
from .presets import PRESETS

NAME = "refusion"
# lm-eval task names (upstream eval.sh's tasks and their relatives) -> the paper's preset.
# A task matches a prefix when its name is the prefix or starts with prefix + "_".
TASK_PRESETS = (
    ("gsm8k", "gsm8k"), ("minerva_math", "math"), ("hendrycks_math", "math"), ("mbpp", "mbpp"),
    ("humaneval", "humaneval"), ("gpqa", "gpqa"), ("arc_challenge", "arc"), ("arc_easy", "arc"),
    ("mmlu_pro", "mmlu-pro"),
)
CODE_PRESETS = ("mbpp", "humaneval")  # upstream keeps the ```python block of these answers
CODE_BLOCK = re.compile(r"```python\n(.*?)\n```", re.DOTALL)
DEFAULT_BATCH_SIZE = 8
WARM_UP_TOKENS = 32
MASK_ELEMENTS = 1 << 26  # a padded scoring batch's (rows, width, width) mask stays below this


def preset_for(task_name: Optional[str]) -> Optional[str]:
    """The paper's preset for an lm-eval task name, or None."""
    name = (task_name or "").lower().replace("-", "_")
    for prefix, preset in TASK_PRESETS:
        if name == prefix or name.startswith(prefix + "_"):
            return preset
    return None


def cut_at_stop(text: str, until: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (all of it when none occurs)."""
    ends = [text.find(s) for s in until if s]
    ends = [e for e in ends if e >= 0]
    return text[: min(ends)] if ends else text


@dataclass
class Usage:
    """What one task's requests cost. Generated tokens are counted before stop strings cut the
    text (the decoder produced them); model calls are each sequence's own forwards, summed
    (sequences decoded together share a forward, so batched forwards are fewer)."""

    requests: int = 0
    tokens: int = 0
    model_calls: int = 0
    tokens_fed: int = 0  # tokens the decoder's forwards processed for these sequences (drafts included)
    seconds: float = 0.0
    scored_tokens: int = 0  # log-likelihood requests: continuation tokens scored
    forwards: int = 0  # log-likelihood requests: batched forwards run

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.model_calls if self.model_calls else 0.0


@dataclass
class Masked:
    """A view for a forward without cache: the (B, 1, L, L) boolean mask each query attends with."""

    mask: mx.array
    attend: None = None


def score_rows(model, rows: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> List[Tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding gives it) for each row, in one forward.

    A row is (inputs, continuation): ``inputs`` is context + continuation without its last token,
    and the continuation is predicted by the logits of the last ``len(continuation)`` inputs.
    Rows are left-padded to one width; each real token sees only its own row's real tokens at
    positions 0, 1, ... (padding queries see themselves only), so every row scores as it would
    alone: the causal forward ``model(mx.array([inputs]))``.
    """
    width = max(len(x) for x, _ in rows)
    last = max(len(c) for _, c in rows)
    pads = np.array([width - len(x) for x, _ in rows])
    tokens = np.zeros((len(rows), width), dtype=np.int32)
    for b, (x, _) in enumerate(rows):
        tokens[b, pads[b]:] = x
    if not pads.any():
        logits = model(mx.array(tokens), last=last)
    else:
        positions = np.maximum(np.arange(width)[None] - pads[:, None], 0).astype(np.int32)
        q, k = np.arange(width)[:, None], np.arange(width)[None]
        visible = (k <= q)[None] & ((k >= pads[:, None, None]) | (k == q)[None])
        logits = model(mx.array(tokens), mx.array(positions), view=Masked(mx.array(visible)[:, None]), last=last)
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy = mx.argmax(logits, axis=-1)
    mx.eval(logprobs, greedy)
    logprobs, greedy = np.array(logprobs), np.array(greedy)
    out = []
    for b, (_, cont) in enumerate(rows):
        cont = np.asarray(cont)
        lp, g = logprobs[b, last - len(cont):], greedy[b, last - len(cont):]
        out.append((float(lp[np.arange(len(cont)), cont].sum()), bool((g == cont).all())))
    return out


def scoring_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped for ``score_rows``: longest first (similar widths share a forward), at most
    ``batch_size`` rows, and a batch's padding mask kept below ``MASK_ELEMENTS``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            width = lengths[current[0]]
            if len(current) < batch_size and (len(current) + 1) * width * width <= MASK_ELEMENTS:
                current.append(i)
                continue
        batches.append([i])
    return batches


def load_model_and_tokenizer(model, tokenizer, adapter_path, dtype):
    """``model`` as given (with its tokenizer), or loaded from a path or repo (default: the demo)."""
    if tokenizer is not None:
        return model, tokenizer
    from .loading import load

    return load(model, adapter_path=adapter_path, dtype=dtype)


def positive_int(name: str, value) -> int:
    """An int, or the digits lm-eval's argument strings give, of at least 1."""
    if isinstance(value, bool) or not (isinstance(value, int) or str(value).strip().isdigit()) or int(value) < 1:
        raise RefusionError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@register_model(NAME)
class RefusionLM(TemplateLM):
    """lm-eval's model interface over a ReFusion checkpoint.

    Args (lm-eval's ``--model_args``, or keywords):
        model / pretrained: a folder or Hugging Face repo id (default: the packaged demo), or a
            model from ``load`` (then pass ``tokenizer`` too).
        decoder: ``plan-and-infill`` (default) or ``left-to-right`` (the baseline, same weights).
        preset: ``auto`` (default: the paper's knobs for the task, by name), ``none``, or a
            preset name for every task.
        max_tokens, slot_size, blocks, slot_threshold, token_threshold: knobs over the preset's.
            Without max_tokens the budget is the preset's (512), else the task's max_gen_toks,
            else the model's; fitted to the model's positions.
        batch_size: prompts decoded (or requests scored) together (default 8; ``auto`` too).
        max_batch_size, device: lm-eval passes them to every model; unused (MLX picks its device).
    """

    def __init__(self, model=None, tokenizer=None, pretrained=None, adapter_path=None, dtype=None,
                 decoder: str = PLAN_AND_INFILL, preset: str = "auto", max_tokens=None, slot_size=None,
                 blocks=None, slot_threshold=None, token_threshold=None, batch_size=None,
                 max_batch_size=None, device=None):
        super().__init__()
        from .decode import settings_for
        from .tokenizer_utils import default_eos

        if decoder not in DECODERS:
            raise RefusionError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")
        if preset not in ("auto", "none") and preset not in PRESETS:
            raise RefusionError(f"unknown preset {preset!r} (choose from auto, none, {', '.join(sorted(PRESETS))})")
        self.decoder, self.preset = decoder, preset
        self.knobs = {k: v for k, v in dict(gen_length=max_tokens, slot_size=slot_size, serial_num_blocks=blocks,
                                             slot_threshold=slot_threshold, token_threshold=token_threshold).items()
                      if v is not None}
        settings_for(None, **self.knobs)  # bad knobs fail before the weights load
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size in (None, "auto") else positive_int("batch_size", batch_size)
        self.model, self.tokenizer = load_model_and_tokenizer(model if model is not None else pretrained,
                                                              tokenizer, adapter_path, dtype)
        given = model if model is not None else pretrained
        self.model_name = str(given) if isinstance(given, (str, Path)) else "demo" if given is None else "model"
        self.eos = frozenset(default_eos(self.tokenizer))
        self.max_length = self.model.args.max_position_embeddings
        self.special = sorted(set(getattr(self.tokenizer, "all_special_tokens", None) or []), key=len, reverse=True)
        self.usage: Dict[Optional[str], Usage] = {}
        self.warm = False
        self.scoring_task: Optional[str] = None  # whose usage ``_score`` counts

    # --- what lm-eval asks of a TemplateLM ---------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    @property
    def tokenizer_name(self) -> str:
        return str(self.model_name).replace("/", "__")

    def apply_chat_template(self, chat_history: List[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model's template writes it, thinking on (as upstream evaluates and as
        ``tokenizer_utils.prompt_ids`` builds prompts)."""
        extra = {} if add_generation_prompt else {"continue_final_message": True}
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=True, **extra)

    def get_model_info(self) -> dict:
        """Added to lm-eval's results["config"]: the decoder, the knobs, and what each task cost."""
        return {"refusion_decoder": self.decoder, "refusion_preset": self.preset,
                "refusion_batch_size": self.batch_size, "refusion_knobs": dict(self.knobs),
                "refusion_usage": {task: asdict(u) for task, u in self.usage.items()}}

    # --- generation --------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Each task's prompts decoded together; texts cut at the first ``until`` string."""
        out: List[Optional[str]] = [None] * len(requests)
        for task, indices in self._by_task(requests).items():
            prompts, knobs, stops = [], [], []
            for i in indices:
                context, gen_kwargs = requests[i].args
                ids, k = self._prompt_and_knobs(task, context, gen_kwargs or {})
                prompts.append(ids)
                knobs.append(k)
                stops.append((gen_kwargs or {}).get("until") or [])
            code = self._preset(task) in CODE_PRESETS
            if not self.warm:  # kernels built outside the timed runs (a short generation is enough)
                batch_generate_ids(self.model, prompts[:1], knobs=[{**knobs[0], "gen_length": min(
                    knobs[0]["gen_length"], WARM_UP_TOKENS)}], decoder=self.decoder, eos_token_id=sorted(self.eos))
                self.warm = True
            tic = time.perf_counter()
            results = batch_generate_ids(self.model, prompts, knobs=knobs, decoder=self.decoder,
                                         max_batch_size=self.batch_size, eos_token_id=sorted(self.eos))
            usage = self.usage.setdefault(task, Usage())
            usage.seconds += time.perf_counter() - tic
            for i, result, until in zip(indices, results, stops):
                usage.requests += 1
                usage.tokens += len(result.tokens)
                usage.model_calls += result.model_calls
                usage.tokens_fed += result.tokens_fed
                text = self.finish_text(result.tokens, until, code)
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                out[i] = text
        return out

    def _preset(self, task: Optional[str]) -> Optional[str]:
        if self.preset == "auto":
            return preset_for(task)
        return None if self.preset == "none" else self.preset

    def _prompt_and_knobs(self, task: Optional[str], context: str, gen_kwargs: dict) -> Tuple[List[int], dict]:
        """The prompt ids (left-truncated if the budget needs the room) and the knobs of one request."""
        preset = self._preset(task)
        budget = self.knobs.get("gen_length") or (PRESETS[preset]["gen_length"] if preset else None) \
            or gen_kwargs.get("max_gen_toks") or self.model_budget()
        budget = min(int(budget), self.max_length - 1)
        ids = self.tok_encode(context)
        ids = ids[-(self.max_length - budget):]
        knobs = {**({"preset": preset} if preset else {}), **self.knobs, "gen_length": budget}
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") and temperature > 0:
            knobs["temperature"] = temperature
        return ids, knobs

    def model_budget(self) -> int:
        from .decode import settings_for

        return settings_for(self.model).gen_length

    def finish_text(self, tokens: Sequence[int], until: Sequence[str], code: bool) -> str:
        """Decoded text, cut at the first stop string, special tokens removed (upstream's order);
        for the code presets, the ```python block when there is one (as upstream)."""
        if isinstance(until, str):
            until = [until]
        text = self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=False)
        text = cut_at_stop(text, until)
        for token in self.special:
            text = text.replace(token, "")
        match = CODE_BLOCK.search(text) if code else None
        return match.group(1) if match else text

    # --- log-likelihoods ---------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        out: List = [None] * len(requests)
        for task, indices in self._by_task(requests).items():
            tic, self.scoring_task = time.perf_counter(), task
            scores = super().loglikelihood([requests[i] for i in indices], disable_tqdm=True)
            self._timed(task, tic, len(indices))
            for i, score in zip(indices, scores):
                self.cache_hook.add_partial("loglikelihood", requests[i].args, score)
                out[i] = score
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        """Exact scores of (context ids, continuation ids) pairs, truncated on the left to the
        model's positions."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], list(continuation)))
        return self._score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Whole-text log-likelihoods: lm-eval's disjoint rolling windows of the model's length,
        each scored exactly, summed per text."""
        out: List = [None] * len(requests)
        for task, indices in self._by_task(requests).items():
            tic, self.scoring_task = time.perf_counter(), task
            rows, owner = [], []
            for i in indices:
                ids = self.tok_encode(requests[i].args[0])
                for context, pred in map(make_disjoint_window, get_rolling_token_windows(
                        ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                    rows.append(((list(context) + list(pred))[:-1], list(pred)))
                    owner.append(i)
            totals = {i: 0.0 for i in indices}
            for i, (logprob, _) in zip(owner, self._score(rows)):
                totals[i] += logprob
            self._timed(task, tic, len(indices))
            for i in indices:
                self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, totals[i])
                out[i] = totals[i]
        return out

    def _score(self, rows: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """``score_rows`` over batches of similar widths; results in the order of ``rows``."""
        out: List = [None] * len(rows)
        usage = self.usage.setdefault(self.scoring_task, Usage())
        for batch in scoring_batches([len(x) for x, _ in rows], self.batch_size):
            for i, score in zip(batch, score_rows(self.model, [rows[i] for i in batch])):
                out[i] = score
            usage.forwards += 1
        usage.scored_tokens += sum(len(c) for _, c in rows)
        return out

    def _timed(self, task: Optional[str], tic: float, n: int):
        usage = self.usage.setdefault(task, Usage())
        usage.seconds += time.perf_counter() - tic
        usage.requests += n

    def _by_task(self, requests) -> Dict[Optional[str], List[int]]:
        """Request indices grouped by task, in first-seen order."""
        groups: Dict[Optional[str], List[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(getattr(request, "task_name", None), []).append(i)
        return groups


def registered() -> bool:
    """Whether lm-eval's registry resolves ``refusion`` to this class."""
    return model_registry.get(NAME) is RefusionLM
