"""The one exception users see; command lines print it as one line and exit 2 (``cli.run_command``)."""


class RefusionError(Exception):
    """Bad input or an unusable checkpoint."""
