"""Loading ReFusion checkpoints: a local HF/MLX folder or a Hugging Face hub repo.

Safetensors only: ``.bin``/``.pt`` files are never unpickled and no code shipped in
a checkpoint folder is ever run. Weight loading and quantized layers come from
mlx-lm; what is ours is the model class and the checks that turn a broken
folder into one clear line.
"""

import json
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .errors import RefusionError
from .validation import check_bool, check_eos, check_float, check_int, check_path, check_token_id, one_line
from .model import Model, ModelArgs
from .tokenizer_utils import MASK_TOKEN, mask_token_in_files
from .utils import DTYPES

SUPPORTED_MODEL_TYPES = ("qwen3", "refusion")
# What a hub download may fetch: configs, safetensors, tokenizer files. No code, no pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "*.md"]
# The small model trained by examples/train_demo.py, shipped inside the package: the offline default.
DEMO_MODEL_NAME = "demo"
DEMO_MODEL_PATH = Path(__file__).resolve().parent / "demo" / "model"


def is_demo(path_or_repo: Union[str, Path, None]) -> bool:
    """Whether ``path_or_repo`` names the packaged demo model (a local folder called demo wins)."""
    name = path_or_repo if path_or_repo is not None else DEMO_MODEL_NAME
    return str(name) == DEMO_MODEL_NAME and not Path(name).exists()


def resolve_path(path_or_repo: Union[str, Path, None], revision: Optional[str] = None) -> Path:
    """A local folder as is; None or "demo": the packaged demo model; else a hub repo id."""
    path = Path(path_or_repo if path_or_repo is not None else DEMO_MODEL_NAME).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RefusionError(f"{path} is a file; expected a model folder")
        return path
    text = str(path)
    if is_demo(text):
        if not (DEMO_MODEL_PATH / "config.json").exists():
            raise RefusionError(f"the demo model is missing from this install ({DEMO_MODEL_PATH}); "
                                "reinstall refusion-mlx or pass --model")
        return DEMO_MODEL_PATH
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise RefusionError(f"model folder not found: {text}")
    return _download(text, revision)


