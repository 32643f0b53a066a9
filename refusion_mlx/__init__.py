"""refusion_mlx: ReFusion's plan-and-infill diffusion LM on MLX."""

import sys
import types

from .errors import quiet_interrupt, started_as_command

with quiet_interrupt(started_as_command()):
    # Before anything imports mlx.core: on Linux, load an optimized BLAS for MLX's CPU backend.
    from .blas import use_fast_blas

    use_fast_blas()

    from .autoregressive import generate_ar_ids
    from .batch import batch_generate, batch_generate_ids
    from .decode import generate_ids
    from .settings import DecodeSettings
    from .transcript import GenerationResult
    from .errors import RefusionError
    from .kv import make_prompt_cache
    from .loading import load, load_model

# ``generate`` is both a function and the module that holds it and its command line, as in
# mlx-lm. The module is imported on first use, not here: ``python -m refusion_mlx.generate``
# then runs it once, cleanly. Importing the submodule makes Python set the package attribute
# of the same name to the module; the package refuses that, so ``refusion_mlx.generate`` is
# the function whatever was imported before.
_FROM_GENERATE = ("generate", "stream_generate", "GenerationUpdate")


def __getattr__(name):
    if name in _FROM_GENERATE:
        import importlib

        return getattr(importlib.import_module(__name__ + ".generate"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; the attribute stays the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "DecodeSettings",
    "GenerationResult",
    "GenerationUpdate",
    "RefusionError",
    "batch_generate",
    "batch_generate_ids",
    "generate",
    "generate_ar_ids",
    "generate_ids",
    "load",
    "load_model",
    "make_prompt_cache",
    "stream_generate",
]
__version__ = "0.1.0"
