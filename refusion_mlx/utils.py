"""Small things more than one module needs: the weight dtypes, atomic writes, JSONL reading."""

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Tuple

import mlx.core as mx

from .errors import RefusionError

# What --dtype accepts everywhere (load, generate, evaluate, convert).
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def atomic_write(path: Path, write: Callable[[Path], None]):
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    A crash leaves either the old file or the new one, never a torn one. The temporary
    name keeps the suffix, so writers that pick a format from it still work.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj):
    """JSON (indented) written with ``atomic_write``."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=4)))


def atomic_folder(target: Path, write: Callable[[Path], None]):
    """Call ``write(tmp)`` on a fresh folder beside ``target``, then swap it into place.

    A folder already at ``target`` is replaced only once the new one is whole, so an
    interrupted run never leaves a folder that looks complete.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(path: Path) -> Iterator[Tuple[str, object]]:
    """(``"NAME line N"``, record) for every non-blank line; bad JSON or encoding is one clear error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RefusionError(f"{path.name} is not UTF-8 text") from None
    except OSError as e:
        raise RefusionError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefusionError(f"{where}: not valid JSON ({e.msg})") from None
        yield where, record
