"""Linux CPU BLAS: MLX's matrix products really go to OpenBLAS, and the fallback warns once."""

import json
import os
import subprocess
import sys

import pytest
from conftest import with_root_on_path

from refusion_mlx.blas import CANDIDATES


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU backend only")

# Runs in a fresh process: the preload only works before mlx.core is first imported.
PROBE = """
import json, sys
import refusion_mlx.blas as blas
import refusion_mlx
import mlx.core as mx
blas.warn_if_slow_blas(); blas.warn_if_slow_blas()
mx.random.seed(0)
a = mx.random.normal((64, 96)); b = mx.random.normal((96, 80))
print(json.dumps({"provider": blas.gemm_provider(), "product": (a @ b).tolist()}))
"""


def probe(**env):
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": with_root_on_path(), **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@linux_only
def test_matmul_is_bound_to_openblas():
    if not any(os.path.exists(p) for p in CANDIDATES):
        pytest.skip("no OpenBLAS installed on this machine (apt-get install libopenblas0-pthread)")
    out, err = probe()
    assert "mlx_cpu.libs" not in out["provider"]
    assert "openblas" in out["provider"] or "blis" in out["provider"]
    assert err == ""


@linux_only
def test_turned_off_warns_exactly_once_and_computes_the_same():
    off, err = probe(REFUSION_MLX_BLAS="off")
    assert "mlx_cpu.libs" in off["provider"]
    assert err.count("refusion_mlx: MLX's CPU backend is using the reference BLAS") == 1
    assert len(err.strip().splitlines()) == 1
    if any(os.path.exists(p) for p in CANDIDATES):
        import numpy as np

        on, _ = probe()
        np.testing.assert_allclose(np.array(on["product"]), np.array(off["product"]), rtol=1e-4, atol=1e-4)


@linux_only
def test_too_late_is_reported_not_pretended():
    code = ("import mlx.core, refusion_mlx.blas as b, refusion_mlx; "
            "print(b.use_fast_blas(), b.blas_report())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": with_root_on_path()}, timeout=120)
    assert proc.stdout.startswith("None ") and "too late" in proc.stdout
