"""The one exception users see: a clear, one-line reason something cannot be done."""


class RefusionError(Exception):
    """Bad input or an unusable checkpoint; the CLI prints it as one line and exits 2."""
