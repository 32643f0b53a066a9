"""Small things more than one module needs: the weight dtypes, atomic writes, JSONL reading."""

import json
import os
import re
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


def is_model_folder(path: Path) -> bool:
    """A folder that is empty or holds a config.json: one a model may be written over."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "config.json").exists())


def check_output_folder(target: Path, force: bool, flag: str) -> Path:
    """The one rule for a command's output folder (convert's --mlx-path, fuse's --save-path): a new
    one is created; an existing one is replaced only with --force, and only if it holds a model."""
    if target.exists():
        if not force:
            raise RefusionError(f"{flag} {target} already exists; pass --force to replace it")
        if not is_model_folder(target):
            raise RefusionError(f"{flag} {target} exists and is not a model folder; not replacing it")
    return target


def atomic_folder(target: Path, write: Callable[[Path], None], replace: bool = True):
    """Call ``write(tmp)`` on a fresh folder beside ``target``, then move it into place.

    A folder already at ``target`` is replaced only once the new one is whole, so an
    interrupted run never leaves a folder that looks complete; and only when ``replace``
    (the caller saw it when the run started). A new target is claimed with ``os.mkdir``,
    which is atomic: of two runs racing for the same new folder exactly one wins, and the
    other fails with one line, leaving the winner's folder alone.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        if replace and target.exists():
            if not is_model_folder(target):
                raise RefusionError(f"{target} is no longer a model folder; not replacing it")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
            return
        try:
            os.mkdir(target)
        except FileExistsError:
            raise RefusionError(f"{target} appeared while this run was writing (another run?); "
                                "left it as it is and discarded this run's output") from None
        os.rename(tmp, target)  # onto the empty folder just claimed
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(target: Path):
    """Clean up after runs that were killed: their ``.name.tmp-PID`` folders are removed, and a
    ``.name.old-PID`` (killed mid-swap) is put back if the target is missing, else removed.
    Folders of processes still alive are left alone."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)")
    if not target.parent.is_dir():
        return
    for folder in sorted(target.parent.iterdir()):
        found = pattern.fullmatch(folder.name)
        if not found or not folder.is_dir() or process_alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and not target.exists():
            os.rename(folder, target)
            print(f"restored {target} from {folder.name} (a killed run had moved it aside)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder.name} (left behind by a killed run)")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


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
