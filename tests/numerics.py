"""Comparing floats that two computation orders produced."""

import numpy as np


def assert_close(got, want, rtol: float):
    """``got`` equals ``want`` to ``rtol`` relative to each value, with a floor of ``rtol`` relative
    to the array's largest magnitude.

    Two float32 computation orders (a fused kernel or another summation order, another library)
    legitimately differ by a few ulps of the *sums* behind each value, so a value near zero carries
    the rounding of its large neighbours: an absolute bound alone fails on large values (logits of
    ~17 move by ~1.5e-5), a relative one alone fails near zero.
    """
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
