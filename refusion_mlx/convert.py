"""Convert and quantize ReFusion checkpoints into mlx-lm's layout: ``python -m refusion_mlx.convert``.

    python -m refusion_mlx.convert --hf-path GSAI-ML/ReFusion --mlx-path refusion-4bit -q --q-bits 4 --q-group-size 64

The weights keep their HF names (the model is plain Qwen3), so the folder written
here loads with ``refusion_mlx.load`` and, left to right, with ``mlx_lm.load``.
Casting, quantization and the mixed recipes are mlx-lm's (``quantize_model``,
``dequantize_model``, ``mixed_quant_predicate_builder``); what is ours is the
streaming writer and the safety around it:

- memory: ``mx.load`` is lazy per tensor, so nothing is read until a tensor is
  evaluated. Output shards are evaluated tensor by tensor, written, and dropped
  one at a time; the peak is about one output shard, not the model.
- the folder is written under a temporary name beside the target and renamed at
  the end, so an interrupted run never leaves a folder that looks complete.
- safetensors only (nothing is unpickled, no code from the checkpoint is run),
  and every bad input is one ``error:`` line and exit status 2.
"""

import argparse
import json
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .cli import ArgumentParser, prog, run_command
from .errors import RefusionError
from .tokenizer_utils import MASK_TOKEN, mask_token_in_files
from .utils import DTYPES, atomic_folder, check_output_folder, remove_stale_temporaries
from .validation import one_line

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64
# mlx-lm's recipes (llama.cpp Q*_K_M-like: more bits for lm_head and some v_proj/down_proj).
MLX_LM_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
# Ours: the body at --q-bits, embeddings and lm_head (the vocabulary ends) at 6 or 8 bits.
END_RECIPES = {"embed_head_6": 6, "embed_head_8": 8}
VOCAB_ENDS = ("model.embed_tokens", "lm_head")
DEFAULT_SHARD_SIZE = "5GB"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# Copied as files (never re-serialized); no code files, no pickles.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "tokenizer.model",
)


