"""Linux CPU BLAS: MLX's matrix products really run fast with the preload, and the fallback warns once."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BLAS_PY = Path(__file__).resolve().parents[1] / "refusion_mlx" / "blas.py"
# blas.py loaded on its own, so neither this process nor the probes depend on the rest of the package.
LOAD = (
    "import importlib.util as u\n"
    f"spec = u.spec_from_file_location('refusion_blas', {str(BLAS_PY)!r})\n"
    "blas = u.module_from_spec(spec); spec.loader.exec_module(blas)\n"
)
# A fresh process each time: the preload only works before mlx.core is first imported.
PROBE = LOAD + """
import json
blas.use_fast_blas(); blas.use_fast_blas()
import mlx.core as mx
blas.warn_if_slow_blas(); blas.use_fast_blas(); blas.warn_if_slow_blas()
mx.random.seed(0)
a = mx.random.normal((64, 96)); b = mx.random.normal((96, 80))
print(json.dumps({"loaded": blas.use_fast_blas(), "gflops": blas.measured_gflops(),
                  "report": blas.blas_report(), "product": (a @ b).tolist()}))
"""

_spec = importlib.util.spec_from_file_location("refusion_blas", BLAS_PY)
blas = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(blas)  # no mlx import at its top level

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU backend only")
OPENBLAS = [p for p in blas.CANDIDATES if "openblas" in p and os.path.exists(p)]
needs_openblas = pytest.mark.skipif(
    not OPENBLAS, reason="no OpenBLAS installed on this machine (apt-get install libopenblas0-pthread)")


def run(code, **env):
    """Run ``code`` in a fresh interpreter with ``env`` (None removes a variable); (stdout, stderr)."""
    full = {k: v for k, v in {**os.environ, blas.WARNING_ENV: None, **env}.items() if v is not None}
    full.pop("LD_PRELOAD", None)  # the test is about our preload, not the caller's
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def probe(**env):
    out, err = run(PROBE, **{blas.ENV: None, **env})
    return json.loads(out), err


@linux_only
@needs_openblas
def test_with_openblas_preloaded_products_run_fast():
    out, err = probe()
    assert out["loaded"] in blas.CANDIDATES and "openblas" in out["loaded"]
    assert out["gflops"] >= blas.SLOW_GFLOPS, out
    assert out["report"].startswith(f"BLAS: {out['loaded']}, sgemm") and "(fast)" in out["report"]
    assert err == ""


@linux_only
@needs_openblas
def test_path_from_the_environment_is_used():
    out, _ = probe(**{blas.ENV: OPENBLAS[-1]})
    assert out["loaded"] == OPENBLAS[-1]
    assert out["gflops"] >= blas.SLOW_GFLOPS


@linux_only
@pytest.mark.parametrize("setting", ["off", "0", "false", "none"])
def test_turned_off_warns_exactly_once_and_computes_the_same(setting):
    off, err = probe(**{blas.ENV: setting})
    assert off["loaded"] is None and off["gflops"] < blas.SLOW_GFLOPS and "(slow)" in off["report"]
    assert err.count(blas.WARNING) == 1 and len(err.strip().splitlines()) == 1, err
    assert f"turned off by {blas.ENV}" in err
    if OPENBLAS and setting == "off":
        on, _ = probe()
        np.testing.assert_allclose(np.array(on["product"], np.float32), np.array(off["product"], np.float32),
                                   rtol=1e-4, atol=1e-4)


@linux_only
def test_the_line_can_be_silenced_and_only_the_line():
    """REFUSION_MLX_BLAS_WARNING=off (as the suite runs) drops the warning, not the measurement."""
    off, err = probe(**{blas.ENV: "off", blas.WARNING_ENV: "off"})
    assert off["loaded"] is None and off["gflops"] < blas.SLOW_GFLOPS and "(slow)" in off["report"]
    assert err == ""


@linux_only
def test_missing_library_warns_with_the_fix():
    off, err = probe(**{blas.ENV: "/nonexistent/libblas.so.3"})
    assert off["loaded"] is None
    assert err.count(blas.WARNING) == 1 and "apt-get install libopenblas0-pthread" in err


@linux_only
def test_too_late_is_reported_not_pretended():
    # mlx.core first: its GEMM symbols are bound already, a preload now would change nothing.
    code = "import mlx.core\n" + LOAD + "print(blas.use_fast_blas(), blas.blas_report())\n"
    code += "blas.warn_if_slow_blas()"
    out, err = run(code, **{blas.ENV: None})
    assert out.startswith("None ") and "too late" in out and "(slow)" in out
    assert err.count(blas.WARNING) == 1 and "import refusion_mlx before mlx.core" in err


@linux_only
def test_cli_warns_once_when_off_and_prints_the_same_text(tiny_path):
    """Through the real entry point: the hint appears once and the generated text does not change."""
    from conftest import with_root_on_path

    args = ["--model", str(tiny_path), "--prompt", "the dog", "--max-tokens", "16", "--slot-size", "4",
            "--blocks", "2"]
    code = f"import sys; from refusion_mlx.generate import main; sys.exit(main({args!r}))"
    off_out, off_err = run(code, PYTHONPATH=with_root_on_path(), **{blas.ENV: "off"})
    on_out, _ = run(code, PYTHONPATH=with_root_on_path(), **{blas.ENV: None})
    assert off_err.count(blas.WARNING) == 1
    assert off_out == on_out


@linux_only
def test_the_python_api_warns_once_too(tiny_path):
    """No command line involved: load + generate twice, one warning line."""
    from conftest import with_root_on_path

    code = (f"from refusion_mlx import load, generate, generate_ids\n"
            f"model, tok = load({str(tiny_path)!r})\n"
            "generate(model, tok, 'the dog', gen_length=8, slot_size=4, serial_num_blocks=1)\n"
            "generate_ids(model, [5, 6, 7], gen_length=8, slot_size=4, serial_num_blocks=1)\n")
    _, err = run(code, PYTHONPATH=with_root_on_path(), **{blas.ENV: "off"})
    assert err.count(blas.WARNING) == 1, err
