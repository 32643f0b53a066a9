"""The one exception users see; command lines print it as one line and exit 2 (``cli.run_command``).

Also what must work before anything heavy is imported: Ctrl-C while a command line is still
importing is one line too (the package's ``__init__`` uses it; standard library only here).
"""

import sys
from contextlib import contextmanager
from pathlib import Path


class RefusionError(Exception):
    """Bad input or an unusable checkpoint."""


def started_as_command() -> bool:
    """Whether this process is one of our command lines: ``python -m refusion_mlx[.X]`` (argv[0]
    is "-m" while the package is imported) or an installed ``refusion-X`` script."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or Path(argv0).name.startswith("refusion-")


@contextmanager
def quiet_interrupt(command: bool, message: str = "interrupted"):
    """Ctrl-C while a command line is still importing: one line and exit 130, not a traceback.

    Only for command lines: a program that imports the library keeps its own KeyboardInterrupt.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not command:
            raise
        print(message, file=sys.stderr)
        sys.exit(130)
