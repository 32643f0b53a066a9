"""What every command line shares: the parser that fails in one line, error handling, and the
flags that name a model and the decoder's knobs (defined once, used by generate, evaluate and
the benchmark)."""

import argparse
import os
import re
import sys
from typing import Callable, Dict, Optional

from .errors import RefusionError
from .settings import KNOB_TABLE
from .utils import DTYPES

# The decoder's argument names as the command line spells them: errors raised by the library
# name arguments; the same error seen from a command line names the flag to change.
FLAG_NAMES: Dict[str, str] = {
    **{knob.name: knob.flag for knob in KNOB_TABLE},
    "mask_id": "--mask-id",
    "max_kv_size": "--max-kv-size",
}


# Console scripts by module (pyproject.toml's [project.scripts]); `refusion` runs __main__.
SCRIPTS = {"serve_bench": "refusion-serve-bench", "cache_prompt": "refusion-cache-prompt"}


def prog(module: str) -> str:
    """The invocation a command's --help shows: how the user started it.

    ``python -m refusion_mlx <command>`` and the ``refusion`` script put that in ``sys.argv[0]``
    (``__main__``), as does the ``python -m convert`` launcher; a console script is its own name
    (``refusion-convert``); anything else (``python -m refusion_mlx.convert``, a direct call of
    ``main``) shows the module form, which works from any directory.
    """
    started = sys.argv[0] if sys.argv else ""
    if started.startswith(("python -m ", "refusion ")):
        return started
    script = SCRIPTS.get(module, f"refusion-{module}")
    if os.path.basename(started) == script:
        return script
    return f"python -m refusion_mlx.{module}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ``error:`` line, like every other error here."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def in_flag_names(message: str) -> str:
    """``message`` with the decoder's argument names replaced by their flags."""
    for name, flag in FLAG_NAMES.items():
        message = re.sub(rf"\b{name}\b", flag, message)
    return message


def run_command(run: Callable, args, interrupted: str = "interrupted", decode_flags: bool = False) -> int:
    """Call ``run(args)`` and turn what can go wrong into one line and an exit status.

    RefusionError: ``error: ...`` (with ``decode_flags``, the decoder's arguments named by
    their flags), 2. Ctrl-C: ``interrupted``, 130. A reader that
    closed the pipe early (``| head``): quiet, 141 as a shell reports SIGPIPE.
    """
    try:
        return run(args)
    except RefusionError as e:
        print(f"error: {in_flag_names(str(e)) if decode_flags else e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # MLX's own errors (a full disk under its kernel cache, memory): one line too
        from .validation import mlx_failure

        print(f"error: {mlx_failure(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def add_model_flags(parser: argparse.ArgumentParser, default: Optional[str] = None):
    """--model, --adapter-path, --dtype."""
    parser.add_argument("--model", default=default,
                        help="local folder or Hugging Face repo id (e.g. GSAI-ML/ReFusion); default: "
                             "the packaged demo model, offline")
    parser.add_argument("--adapter-path", help="folder with fine-tuned adapters")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights")


def add_prompt_flags(parser: argparse.ArgumentParser, required: bool = True):
    """--prompt and how it is formatted."""
    parser.add_argument("--prompt", "-p", required=required, help="the prompt; '-' reads it from stdin")
    parser.add_argument("--system-prompt", help="system message for the chat template")
    parser.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as is")
    parser.add_argument("--no-thinking", action="store_true",
                        help="chat template with thinking off (upstream evaluates with it on)")


def add_decode_flags(parser: argparse.ArgumentParser):
    """The plan-and-infill knobs; unset ones come from the preset, then the model, then the library."""
    from .presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the paper's slot and threshold settings for a benchmark")
    for knob in KNOB_TABLE:
        short = ["-m"] if knob.flag == "--max-tokens" else []
        parser.add_argument(knob.flag, *short, type=knob.kind, help=knob.help)


def add_cache_flags(parser: argparse.ArgumentParser):
    """--max-kv-size and --prompt-cache-file (a file from ``python -m refusion_mlx.cache_prompt``)."""
    parser.add_argument("--max-kv-size", type=int,
                        help="bound the KV cache to this many entries (the first few and the most recent kept)")
    parser.add_argument("--prompt-cache-file",
                        help="start from a saved prompt cache (python -m refusion_mlx.cache_prompt); "
                             "the prompt given here follows the saved one")


def check_cache_flags(args):
    """--max-kv-size and --prompt-cache-file, checked before a long load."""
    from .validation import check_int

    if getattr(args, "max_kv_size", None) is not None:
        check_int("--max-kv-size", args.max_kv_size, 1)
        if getattr(args, "prompt_cache_file", None):
            raise RefusionError("--max-kv-size and --prompt-cache-file do not go together: a cache file keeps "
                                "the bound it was saved with")
    path = getattr(args, "prompt_cache_file", None)
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise RefusionError(f"prompt cache file {path} does not exist")


def decode_knobs(args) -> dict:
    """The knobs the user set on the command line (``preset`` included), by argument name."""
    given = {"preset": getattr(args, "preset", None),
             **{k.name: getattr(args, k.flag.lstrip("-").replace("-", "_"), None) for k in KNOB_TABLE}}
    return {k: v for k, v in given.items() if v is not None}


def settings_from_args(args, model=None, prompt_length: int = 0) -> dict:
    """Every knob for ``generate_ids``: flags, then the preset, then the model's own, then the library's.

    Checked now, so a bad flag fails before anything is loaded; with a model, an unset
    ``--max-tokens`` is fitted to the room its positions leave after the prompt.
    """
    from dataclasses import asdict

    from .settings import settings_for

    return asdict(settings_for(model, prompt_length, **decode_knobs(args)))


def read_prompt(prompt: str) -> str:
    """The prompt flag's value; ``-`` reads standard input, without the newline ``echo`` ends it with."""
    if prompt != "-":
        return prompt
    from .validation import read_utf8_stdin

    return read_utf8_stdin().rstrip("\r\n")
