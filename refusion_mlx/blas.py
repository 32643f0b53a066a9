"""Give MLX's Linux CPU backend an optimized BLAS.

MLX's Linux CPU wheel links netlib's reference BLAS (``mlx_cpu.libs/libblas-*``),
whose matrix products run ~20-40x slower than OpenBLAS. CPython dlopens extension
modules with RTLD_NOW, so ``libmlx.so`` binds ``cblas_sgemm`` once, when ``mlx.core``
is first imported: a BLAS loaded RTLD_GLOBAL *before* that import wins the lookup
(the wheel's copy is only in the extension's local scope); one loaded after it changes
nothing (measured). So ``use_fast_blas`` must run first: ``refusion_mlx/__init__.py``
calls it. Nothing changes on macOS (Accelerate).

``REFUSION_MLX_BLAS=/path/to/libblas.so`` picks a library; ``REFUSION_MLX_BLAS=off``
(or 0/false/no/none) turns the preload off. ``REFUSION_MLX_BLAS_WARNING=off`` silences the
slow-BLAS line (the test suite sets it: its checks of what a command prints must not depend on
whether the machine has OpenBLAS; tests/test_blas.py unsets it to check the line itself).

Whether it worked is judged by what counts: a float32 matrix product is timed on MLX's CPU
device, and below ``SLOW_GFLOPS`` the BLAS is called slow (the reference BLAS does ~5 GFLOP/s,
OpenBLAS ~200 on two cores).
"""

import ctypes
import os
import sys
import time
from typing import Optional

ENV = "REFUSION_MLX_BLAS"
WARNING_ENV = "REFUSION_MLX_BLAS_WARNING"
OFF = ("off", "0", "false", "no", "none")
_LINUX = sys.platform.startswith("linux")
_MULTIARCH = ("x86_64-linux-gnu", "aarch64-linux-gnu")
# Debian/Ubuntu packages (libopenblas0-pthread/-openmp/-serial, old libopenblas-base, libblis4-*),
# then OpenBLAS by soname from the loader's cache (other distributions), then whatever BLAS
# Debian's alternatives select (covers MKL/BLIS/ATLAS set up with update-alternatives).
CANDIDATES = [
    f"/usr/lib/{arch}/{name}"
    for arch in _MULTIARCH
    for name in (
        "openblas-pthread/libblas.so.3",
        "openblas-openmp/libblas.so.3",
        "openblas-serial/libblas.so.3",
        "openblas/libblas.so.3",
        "blis-pthread/libblas.so.3",
        "blis-openmp/libblas.so.3",
    )
] + ["libopenblasp.so.0", "libopenblas.so.0"] + [f"/usr/lib/{arch}/libblas.so.3" for arch in _MULTIARCH]
WARNING = "refusion_mlx: MLX's CPU backend is using a slow BLAS"
SLOW_GFLOPS = 20.0  # far above the reference BLAS, far below any optimized one

_state = {"tried": False, "loaded": None, "why": "not attempted", "warned": False, "gflops": None}


def use_fast_blas() -> Optional[str]:
    """Preload an optimized BLAS globally (Linux, once, before mlx.core); returns its path or None."""
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    setting = os.environ.get(ENV, "").strip()
    if not _LINUX:
        _state["why"] = "not Linux"
    elif setting.lower() in OFF:
        _state["why"] = f"turned off by {ENV}={setting}"
    elif _global_gemm():
        # LD_PRELOAD (or an earlier RTLD_GLOBAL load) already supplies cblas_sgemm: it wins anyway.
        _state["why"] = f"cblas_sgemm already provided by {_library_of(_global_gemm())}"
    elif "mlx.core" in sys.modules:
        # Its GEMM symbols were bound at import (RTLD_NOW); a later global load is never consulted.
        _state["why"] = "mlx.core was imported before refusion_mlx, too late to preload"
    elif setting:
        _state["loaded"] = _load(setting)
    else:
        for path in CANDIDATES:
            if path.startswith("/") and (not os.path.exists(path) or _is_reference(path)):
                continue
            _state["loaded"] = _load(path)
            if _state["loaded"]:
                break
        else:
            _state["why"] = "no OpenBLAS/BLIS found"
    return _state["loaded"]


