"""Shared fixtures: tiny checkpoints written once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# What the checks need, set before anything imports mlx (and inherited by every child process):
# - float32 matrix products in full float32 on MLX's CUDA backend (by default it runs them in TF32,
#   ~1e-3 relative error), as the token-exactness tests need; MLX reads it at its first float32
#   product, once per process. Nothing changes on the CPU.
# - no slow-BLAS line on stderr: the suite must pass the same with or without OpenBLAS
#   (tests/test_blas.py removes it where it checks that line).
os.environ.setdefault("MLX_ENABLE_TF32", "0")
os.environ.setdefault("REFUSION_MLX_BLAS_WARNING", "off")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
# The demo model's build-time helpers (tokenizer trainer, data card) live beside its recipe.
sys.path.insert(0, str(ROOT / "examples" / "demo"))

from checkpoints import tiny_config, write_checkpoint, write_tokenizer  # noqa: E402


def oracle(name: str):
    """Import a module of the ``oracle`` extra (torch, transformers).

    Without the extra (the README's light test set-up) the tests that need it are skipped,
    saying what to install; CI sets REFUSION_REQUIRE_ORACLE=1, and there a missing module fails.
    """
    if os.environ.get("REFUSION_REQUIRE_ORACLE"):
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} missing: pip install -e '.[oracle]' for the oracle tests")


def eval_extra():
    """Import lm_eval (the ``eval`` extra: lm-evaluation-harness).

    As ``oracle``: without the extra the tests that need it are skipped, saying what to install;
    CI sets REFUSION_REQUIRE_EVAL=1, and there a missing lm_eval fails them.
    """
    if os.environ.get("REFUSION_REQUIRE_EVAL"):
        import importlib

        return importlib.import_module("lm_eval")
    return pytest.importorskip("lm_eval", reason="lm_eval missing: pip install -e '.[eval]' for the lm-eval tests")


def with_root_on_path() -> str:
    """PYTHONPATH for a child process: this checkout first, then whatever was there."""
    return os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)


def run_python(*args, stdin=None, **env):
    """``python ARGS`` in a fresh process on this checkout; the CompletedProcess (text)."""
    env = dict(os.environ, PYTHONPATH=with_root_on_path(), **env)
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """GQA, untied head, sharpened outputs, with a tokenizer: the everyday test model."""
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(path, tiny_config(), seed=0, head_scale=8.0)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    from refusion_mlx import load_model

    return load_model(tiny_path)


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tiny_path):
    from refusion_mlx import load

    return load(tiny_path)


@pytest.fixture(scope="session")
def server():
    """One server on the demo model for the server's test modules (CORS on for one origin)."""
    from serving import CORS_ORIGIN, Server

    s = Server("--max-concurrency", "4", "--cors-origin", CORS_ORIGIN)
    yield s
    code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err