def _download(repo_id: str, revision: Optional[str]) -> Path:
    """Fetch the safe files of a hub repo; offline or missing repos give one clear line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except hub_errors.RepositoryNotFoundError:
        raise RefusionError(f"no such model on the Hugging Face hub (or no access): {repo_id}") from None
    except hub_errors.RevisionNotFoundError:
        raise RefusionError(f"revision {revision!r} not found in {repo_id}") from None
    except hub_errors.LocalEntryNotFoundError:
        raise RefusionError(
            f"{repo_id} is not in the local hub cache and the hub cannot be reached "
            "(offline?); download it on a connected machine or pass a local folder"
        ) from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusionError(f"cannot download {repo_id}: {first}") from None


def read_config(path: Path) -> dict:
    """config.json as a dict, checked: a supported model type, no custom code, fields of the right types."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RefusionError(f"no config.json in {path}")
    config = read_json_object(config_file)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RefusionError(f"unsupported model_type {model_type!r} in {config_file} (expected qwen3)")
    if "model_file" in config:
        raise RefusionError(f"{config_file} asks to run custom code ({config['model_file']}); refusing")
    if "auto_map" in config and model_type != "qwen3":
        # transformers knows qwen3 and never needs the folder's code for it; any other type would
        # be built by the .py files auto_map points at. Code from a checkpoint is never run here.
        raise RefusionError(f"{config_file} maps model_type {model_type!r} to code in the folder (auto_map); "
                            "code from a checkpoint is never run (a ReFusion checkpoint is model_type qwen3)")
    check_config_fields(config, config_file)
    return config


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object (not a list, a number or null)."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefusionError(f"{file} is not valid JSON ({e})") from None
    except OSError as e:
        raise RefusionError(f"cannot read {file}: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise RefusionError(f"{file} must hold a JSON object, not {type(value).__name__}")
    return value


def check_config_fields(config: dict, config_file: Path):
    """The fields the model reads, with the types and ranges it needs (one line naming the field)."""
    def field(name, check, required=False):
        if config.get(name) is None:
            if required:
                raise RefusionError(f"{config_file} has no {name}")
            return
        try:
            check(name, config[name])
        except RefusionError as e:
            raise RefusionError(f"{config_file}: {e}") from None

    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        field(name, lambda n, v: check_int(n, v, 1), required=True)
    field("rms_norm_eps", lambda n, v: check_float(n, v, positive=True), required=True)
    for name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        field(name, lambda n, v: check_int(n, v, 1))
    field("rope_theta", lambda n, v: check_float(n, v, positive=True))
    for name in ("tie_word_embeddings", "attention_bias"):
        field(name, check_bool)
    field("rope_scaling", check_rope_scaling)
    field("quantization", check_quantization)
    vocab = config["vocab_size"]
    field("mask_token_id", lambda n, v: check_token_id(n, v, vocab))
    field("eos_token_id", lambda n, v: check_eos(n, v, vocab))


def check_rope_scaling(name: str, value):
    if not isinstance(value, dict):
        raise RefusionError(f"{name} must be an object or null, got {value!r}")
    if (value.get("rope_type") or value.get("type")) == "linear":
        check_float(f"{name}.factor", value.get("factor"), positive=True)


def check_quantization(name: str, value):
    if not isinstance(value, dict):
        raise RefusionError(f"{name} must be an object with bits and group_size")
    check_int(f"{name}.bits", value.get("bits"), 1, 8)
    check_int(f"{name}.group_size", value.get("group_size"), 1)


def check_weight_files(path: Path):
    """Make sure the safetensors the folder promises are there; refuse pickled weights."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = read_json_object(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise RefusionError(f"{index_file} is not a valid safetensors index (no weight_map of file names)")
        shards = set(weight_map.values())
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            raise RefusionError(f"missing weight shard listed in {index_file.name}: {missing[0]}")
    if not list(path.glob("model*.safetensors")):
        pickles = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise RefusionError(
                f"{path} has only pickled weights ({pickles[0]}); they are never unpickled here. "
                "Convert them to safetensors first"
            )
        raise RefusionError(f"no model*.safetensors weights in {path}")


def load_model(path: Union[str, Path], dtype: Optional[str] = None, for_cpu: bool = True,
               group: Optional[mx.distributed.Group] = None) -> Model:
    """Build the model from a folder (weights + config.json); no tokenizer needed.

    ``dtype`` (float16|bfloat16|float32) casts floating weights; by default the
    checkpoint's dtype is kept. ``for_cpu``: a quantized model about to run on the
    CPU is prepared for it (``prepare_quantized_for_cpu``); pass False to keep the
    checkpoint exactly as stored (to save it again). ``group``: a distributed group of
    several ranks (``distributed.connect``); this rank keeps only its shard of the layers
    (``Model.shard``): each tensor is read lazily and only this rank's slice of it is kept.
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = resolve_path(check_path("path", path))
    if dtype is not None and dtype not in DTYPES:
        raise RefusionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    read_config(path)
    check_weight_files(path)
    try:
        model, _ = mlx_lm_load_model(path, lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
    except RefusionError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusionError(f"cannot load weights from {path}: {first}") from None
    if group is not None:
        model.shard(group)
    if dtype is not None:
        cast_floating(model, dtype)
    if for_cpu and mx.default_device() == mx.cpu:
        prepare_quantized_for_cpu(model, cast_scales=dtype is None)
    attach_generation_config(model, path)
    try:
        if model.group is not None:  # layer by layer: one layer's whole tensors in memory at a time
            for layer in model.layers:
                mx.eval(layer.parameters())
        mx.eval(model.parameters())
    except (ValueError, RuntimeError) as e:
        raise RefusionError(f"cannot read weights from {path}: {e}") from None
    return model


class CPUQuantizedLinear(nn.QuantizedLinear):
    """On MLX's CPU backend, quantized products of several tokens go through BLAS.

    The CPU's quantized matmul is fine for one token but ~10x slower than
    dequantize + BLAS for the 8-256 tokens a plan-and-infill call feeds.
    """

    def __call__(self, x):
        if x.size // x.shape[-1] < MIN_TOKENS_FOR_BLAS:
            return super().__call__(x)
        y = x @ dequantized(self).T
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """The tied head's product, as ``CPUQuantizedLinear``."""

    def as_linear(self, x):
        if x.size // x.shape[-1] < MIN_TOKENS_FOR_BLAS:
            return super().as_linear(x)
        return x @ dequantized(self).T


MIN_TOKENS_FOR_BLAS = 4


def dequantized(layer) -> mx.array:
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits)


def prepare_quantized_for_cpu(model: nn.Module, cast_scales: bool = True):
    """Make a quantized model fast on MLX's CPU backend; nothing changes for a float model.

    float16/bfloat16 quantization scales make the CPU's quantized products ~30x
    slower than float32 ones (the demo model at 4 bits: 1.8 vs 74 tokens/s), so the
    scales, biases and the few unquantized weights become float32 (half a bit more
    per weight); and products of several tokens use dequantize + BLAS (74 -> 656
    tokens/s). Metal and CUDA have fast quantized kernels and are left alone.
    """
    quantized = [m for _, m in model.named_modules() if type(m) in (nn.QuantizedLinear, nn.QuantizedEmbedding)]
    if not quantized:
        return
    if cast_scales and any(m.scales.dtype in (mx.float16, mx.bfloat16) for m in quantized):
        cast_floating(model, "float32")
    for m in quantized:
        m.__class__ = CPUQuantizedLinear if isinstance(m, nn.QuantizedLinear) else CPUQuantizedEmbedding


def cast_floating(model: nn.Module, dtype: str):
    """Cast the model's floating-point parameters (quantized packs stay as they are)."""
    if dtype not in DTYPES:
        raise RefusionError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    target = DTYPES[dtype]
    model.update(tree_map(lambda w: w.astype(target) if mx.issubdtype(w.dtype, mx.floating) else w,
                          model.parameters()))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def load_tokenizer(path: Path, model: Model):
    """mlx-lm's TokenizerWrapper for the folder, with EOS ids from the config; never runs the folder's code."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    # Without these files transformers quietly builds an empty tokenizer.
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RefusionError(f"no tokenizer files in {path} (expected one of {', '.join(TOKENIZER_FILES)})")
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file() and "auto_map" in read_json_object(tokenizer_config):
        raise RefusionError(f"{tokenizer_config} points at tokenizer code in the folder (auto_map); "
                            "code from a checkpoint is never run")
    eos = model.args.eos_token_id
    try:
        # trust_remote_code=False: transformers refuses custom code instead of asking on stdin.
        tokenizer = mlx_lm_load_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False},
                                          eos_token_ids=[eos] if isinstance(eos, int) else eos)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, json.JSONDecodeError) as e:
        raise RefusionError(f"cannot load the tokenizer from {path}: {one_line(e)}") from None
    # Our own check against max_position_embeddings replaces transformers' length warning.
    tokenizer._tokenizer.model_max_length = sys.maxsize
    return tokenizer


def read_generation_config(path: Path) -> dict:
    """generation_config.json as a dict ({} when absent); a broken one is one clear line."""
    file = path / "generation_config.json"
    if not file.exists():
        return {}
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefusionError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise RefusionError(f"{file} must hold a JSON object")
    return config


def attach_generation_config(model: Model, path: Path):
    """The model's own decoding defaults and the prompt formats it was trained on, from its folder.

    ``generation_config.json`` may carry ``generate_ids``'s knobs (gen_length, slot_size,
    serial_num_blocks, slot_threshold, token_threshold): they replace the library's defaults
    for this model (the demo model ships its own). ``prompt_formats``, when present, lists the
    only prompt formats the model was trained on; the command line warns when asked for another
    (``system_prompts: true``: a system prompt is one of them).
    """
    from .settings import KNOBS

    config = read_generation_config(path)
    model.generation_defaults = MappingProxyType({k: config[k] for k in KNOBS if k in config})
    formats = config.get("prompt_formats")
    model.prompt_formats = "; ".join(formats) if isinstance(formats, list) else None
    model.trained_system_prompts = config.get("system_prompts") is True


def load(
    path_or_repo: Union[str, Path, None] = None,
    adapter_path: Optional[str] = None,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    for_cpu: bool = True,
    group: Optional[mx.distributed.Group] = None,
) -> Tuple[Model, object]:
    """Load a model and its tokenizer.

    Args:
        path_or_repo: a local folder (HF or MLX layout), a Hugging Face repo id (downloaded
            once: configs, safetensors and tokenizer files only), or None / ``"demo"`` for the
            small demo model shipped in the package.
        adapter_path: a folder with fine-tuned adapters (``adapter_config.json`` +
            ``adapters.safetensors``, mlx-lm's layout) to apply.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` to cast the floating weights;
            default the checkpoint's (float32 for the demo model).
        revision: a hub branch, tag or commit.
        for_cpu: on the CPU, prepare a quantized model for speed (float32 scales, BLAS for
            multi-token products; see ``prepare_quantized_for_cpu``). False keeps the weights
            exactly as stored, to save them again.
        group: an ``mx.distributed`` group of several ranks (``distributed.connect()``): this
            rank loads only its shard of the layers (tensor parallelism, ``Model.shard``).
            Every rank must call ``load`` with the same arguments.

    Returns:
        ``(model, tokenizer)``: our Qwen3 with ``model.args.mask_token_id`` set (from the config,
        else the tokenizer's ``<|mask|>``) and the model's own decoding defaults, and mlx-lm's
        ``TokenizerWrapper``.
    """
    check_path("path_or_repo", path_or_repo, optional=True)
    adapter_path = check_path("adapter_path", adapter_path, optional=True)
    if dtype is not None and dtype not in DTYPES:
        raise RefusionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise RefusionError(f"revision must be a branch, tag or commit name, got {revision!r}")
    if group is not None and group.size() > 1 and adapter_path is not None:
        raise RefusionError("adapters cannot be applied to a model split across ranks; "
                            "fuse them into the model first (python -m refusion_mlx fuse)")
    path = resolve_path(path_or_repo, revision)
    if dtype is None and path == DEMO_MODEL_PATH:
        dtype = "float32"  # shipped as float16 to stay small; float32 is fast on every device
    model = load_model(path, dtype=dtype, for_cpu=for_cpu, group=group)
    tokenizer = load_tokenizer(path, model)
    if model.args.mask_token_id is None:
        model.args.mask_token_id = mask_token_in_files(path)
    if model.args.mask_token_id is None:
        model.args.mask_token_id = tokenizer.get_vocab().get(MASK_TOKEN)
    if model.args.mask_token_id is None:
        raise RefusionError(f"the config has no mask_token_id and the tokenizer has no {MASK_TOKEN} token")
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    return model, tokenizer


def check_adapter_config(config_file: Path) -> dict:
    """adapter_config.json as mlx-lm's ``load_adapters`` reads it, checked field by field."""
    config = read_json_object(config_file)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise RefusionError(f"{config_file}: fine_tune_type must be lora, dora or full, got {kind!r}")
    if kind == "full":
        return config
    if "num_layers" not in config:
        raise RefusionError(f"{config_file} has no num_layers")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise RefusionError(f"{config_file}: lora_parameters must be an object with rank, scale and dropout")
    try:
        check_int("num_layers", config["num_layers"], -1)
        check_int("lora_parameters.rank", params.get("rank"), 1)
        check_float("lora_parameters.scale", params.get("scale"))
        check_float("lora_parameters.dropout", params.get("dropout", 0.0), 0.0, 1.0)
        keys = params.get("keys")
        if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
            raise RefusionError(f"lora_parameters.keys must be a list of layer names, got {keys!r}")
    except RefusionError as e:
        raise RefusionError(f"{config_file}: {e}") from None
    return config


def load_adapters(model: Model, adapter_path: Union[str, Path]):
    """Apply fine-tuned adapters saved in mlx-lm's layout (adapter_config.json + adapters.safetensors)."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapter_config.json").is_file():
        raise RefusionError(f"no adapter_config.json in {adapter_path}")
    check_adapter_config(adapter_path / "adapter_config.json")
    if not (adapter_path / "adapters.safetensors").is_file():
        raise RefusionError(f"no adapters.safetensors in {adapter_path}")
    try:
        mlx_lm_load_adapters(model, str(adapter_path))
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        # mlx-lm lists every mismatched tensor, one per line; the first says what is wrong.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[0] if lines else type(e).__name__
        if len(lines) > 2:
            detail += f" ({lines[1]}, and {len(lines) - 2} more)"
        elif len(lines) == 2:
            detail += f" ({lines[1]})"
        raise RefusionError(f"cannot load adapters from {adapter_path}: {one_line(ValueError(detail))} "
                            "(adapters trained on another base model?)") from None
    model.eval()
