"""``python -m refusion_mlx <command> [flags]``: every command line under one name, as mlx-lm's."""

import importlib
import os
import sys

COMMANDS = {
    "generate": "text from a prompt (plan-and-infill)",
    "chat": "a conversation in the terminal, the KV cache kept across turns",
    "cache-prompt": "prefill a long prompt and save its KV cache to a file",
    "evaluate": "accuracy and speed against left-to-right decoding",
    "benchmark": "plan-and-infill against left-to-right on one prompt",
    "lora": "fine-tune (LoRA, DoRA, QLoRA, full) with ReFusion's objective",
    "fuse": "fuse adapters into the model",
    "convert": "convert and quantize a checkpoint",
    "server": "an OpenAI-compatible HTTP server (streaming, continuous batching)",
    "serve-bench": "load benchmark of the server, plan-and-infill against left-to-right",
}
# Module names, where a command's differs (``serve_bench``, also accepted as the command).
MODULES = {"serve-bench": "serve_bench", "cache-prompt": "cache_prompt"}
ALIASES = {module: command for command, module in MODULES.items()}


def usage() -> str:
    lines = [f"usage: {invocation()} <command> [flags]   (<command> --help for its flags)", ""]
    lines += [f"  {name:<12} {what}" for name, what in COMMANDS.items()]
    lines += ["", "Each is also a module (python -m refusion_mlx.<command>, with _ for -) and "
              "a console script (refusion-<command>)."]
    return "\n".join(lines)


def invocation() -> str:
    """``refusion`` when started as the console script, else ``python -m refusion_mlx``."""
    return "refusion" if sys.argv and os.path.basename(sys.argv[0]) == "refusion" else "python -m refusion_mlx"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    command = argv.pop(0)
    command = ALIASES.get(command, command)
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"refusion_mlx.{MODULES.get(command, command)}")
    sys.argv[0] = f"{invocation()} {command}"  # what the command's --help shows (cli.prog)
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
