"""What the token-exactness tests need of the backend they run on."""

import os

import mlx.core as mx
import numpy as np


def test_float32_products_are_float32_on_the_default_device():
    """MLX's CUDA backend runs float32 matrix products in TF32 unless MLX_ENABLE_TF32=0 (which
    tests/conftest.py sets before MLX's first product): ~3e-4 relative error on a 512x512 product
    against float64, where float32 gives ~4e-7. The decoder's exactness tests compare two
    computation orders token for token, so they must not silently run in TF32. On the CPU (and
    Metal) float32 is float32 whatever the variable says: the same check holds."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    got = np.array(mx.matmul(mx.array(a), mx.array(b)), dtype=np.float64)
    want = a.astype(np.float64) @ b.astype(np.float64)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < 1e-5, (f"relative error {error:.1e} on {mx.default_device()}: TF32? "
                          f"MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')!r}")
