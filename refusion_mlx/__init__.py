"""refusion_mlx: ReFusion's plan-and-infill diffusion LM on MLX."""

# Before anything imports mlx.core: on Linux, load an optimized BLAS for MLX's CPU backend.
from .blas import use_fast_blas

use_fast_blas()

from .autoregressive import generate_ar_ids  # noqa: E402
from .decode import DecodeSettings, GenerationResult, generate_ids  # noqa: E402
from .errors import RefusionError  # noqa: E402
from .text import GenerationUpdate, generate, stream_generate  # noqa: E402
from .loading import load, load_model  # noqa: E402

__all__ = [
    "DecodeSettings",
    "GenerationResult",
    "GenerationUpdate",
    "RefusionError",
    "generate",
    "generate_ar_ids",
    "generate_ids",
    "load",
    "load_model",
    "stream_generate",
]
__version__ = "0.1.0"
