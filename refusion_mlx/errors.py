"""The one exception users see, and how command lines report it: one clear line, exit status 2."""

import argparse
import sys


class RefusionError(Exception):
    """Bad input or an unusable checkpoint; the CLI prints it as one line and exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ``error:`` line, like every other error here."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_command(run, args, interrupted: str = "interrupted") -> int:
    """Call ``run(args)``; a RefusionError becomes one ``error:`` line and exit status 2."""
    try:
        return run(args)
    except RefusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
