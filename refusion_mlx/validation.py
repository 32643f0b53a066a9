"""Argument checks shared by the API and the command lines: each names the argument it rejects.

Every function raises ``RefusionError`` (one line, the argument's name first) and
returns the value in its plain Python type, so callers never see a ``TypeError``
from deep inside MLX for a knob of the wrong type.
"""

import math
import numbers
import operator
import os
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Union

from .errors import RefusionError

SEED_LIMIT = 2**64  # mx.random.key takes an unsigned 64-bit seed
# Sampling temperature, the same bound everywhere (API, command lines, server): OpenAI's [0, 2].
# Gumbel-max drafts at a higher temperature are close to uniform noise, of no use to anyone.
MAX_TEMPERATURE = 2.0


def _is_int(value) -> bool:
    """int, numpy or 0-d MLX integers; not bools, floats or strings."""
    if isinstance(value, (bool, str, bytes, float)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer (not a bool, not a float) in [minimum, maximum]."""
    if not _is_int(value):
        raise RefusionError(f"{name} must be an integer, got {_shown(value)}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise RefusionError(f"{name} must be {bound}, got {value}")
    if maximum is not None and value > maximum:
        raise RefusionError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, minimum: Optional[float] = None, maximum: Optional[float] = None,
                positive: bool = False) -> float:
    """A finite real number (ints accepted) in [minimum, maximum] (or > 0 when ``positive``)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise RefusionError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise RefusionError(f"{name} must be a finite number, got {value}")
    if positive and value <= 0:
        raise RefusionError(f"{name} must be positive, got {value}")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise RefusionError(f"{name} must be in [{minimum:g}, {maximum:g}], got {value}")
    if minimum is not None and value < minimum:
        raise RefusionError(f"{name} must be >= {minimum:g}, got {value}")
    if maximum is not None and value > maximum:
        raise RefusionError(f"{name} must be <= {maximum:g}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise RefusionError(f"{name} must be true or false, got {_shown(value)}")
    return value


def check_temperature(name: str, value) -> float:
    """A sampling temperature in [0, MAX_TEMPERATURE] (0: greedy)."""
    return check_float(name, value, 0.0, MAX_TEMPERATURE)


def check_seed(name: str, value) -> Optional[int]:
    """None (a random seed) or an integer in [0, 2**64)."""
    if value is None:
        return None
    return check_int(name, value, 0, SEED_LIMIT - 1)


def check_token_id(name: str, value, vocab_size: int) -> int:
    """One token id inside the vocabulary."""
    value = check_int(name, value)
    if not 0 <= value < vocab_size:
        raise RefusionError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
    return value


def check_token_ids(name: str, values, vocab_size: Optional[int] = None, allow_empty: bool = True) -> List[int]:
    """A sequence of token ids (not a string), each inside the vocabulary when its size is given."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise RefusionError(f"{name} must be a sequence of token ids, got {_shown(values)}")
    ids = []
    for value in values:
        if not _is_int(value):
            raise RefusionError(f"{name} must hold integer token ids, got {_shown(value)}")
        ids.append(operator.index(value))
    if not ids and not allow_empty:
        raise RefusionError(f"{name} is empty")
    if vocab_size is not None and ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise RefusionError(f"{name} holds {bad}, outside the vocabulary [0, {vocab_size})")
    return ids


def check_eos(name: str, value, vocab_size: Optional[int] = None) -> Union[None, List[int]]:
    """None, one id, or a sequence of ids (never a string: "317" is not {3, 1, 7})."""
    if value is None:
        return None
    if _is_int(value):
        value = [value]
    return check_token_ids(name, value, vocab_size)


def check_text(name: str, value) -> str:
    """A string that can be encoded as UTF-8 (no lone surrogates from undecodable bytes)."""
    if not isinstance(value, str):
        raise RefusionError(f"{name} must be a string, got {_shown(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RefusionError(f"{name} is not valid UTF-8 text") from None
    return value


def check_path(name: str, value, optional: bool = False) -> Optional[Path]:
    """A str or os.PathLike (None only when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        raise RefusionError(f"{name} must be a path, got {_shown(value)}")
    return Path(value).expanduser()


def check_choice(name: str, value, choices: Iterable, optional: bool = False):
    choices = list(choices)
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise RefusionError(f"{name} must be one of {', '.join(map(str, choices))}, got {_shown(value)}")
    return value


def check_keywords(where: str, given: Iterable[str], allowed: Iterable[str]):
    """Unknown keyword arguments: named, with what is allowed."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RefusionError(f"{where} got an unknown argument {unknown[0]!r} "
                            f"(allowed: {', '.join(sorted(allowed))})")


def read_utf8_stdin(name: str = "the prompt on standard input") -> str:
    """Standard input decoded strictly as UTF-8."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return check_text(name, data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RefusionError(f"{name} is not valid UTF-8 text") from None


def one_line(e: BaseException) -> str:
    """An exception's message squeezed onto one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."



def mlx_failure(e: BaseException) -> str:
    """One line for a RuntimeError from MLX; a failed kernel compilation (MLX's CPU backend builds
    kernels with the system compiler under $TMPDIR) shows the compiler's fatal error, not its log."""
    text = str(e)
    if "Failed to compile" in text:
        fatal = next((line.strip() for line in text.splitlines() if "fatal error" in line), None)
        reason = fatal or text.splitlines()[0][:200]
        return f"MLX could not compile a kernel ({reason}); is the disk that holds $TMPDIR full?"
    return one_line(e)
