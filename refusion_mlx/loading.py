"""Loading ReFusion checkpoints: a local HF/MLX folder or a Hugging Face hub repo.

Safetensors only: ``.bin``/``.pt`` files are never unpickled and no code shipped in
a checkpoint folder is ever run. Weight loading and quantized layers come from
mlx-lm; what is ours is the model class and the checks that turn a broken
folder into one clear line.
"""

import json
from pathlib import Path
from types import MappingProxyType
from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .errors import RefusionError
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
    """config.json as a dict, checked for a supported model type."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise RefusionError(f"no config.json in {path}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefusionError(f"{config_file} is not valid JSON ({e})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RefusionError(f"unsupported model_type {model_type!r} in {config_file} (expected qwen3)")
    if "model_file" in config:
        raise RefusionError(f"{config_file} asks to run custom code ({config['model_file']}); refusing")
    return config


def check_weight_files(path: Path):
    """Make sure the safetensors the folder promises are there; refuse pickled weights."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        try:
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise RefusionError(f"{index_file} is not a valid safetensors index ({e})") from None
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


def load_model(path: Union[str, Path], dtype: Optional[str] = None, for_cpu: bool = True) -> Model:
    """Build the model from a folder (weights + config.json); no tokenizer needed.

    ``dtype`` (float16|bfloat16|float32) casts floating weights; by default the
    checkpoint's dtype is kept. ``for_cpu``: a quantized model about to run on the
    CPU is prepared for it (``prepare_quantized_for_cpu``); pass False to keep the
    checkpoint exactly as stored (to save it again).
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = resolve_path(path)
    read_config(path)
    check_weight_files(path)
    try:
        model, _ = mlx_lm_load_model(path, lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
    except RefusionError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusionError(f"cannot load weights from {path}: {first}") from None
    if dtype is not None:
        cast_floating(model, dtype)
    if for_cpu and mx.default_device() == mx.cpu:
        prepare_quantized_for_cpu(model, cast_scales=dtype is None)
    attach_generation_config(model, path)
    try:
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


def load_tokenizer(path: Path, model: Model):
    """mlx-lm's TokenizerWrapper for the folder, with EOS ids from the config."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    eos = model.args.eos_token_id
    try:
        return mlx_lm_load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusionError(f"cannot load the tokenizer from {path}: {first}") from None


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
    only prompt formats the model was trained on; the command line warns when asked for another.
    """
    from .decode import KNOBS

    config = read_generation_config(path)
    model.generation_defaults = MappingProxyType({k: config[k] for k in KNOBS if k in config})
    formats = config.get("prompt_formats")
    model.prompt_formats = "; ".join(formats) if isinstance(formats, list) else None


def load(
    path_or_repo: Union[str, Path, None] = None,
    adapter_path: Optional[str] = None,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    for_cpu: bool = True,
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

    Returns:
        ``(model, tokenizer)``: our Qwen3 with ``model.args.mask_token_id`` set (from the config,
        else the tokenizer's ``<|mask|>``) and the model's own decoding defaults, and mlx-lm's
        ``TokenizerWrapper``.
    """
    path = resolve_path(path_or_repo, revision)
    if dtype is None and path == DEMO_MODEL_PATH:
        dtype = "float32"  # shipped as float16 to stay small; float32 is fast on every device
    model = load_model(path, dtype=dtype, for_cpu=for_cpu)
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


def load_adapters(model: Model, adapter_path: Union[str, Path]):
    """Apply fine-tuned adapters saved in mlx-lm's layout (adapter_config.json + adapters.safetensors)."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapter_config.json").exists():
        raise RefusionError(f"no adapter_config.json in {adapter_path}")
    try:
        mlx_lm_load_adapters(model, str(adapter_path))
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise RefusionError(f"cannot load adapters from {adapter_path}: {e}") from None
    model.eval()
