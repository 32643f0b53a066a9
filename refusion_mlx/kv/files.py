"""Prompt caches on disk: a safetensors file with the entries, the tokens they stand for, and the
identity of the model that made them.

A file holds each layer's committed keys and values (``{layer}.keys``/``{layer}.values``), each
entry's position and age, and the history (token per position, decoded or fed); its metadata
says which model made it (``model_fingerprint``) and how the cache was set up. Loading checks
the header against the file's size and this model's shape before anything is allocated, so a
truncated, corrupt or foreign file is one ``RefusionError`` line.
"""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import RefusionError
from .prompt import PromptCache

FORMAT = "refusion-prompt-cache/1"
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "vocab_size", "rope_theta")


def model_fingerprint(model) -> str:
    """A short hash of the model's shape and of its final norm's weights: two checkpoints that
    would make different keys for the same tokens almost surely differ here."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: getattr(model.args, k) for k in _SHAPE_FIELDS}, sort_keys=True).encode())
    digest.update(np.array(model.model.norm.weight.astype(mx.float32)).tobytes())
    return digest.hexdigest()[:16]


def save_prompt_cache(path, prompt_cache: PromptCache, model, metadata: Optional[dict] = None):
    """Write ``prompt_cache`` to ``path`` (safetensors) whole or not at all."""
    cache = prompt_cache.cache
    n = cache.length
    arrays = {"positions": mx.array(cache.positions[:n]), "ages": mx.array(cache.ages[:n]),
              "history": mx.array(prompt_cache.history), "decoded": mx.array(prompt_cache.decoded.astype(np.uint8))}
    for i, layer in enumerate(cache.layers):
        if layer.keys is not None:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = layer.keys[..., :n, :], layer.values[..., :n, :]
    info = {"format": FORMAT, "model": model_fingerprint(model), "length": str(n),
            "committed": str(cache.committed), "keep_answers": str(prompt_cache.keep_answers),
            "max_kv_size": str(prompt_cache.max_kv_size or 0), **(metadata or {})}
    path = Path(path)
    partial = path.with_name(path.name + ".partial.safetensors")  # MLX adds the suffix if missing
    try:
        mx.save_safetensors(str(partial), arrays, metadata=info)
        os.replace(partial, path)
    except (OSError, RuntimeError) as e:
        partial.unlink(missing_ok=True)
        raise RefusionError(f"cannot write the prompt cache {path}: {getattr(e, 'strerror', None) or e}") from None


def _header(path: Path) -> dict:
    """The safetensors header, checked against the file's size (nothing else is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RefusionError(f"{path} is not a prompt cache file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100_000_000):
            raise RefusionError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RefusionError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise RefusionError(f"{path} is not a safetensors file (bad header)")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            count = int(np.prod(entry["shape"], dtype=np.int64))
            width = DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise RefusionError(f"{path}: tensor {name!r} is malformed") from None
        if not 0 <= start <= stop <= data or stop - start != count * width:
            raise RefusionError(f"{path} is truncated or corrupt (tensor {name!r})")
    return header


def load_prompt_cache(path, model) -> PromptCache:
    """The prompt cache saved in ``path``, for ``model`` (a file from another model is refused)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RefusionError(f"prompt cache file {path} does not exist")
    header = _header(path)
    info = header.get("__metadata__") or {}
    if info.get("format") != FORMAT:
        raise RefusionError(f"{path} is not a refusion_mlx prompt cache")
    if info.get("model") != model_fingerprint(model):
        raise RefusionError(f"{path} was made by another model (fingerprint {info.get('model')}, "
                            f"this model's is {model_fingerprint(model)})")
    args = model.args
    try:
        n, committed = int(info["length"]), int(info["committed"])
        max_kv_size = int(info["max_kv_size"]) or None
    except (KeyError, ValueError):
        raise RefusionError(f"{path}: its metadata is malformed") from None
    if max_kv_size is not None and n > max_kv_size:
        raise RefusionError(f"{path}: its metadata is malformed ({n} entries in a cache of {max_kv_size})")
    want = (1, args.num_key_value_heads, n, args.head_dim)
    for i in range(len(model.layers) if n else 0):
        for part in ("keys", "values"):
            entry = header.get(f"{i}.{part}")
            if entry is None or tuple(entry["shape"]) != want:
                raise RefusionError(f"{path}: layer {i}'s {part} do not fit this model")
    try:
        arrays = mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as e:
        raise RefusionError(f"cannot read the prompt cache {path}: {e}") from None
    prompt_cache = PromptCache(len(model.layers), max_kv_size, info.get("keep_answers") != "False")
    cache = prompt_cache.cache
    cache.reserve(max(n, 1))
    cache.length, cache.committed = n, committed
    cache.positions[:n], cache.ages[:n] = np.array(arrays["positions"]), np.array(arrays["ages"])
    for i, layer in enumerate(cache.layers if n else []):
        keys, values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        pad = [(0, 0), (0, 0), (0, layer.capacity - n), (0, 0)]
        layer.keys, layer.values = mx.pad(keys, pad), mx.pad(values, pad)
    prompt_cache.history = np.array(arrays["history"]).astype(np.int64)
    prompt_cache.decoded = np.array(arrays["decoded"]).astype(bool)
    prompt_cache.metadata = dict(info)
    return prompt_cache