def build_parser() -> argparse.ArgumentParser:
    """mlx-lm's convert flags, plus shard size, --force and our recipes."""
    p = ArgumentParser(prog=prog("convert"),
                description="Convert a ReFusion checkpoint to MLX, optionally quantized.")
    p.add_argument("--hf-path", "--model", required=True, help="local HF/MLX folder or Hugging Face repo id")
    p.add_argument("--mlx-path", default="mlx_model", help="folder to write")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast floating weights (default: keep the source's)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights (affine)")
    p.add_argument("--q-bits", type=int, choices=Q_BITS, help=f"bits per weight (default {DEFAULT_BITS})")
    p.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES,
                   help=f"weights per scale/bias (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--quant-recipe", choices=MLX_LM_RECIPES + tuple(END_RECIPES),
                   help="mixed bits: mlx-lm's mixed_L_H, or embed_head_6/8 (embeddings + lm_head at 6/8 bits)")
    p.add_argument("-d", "--dequantize", action="store_true", help="dequantize a quantized model to float")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help="largest output shard, e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace --mlx-path if it already holds a model")
    p.add_argument("--upload-repo", help="Hugging Face repo to upload the converted folder to")
    return p


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count, as bytes (GB = 10**9, as huggingface_hub counts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise RefusionError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def check_options(quantize: bool, dequantize: bool, q_bits, q_group_size, quant_recipe, upload_repo):
    """Reject contradictory flags before any work is done."""
    if quantize and dequantize:
        raise RefusionError("choose either -q/--quantize or --dequantize, not both")
    if not quantize and (q_bits or q_group_size or quant_recipe):
        raise RefusionError("--q-bits, --q-group-size and --quant-recipe need -q/--quantize")
    if quant_recipe in MLX_LM_RECIPES and q_bits not in (None, recipe_bits(quant_recipe)):
        raise RefusionError(f"--quant-recipe {quant_recipe} sets the body to {recipe_bits(quant_recipe)} "
                            f"bits; drop --q-bits {q_bits}")
    if upload_repo is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(upload_repo)
        except HFValidationError as e:
            raise RefusionError(f"--upload-repo {upload_repo!r} is not a repo id ({one_line(e)})") from None


def recipe_bits(recipe: str) -> int:
    """The body's bits in an mlx-lm recipe name (mixed_4_6 -> 4)."""
    return int(recipe.split("_")[1])


def check_safetensors(file: Path):
    """Parse a safetensors header and make sure the file holds every byte it promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as e:  # unreadable: permissions, a folder of that name, an I/O error
        raise RefusionError(f"cannot read {file.name}: {one_line(e)}") from None
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # JSON errors too
        raise RefusionError(f"{file.name} is not a valid safetensors file (corrupt header: {one_line(e)})") \
            from None
    if end > size:
        raise RefusionError(f"{file.name} is truncated ({size} bytes, header promises {end})")


def check_source(path: Path) -> dict:
    """The source's config.json, after checking its weight files are whole safetensors."""
    from .loading import check_weight_files, read_config

    config = read_config(path)
    check_weight_files(path)
    for file in sorted(path.glob("model*.safetensors")):
        check_safetensors(file)
    return config


def check_target(target: Path, force: bool) -> Path:
    """Refuse to overwrite anything but a model folder, and that only with --force."""
    return check_output_folder(target, force, "--mlx-path")


def check_disk_space(target: Path, nbytes: int):
    """Fail before writing anything if the target's disk cannot hold the weights."""
    existing = next(p for p in [target, *target.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise RefusionError(f"not enough disk space for {target}: the weights need {human_size(nbytes)}, "
                            f"{human_size(free)} free")


def human_size(nbytes: int) -> str:
    """Bytes as GB, or MB below a gigabyte."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**9 else f"{nbytes / 1e6:.2f} MB"


def check_quantization_state(config: dict, quantize: bool, dequantize: bool):
    """Quantize float weights only; dequantize quantized ones only."""
    quantized = "quantization" in config
    if quantize and quantized:
        raise RefusionError("the source is already quantized; convert from the float checkpoint "
                            "(or --dequantize first)")
    if dequantize and not quantized:
        raise RefusionError("the source is not quantized; nothing to dequantize")


def load_lazy(path: Path):
    """Our model with the source's tensors bound lazily: nothing is read from disk yet."""
    from mlx_lm.utils import load_model

    from .model import Model, ModelArgs

    try:
        model, _ = load_model(path, lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
    except RefusionError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        raise RefusionError(f"cannot load weights from {path}: {one_line(e)}") from None
    return model


def output_config(config: dict, source: Path, dtype: Optional[str]) -> dict:
    """The config to write: mask_token_id kept, seen as qwen3 by mlx-lm, no pointers to code."""
    config = dict(config)
    if config.get("mask_token_id") is None:
        config["mask_token_id"] = mask_token_in_files(source)
        if config["mask_token_id"] is None:
            del config["mask_token_id"]
            print(f"warning: no mask_token_id in config.json and no {MASK_TOKEN} in the tokenizer; "
                  "the converted model will only decode left to right", file=sys.stderr)
    # mlx-lm picks its model class from model_type; the weights are plain Qwen3.
    config["model_type"] = "qwen3"
    # No code files are copied, so a transformers auto_map would point at nothing.
    config.pop("auto_map", None)
    if dtype is not None:
        config.update({k: dtype for k in ("torch_dtype", "dtype") if k in config})
    return config


def quant_predicate(recipe: Optional[str], model, group_size: int) -> Optional[Callable]:
    """The per-layer predicate for a recipe (None: every quantizable layer at --q-bits)."""
    if recipe is None:
        return None
    if recipe in MLX_LM_RECIPES:
        from mlx_lm.convert import mixed_quant_predicate_builder

        return mixed_quant_predicate_builder(recipe, model, group_size)
    high = {"group_size": group_size, "bits": END_RECIPES[recipe], "mode": "affine"}

    def ends_predicate(path, module) -> Union[bool, dict]:
        """Embedding and head see every token of the vocabulary: rounding there costs the most."""
        return dict(high) if path in VOCAB_ENDS else True

    return ends_predicate


def transform(model, config: dict, dtype, quantize, q_bits, q_group_size, quant_recipe, dequantize) -> dict:
    """Dequantize, cast, quantize (lazily, in mlx-lm's order); returns the new config."""
    from mlx_lm.utils import dequantize_model, quantize_model

    from .loading import cast_floating

    if dequantize:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if dtype is not None:
        cast_floating(model, dtype)
    if quantize:
        bits = q_bits or (recipe_bits(quant_recipe) if quant_recipe in MLX_LM_RECIPES else DEFAULT_BITS)
        group_size = q_group_size or DEFAULT_GROUP_SIZE
        predicate = quant_predicate(quant_recipe, model, group_size)
        _, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    return config


def prepare_weights(source: Path, config: dict, **options) -> tuple:
    """Flat lazy output tensors, total parameter count and config; the model itself is dropped."""
    from mlx_lm.utils import get_total_parameters

    model = load_lazy(source)
    config = transform(model, config, **options)
    weights = dict(tree_flatten(model.parameters()))
    return weights, get_total_parameters(model), config


def plan_shards(weights: Dict[str, mx.array], max_bytes: int) -> List[List[str]]:
    """Names per shard, in order, each shard at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards, size = [], 0
    for name, w in weights.items():
        if not shards or size + w.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += w.nbytes
    return shards


def shard_file_names(count: int) -> List[str]:
    """mlx-lm's names: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def save_shard(file: Path, tensors: Dict[str, mx.array]):
    """Write one shard (tests replace this to simulate a failure mid-conversion)."""
    mx.save_safetensors(str(file), tensors, metadata={"format": "mlx"})


def write_weights(folder: Path, weights: Dict[str, mx.array], max_bytes: int, total_parameters: int) -> int:
    """Evaluate, write and drop one shard at a time, then the index; returns the bytes written.

    ``weights`` is emptied as it goes: once a shard is on disk nothing refers to
    its tensors, so memory holds about one shard.
    """
    from tqdm import tqdm

    shards = plan_shards(weights, max_bytes)
    total = sum(w.nbytes for w in weights.values())
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, disable=None) as bar:
        for i, (file_name, names) in enumerate(zip(shard_file_names(len(shards)), shards), 1):
            bar.set_description(f"shard {i}/{len(shards)}")
            tensors = {}
            for name in names:
                tensors[name] = weights.pop(name)
                mx.eval(tensors[name])  # one tensor at a time: one source tensor in flight
                bar.update(tensors[name].nbytes)
            save_shard(folder / file_name, tensors)
            weight_map.update(dict.fromkeys(names, file_name))
            del tensors
            mx.clear_cache()
    index = {"metadata": {"total_size": total, "total_parameters": total_parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return total


def copy_tokenizer(source: Path, folder: Path):
    """Tokenizer, chat template and generation config, copied byte for byte."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def describe(config: dict, recipe: Optional[str]) -> str:
    """One phrase for the weights' format, e.g. '4-bit affine quantization (group size 64, recipe ...)'."""
    q = config.get("quantization")
    if q:
        recipe = f", recipe {recipe}" if recipe else ""
        return f"{q['bits']}-bit affine quantization (group size {q['group_size']}{recipe})"
    return config.get("torch_dtype") or config.get("dtype") or "float weights"


DEMO_LINEAGE = "refusion_mlx demo model"  # in the demo's data card, and in the card of any conversion of it


def is_demo_lineage(source: Path) -> bool:
    """The packaged demo model, or a conversion of it (its card says so): its card shows demo prompts."""
    card = source / "README.md"
    return card.is_file() and DEMO_LINEAGE in card.read_text(encoding="utf-8", errors="replace")[:2000]


def architecture(config: dict, total_parameters: int) -> str:
    """The model in one phrase, from its own config: size, layers, width, vocabulary."""
    size = f"{total_parameters / 1e9:.2f}B" if total_parameters >= 1e9 else f"{total_parameters / 1e6:.1f}M"
    return (f"{size} parameters, {config.get('num_hidden_layers')} layers, hidden size {config.get('hidden_size')}, "
            f"vocabulary {config.get('vocab_size')}")


def write_model_card(folder: Path, name: str, base_model: Optional[str], weights_format: str,
                     config: dict, total_parameters: int, demo: bool = False):
    """A short README.md with hub metadata, what the model is (from its config) and how to load it;
    for the demo model (``demo``), prompts of its own tasks and where its data card is."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="mlx", pipeline_tag="text-generation", base_model=base_model,
                         tags=["mlx", "refusion", "masked-diffusion", "qwen3"])
    source = f" from {base_model}" if base_model else ""
    what = (f"The {DEMO_LINEAGE} (a toy trained on seven synthetic task families only; its data card is "
            "`refusion_mlx/demo/model/README.md` in the refusion_mlx package)" if demo
            else "A ReFusion model (plan-and-infill masked diffusion LM)")
    if demo:
        from .demo.tasks import EXAMPLE_QUERIES

        prompts = EXAMPLE_QUERIES
    else:
        prompts = ("Write a haiku about autumn.",)
    calls = "".join(f"print(generate(model, tokenizer, {json.dumps(p)}))\n" for p in prompts)
    text = (
        f"# {name}\n\n{what}, Qwen3 architecture ({architecture(config, total_parameters)}), "
        f"converted{source} to MLX with refusion_mlx: {weights_format}.\n\n"
        "```python\nfrom refusion_mlx import load, generate\n\n"
        f'model, tokenizer = load("{name}")\n{calls}```\n\n'
        "The weights are plain Qwen3, so `mlx_lm.load` reads them too (left-to-right decoding only).\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(folder / "README.md")


def write_atomically(target: Path, write: Callable[[Path], None], replace: bool):
    """Write the folder with ``utils.atomic_folder`` (``replace``: the target held a model when the
    run started and --force was given); an OS failure is one clear line."""
    try:
        atomic_folder(target, write, replace)
    except (OSError, RuntimeError) as e:  # full disk, unreadable shard, permissions
        raise RefusionError(f"cannot write {target}: {one_line(e)}") from None


def upload(folder: Path, repo: str):
    """Push the folder to the hub as mlx-lm does (create the repo, upload_large_folder)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_large_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise RefusionError(f"converted model is in {folder}, but the upload to {repo} failed: {one_line(e)}") \
            from None
    print(f"Uploaded to https://huggingface.co/{repo}")


def convert(hf_path: str, mlx_path: str = "mlx_model", *, quantize: bool = False, q_bits: Optional[int] = None,
            q_group_size: Optional[int] = None, quant_recipe: Optional[str] = None, dtype: Optional[str] = None,
            dequantize: bool = False, max_shard_size: str = DEFAULT_SHARD_SIZE, force: bool = False,
            upload_repo: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """Convert ``hf_path`` (folder or hub id) into an MLX folder at ``mlx_path``; see the module doc."""
    from .loading import resolve_path

    check_options(quantize, dequantize, q_bits, q_group_size, quant_recipe, upload_repo)
    max_bytes = parse_size(max_shard_size)
    target = Path(mlx_path).expanduser()
    remove_stale_temporaries(target)  # first: a folder a killed run moved aside is put back
    target = check_target(target, force)  # before a long download
    existed = target.exists()
    source = resolve_path(hf_path, revision)
    if target.resolve() == source.resolve():
        raise RefusionError("--mlx-path is the source folder; choose another")
    config = check_source(source)
    check_quantization_state(config, quantize, dequantize)
    config = output_config(config, source, dtype)
    weights, total_parameters, config = prepare_weights(
        source, config, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
        quant_recipe=quant_recipe, dequantize=dequantize)
    check_disk_space(target, sum(w.nbytes for w in weights.values()))  # sizes are known before evaluation
    base_model = None if Path(hf_path).expanduser().exists() else hf_path

    def write(folder: Path):
        from mlx_lm.utils import save_config

        write_weights(folder, weights, max_bytes, total_parameters)
        save_config(config, config_path=folder / "config.json")
        copy_tokenizer(source, folder)
        write_model_card(folder, upload_repo or target.name, base_model, describe(config, quant_recipe), config,
                         total_parameters, demo=is_demo_lineage(source))

    write_atomically(target, write, replace=existed)
    if upload_repo is not None:
        upload(target, upload_repo)
    return target


def run(args) -> int:
    print(f"Converted model saved to {convert(**vars(args))}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv), "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
