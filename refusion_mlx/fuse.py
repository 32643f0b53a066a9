"""Fuse fine-tuned adapters into the base weights: ``python -m refusion_mlx.fuse``.

    python -m refusion_mlx.fuse --model PATH --adapter-path adapters --save-path fused

mlx-lm's recipe: load with the adapters, replace every LoRA/DoRA layer by its
``fuse()``d linear (re-quantized on a quantized base unless ``--dequantize``),
save weights + config + tokenizer in mlx-lm's layout. The folder is written
under a temporary name and renamed into place, so a crash never leaves half a model.
"""

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlx.utils import tree_unflatten

from .cli import ArgumentParser, prog, run_command
from .errors import RefusionError
from .utils import atomic_folder, check_output_folder, remove_stale_temporaries
from .validation import one_line


def build_parser() -> argparse.ArgumentParser:
    """mlx-lm's fuse flags (no GGUF export, no upload)."""
    p = ArgumentParser(prog=prog("fuse"), description="Fuse fine-tuned adapters into the model.")
    p.add_argument("--model", required=True, help="base model: local folder or Hugging Face repo id")
    p.add_argument("--adapter-path", default="adapters",
                   help="folder with adapter_config.json + adapters.safetensors")
    p.add_argument("--save-path", default="fused_model", help="where the fused model is written")
    p.add_argument("--dequantize", action="store_true", help="save a dequantized (full precision) model")
    p.add_argument("--force", action="store_true", help="replace --save-path if it already holds a model")
    return p


def fuse_layers(model, dequantize: bool = False):
    """Replace every adapter layer by the plain (or quantized) linear it amounts to."""
    fused = [(name, m.fuse(dequantize=dequantize))
             for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def fused_config(model_path: Path, dequantize: bool) -> dict:
    """The base config.json, without its quantization block when dequantizing."""
    from .loading import read_config

    config = read_config(model_path)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return config


def write_model(folder: Path, model, tokenizer, config: dict, source: Path):
    """Weights, config, tokenizer and generation config in mlx-lm's layout (no code files copied)."""
    from mlx_lm.utils import save_config, save_model

    save_model(folder, model, donate_model=False)
    save_config(config, config_path=folder / "config.json")
    tokenizer.save_pretrained(str(folder))
    if (source / "generation_config.json").exists():
        shutil.copy(source / "generation_config.json", folder)


def check_save_path(target: Path, model_path: Path, force: bool):
    """Never the base model; otherwise convert's rule (``check_output_folder``): an existing
    folder is replaced only with --force, and only if it holds a model."""
    if target.exists() and target.resolve() == model_path.resolve():
        raise RefusionError("--save-path is the base model folder; choose another")
    check_output_folder(target, force, "--save-path")


def fuse(model_path: str, adapter_path: str, save_path: str, dequantize: bool = False, force: bool = False) -> Path:
    """Load base + adapters, fuse, and write the model to ``save_path`` atomically (an existing
    model folder there is replaced only with ``force``)."""
    from mlx_lm.utils import dequantize_model

    from .loading import load, resolve_path

    source = resolve_path(model_path)
    target = Path(save_path).expanduser()
    remove_stale_temporaries(target)
    check_save_path(target, source, force)
    existed = target.exists()
    model, tokenizer = load(source, adapter_path=adapter_path, for_cpu=False)  # saved as stored
    fuse_layers(model, dequantize)
    if dequantize:
        model = dequantize_model(model)
    config = fused_config(source, dequantize)
    try:
        atomic_folder(target, lambda folder: write_model(folder, model, tokenizer, config, source),
                      replace=existed)
    except (OSError, RuntimeError) as e:  # under a file, read-only, /proc, full disk (MLX: RuntimeError)
        raise RefusionError(f"cannot write --save-path {target}: {one_line(e)}") from None
    return target


def run(args) -> int:
    print(f"Fused model saved to {fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.force)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