def warn_if_slow_blas() -> None:
    """Once per process: one stderr line if MLX's default device is the CPU and its matrix products are slow."""
    use_fast_blas()  # no-op if done; otherwise it must precede the mlx.core import below
    if _state["warned"] or not _LINUX:
        return
    _state["warned"] = True  # decided once, whatever the answer
    if os.environ.get(WARNING_ENV, "").strip().lower() in OFF:
        return
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return
    rate = measured_gflops()
    if rate < SLOW_GFLOPS:
        why = f"{_state['loaded']} was preloaded; a busy machine?" if _state["loaded"] else _state["why"]
        print(f"{WARNING} ({rate:.0f} GFLOP/s; {why}): {_fix()}", file=sys.stderr)


def measured_gflops() -> float:
    """GFLOP/s of a 256x256x256 float32 product on MLX's CPU device (measured once per process)."""
    if _state["gflops"] is None:
        _state["gflops"] = _gflops()
    return _state["gflops"]


def blas_report() -> str:
    """One line: which BLAS was preloaded (or why none) and the measured GFLOP/s."""
    if sys.platform == "darwin":
        return "BLAS: Accelerate (macOS)"
    if not _LINUX:
        return "BLAS: platform default"
    rate = measured_gflops()
    speed = "slow" if rate < SLOW_GFLOPS else "fast"
    source = _state["loaded"] or f"MLX's bundled BLAS (preload: {_state['why']})"
    return f"BLAS: {source}, sgemm {rate:.0f} GFLOP/s ({speed})"


def _load(path: str) -> Optional[str]:
    """dlopen ``path`` RTLD_GLOBAL; its path if it provides cblas_sgemm, else None (reason kept)."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _state["why"] = f"could not load {e}"  # the message names the path
        return None
    if not hasattr(lib, "cblas_sgemm"):  # MLX calls the C interface, not Fortran sgemm_
        _state["why"] = f"{path} has no cblas_sgemm"
        return None
    return path


def _fix() -> str:
    """How to get the speed back, for the reason recorded by use_fast_blas."""
    why = _state["why"]
    if why.startswith("mlx.core was imported"):
        found = next((p for p in CANDIDATES if os.path.isabs(p) and os.path.exists(p)), "/path/to/libblas.so")
        return f"import refusion_mlx before mlx.core, or run with LD_PRELOAD={found}"
    if why.startswith("turned off"):
        return f"unset {ENV} to use OpenBLAS"
    return f"apt-get install libopenblas0-pthread, or set {ENV}=/path/to/libblas.so"


def _is_reference(path: str) -> bool:
    """Netlib's reference BLAS: the wheel's own copy, or Debian's libblas3 (``.../blas/libblas.so.3``)."""
    real = os.path.realpath(path)
    return "mlx_cpu.libs" in real or os.path.basename(os.path.dirname(real)) == "blas"


def _global_gemm() -> Optional[int]:
    """Address of ``cblas_sgemm`` in the process's global namespace, if any."""
    return ctypes.cast(getattr(ctypes.CDLL(None), "cblas_sgemm", None), ctypes.c_void_p).value


def _gflops(n: int = 256, repeats: int = 5, tries: int = 5) -> float:
    """GFLOP/s of an n*n*n float32 product on MLX's CPU device, the best seen.

    A machine busy with other work slows a multithreaded BLAS down by 10x at times, so a slow
    reading is retried a few times, 50 ms apart, before it counts (the reference BLAS never
    comes near the threshold, so this only costs time where the answer is "slow").
    """
    import mlx.core as mx

    a = mx.random.normal((n, n), stream=mx.cpu)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))  # warm-up
    best = float("inf")
    for attempt in range(tries):
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(mx.matmul(a, a, stream=mx.cpu))
            best = min(best, time.perf_counter() - tic)
        if 2 * n**3 / best / 1e9 >= SLOW_GFLOPS:
            break
        time.sleep(0.05)
    return 2 * n**3 / best / 1e9


def _library_of(address: Optional[int]) -> Optional[str]:
    """Real path of the shared library holding ``address`` (dladdr)."""
    if not address:
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.fname:
        return None
    return os.path.realpath(info.fname.decode())
