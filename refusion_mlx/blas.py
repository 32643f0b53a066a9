"""Give MLX's Linux CPU backend an optimized BLAS.

MLX's Linux CPU wheel links netlib's reference BLAS (``mlx_cpu.libs/libblas-*``),
whose matrix products run ~20x slower than OpenBLAS. Python loads extension
modules with RTLD_NOW, so ``libmlx.so`` binds ``cblas_sgemm`` when ``mlx.core``
is first imported: an OpenBLAS loaded RTLD_GLOBAL *before* that import wins the
symbol lookup, one loaded after it changes nothing. ``use_fast_blas`` must run
first (``refusion_mlx/__init__.py`` does). Nothing changes on macOS (Accelerate).

``REFUSION_MLX_BLAS=/path/to/libblas.so`` picks a library; ``REFUSION_MLX_BLAS=off``
turns the preload off.
"""

import ctypes
import os
import struct
import sys
from typing import Optional

ENV = "REFUSION_MLX_BLAS"
OFF = ("off", "0", "false", "no", "none")
# Debian/Ubuntu packages libopenblas0-pthread / -openmp / libopenblas0, then BLIS.
CANDIDATES = [
    f"/usr/lib/{arch}-linux-gnu/{path}"
    for arch in ("x86_64", "aarch64")
    for path in (
        "openblas-pthread/libblas.so.3",
        "openblas-openmp/libblas.so.3",
        "libopenblas.so.0",
        "blis-pthread/libblas.so.3",
        "blis-openmp/libblas.so.3",
    )
]
HINT = (
    "refusion_mlx: MLX's CPU backend is using the reference BLAS (matrix products ~20x slower); "
    f"install OpenBLAS (apt-get install libopenblas0-pthread) or set {ENV}=/path/to/libblas.so"
)

_state = {"tried": False, "loaded": None, "why": "", "warned": False}


def use_fast_blas() -> Optional[str]:
    """Preload an optimized BLAS (Linux only, once); returns its path or None."""
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    setting = os.environ.get(ENV, "").strip()
    if not sys.platform.startswith("linux"):
        _state["why"] = "not Linux"
    elif setting.lower() in OFF:
        _state["why"] = f"turned off by {ENV}={setting}"
    elif "mlx.core" in sys.modules:
        _state["why"] = "mlx.core was imported before refusion_mlx: too late to preload"
    else:
        for path in [setting] if setting else CANDIDATES:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _state["loaded"] = path
            return path
        _state["why"] = f"none found ({setting})" if setting else "no OpenBLAS/BLIS found"
    return None


def warn_if_slow_blas():
    """Print HINT once on stderr when MLX runs on a Linux CPU with the reference BLAS."""
    if _state["warned"] or not sys.platform.startswith("linux"):
        return
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return
    provider = gemm_provider()
    if provider is None or "mlx_cpu.libs" in provider:
        _state["warned"] = True
        print(HINT, file=sys.stderr)


def gemm_provider() -> Optional[str]:
    """The shared library MLX's ``cblas_sgemm`` is bound to in this process (Linux), or None."""
    import mlx.core as mx  # noqa: F401  (makes sure libmlx.so is loaded and bound)

    lib = _mapped_library("libmlx.so")
    if lib is None:
        return None
    path, base = lib
    slot = _got_offset(path, b"cblas_sgemm")
    if slot is None:
        return None
    target = ctypes.c_void_p.from_address(base + slot).value
    return _library_of(target)


def blas_report() -> str:
    """One line: which library does MLX's CPU matrix products, and how fast a product runs."""
    if not sys.platform.startswith("linux"):
        return "BLAS: platform default (Accelerate on macOS)"
    provider = gemm_provider() or "unknown"
    kind = "reference BLAS, slow" if "mlx_cpu.libs" in provider else "optimized"
    note = "" if _state["loaded"] else f"; preload: {_state['why'] or 'not attempted'}"
    return f"BLAS: {provider} ({kind}), sgemm {_gflops():.0f} GFLOP/s{note}"


def _gflops(n: int = 256, repeats: int = 5) -> float:
    """GFLOP/s of an n*n*n float32 product on MLX's CPU device."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n), stream=mx.cpu)
    mx.eval(a)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
    return 2 * n**3 * repeats / (time.perf_counter() - tic) / 1e9


def _mapped_library(name: str):
    """(path, load base) of a loaded shared library, read from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[5]) == name and int(fields[2], 16) == 0:
                    return fields[5], int(fields[0].split("-")[0], 16)
    except OSError:
        pass
    return None


def _got_offset(path: str, symbol: bytes) -> Optional[int]:
    """Offset of the GOT slot the dynamic linker fills for ``symbol`` (ELF64 little-endian)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 4:  # SHT_RELA
            continue
        dynsym = sections[link]
        strtab = sections[dynsym[6]]
        for r in range(offset, offset + size, entsize):
            r_offset, r_info = struct.unpack_from("<QQ", data, r)
            name_at, = struct.unpack_from("<I", data, dynsym[4] + (r_info >> 32) * dynsym[9])
            start = strtab[4] + name_at
            if data[start:data.index(b"\0", start)] == symbol:
                return r_offset
    return None


def _library_of(address: Optional[int]) -> Optional[str]:
    """Path of the shared library holding ``address`` (dladdr)."""
    if not address:
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return None
    return os.path.realpath(info.fname.decode())

