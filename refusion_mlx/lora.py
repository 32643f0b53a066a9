"""Fine-tune ReFusion (LoRA, DoRA, QLoRA or full) with its hybrid AR + masked-diffusion objective.

    python -m refusion_mlx.lora --model PATH --train --data DIR --iters 600

Flags follow ``mlx_lm.lora``; LoRA/DoRA layers, optimizers, schedules and the
adapter layout (``adapter_config.json`` + ``adapters.safetensors``) are mlx-lm's,
so ``refusion_mlx.load(..., adapter_path=...)`` and ``mlx_lm`` both read what is
saved here. What is ours lives in ``tuner/``: the loss (``objective.py``), the data
(``datasets.py``) and a small training loop that saves atomically and resumes where it
stopped (``trainer.py``); this module only reads the options and calls them.
"""

import argparse
import shutil
import sys
import types
from pathlib import Path
from typing import Optional, Sequence

from .cli import ArgumentParser, prog, run_command
from .errors import RefusionError
from .tuner.utils import LORA_DEFAULTS, OPTIMIZERS
from .validation import check_bool, check_float, check_int, check_path, check_seed, one_line
CONFIG_DEFAULTS = {
    "model": None, "train": False, "test": False, "data": None, "fine_tune_type": "lora",
    "optimizer": "adam", "optimizer_config": {}, "lr_schedule": None, "seed": 0, "num_layers": -1,
    "batch_size": 4, "iters": 1000, "val_batches": 25, "test_batches": 500, "learning_rate": 1e-5,
    "steps_per_report": 10, "steps_per_eval": 200, "save_every": 100, "resume_adapter_file": None,
    "adapter_path": "adapters", "max_seq_length": 2048, "grad_checkpoint": False,
    "grad_accumulation_steps": 1, "ar_fraction": 0.0, "lora_parameters": {}, "config": None,
    "lora_rank": None, "lora_alpha": None, "lora_dropout": None, "lora_keys": None,
}


def build_parser() -> argparse.ArgumentParser:
    """mlx-lm's flags, plus --lora-rank/--lora-alpha/--lora-dropout/--lora-keys."""
    p = ArgumentParser(prog=prog("lora"),
                description="Fine-tune ReFusion with its hybrid AR + masked-diffusion objective.")
    p.add_argument("--model", help="local model folder or Hugging Face repo id")
    p.add_argument("--train", action="store_true", default=None, help="train")
    p.add_argument("--test", action="store_true", default=None, help="report the loss on test.jsonl")
    p.add_argument("--data", help="folder with train.jsonl, valid.jsonl and optionally test.jsonl")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], help="default: lora")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="default: adam")
    p.add_argument("--num-layers", type=int, help="blocks to fine-tune, counted from the top (-1: all)")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--iters", type=int, help="total training steps (a resumed run counts on)")
    p.add_argument("--val-batches", type=int, help="validation batches per evaluation (-1: all)")
    p.add_argument("--test-batches", type=int, help="test batches (-1: all)")
    p.add_argument("--learning-rate", type=float, help="learning rate")
    p.add_argument("--steps-per-report", type=int, help="steps between training reports")
    p.add_argument("--steps-per-eval", type=int, help="steps between validations")
    p.add_argument("--grad-accumulation-steps", type=int, help="steps per optimizer update")
    p.add_argument("--resume-adapter-file", help="adapters.safetensors to resume from (continues its step)")
    p.add_argument("--adapter-path", help="where adapters are saved (and read by --test without --train)")
    p.add_argument("--save-every", type=int, help="steps between saves")
    p.add_argument("--max-seq-length", type=int, help="prompt + response token limit (responses are cut)")
    p.add_argument("-c", "--config", help="YAML file with any of these options (flags win)")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute activations")
    p.add_argument("--seed", type=int, help="seed for data order, slot layouts and LoRA init")
    p.add_argument("--ar-fraction", type=float,
                   help="share of examples laid out plainly left to right (default 0: upstream's "
                        "objective; a model trained from scratch needs some)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 8, as upstream)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 16)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.01)")
    p.add_argument("--lora-keys", help="comma-separated layers to adapt (default: q/k/v/o_proj)")
    return p


def read_yaml(path: str) -> dict:
    """Options from a YAML file, with mlx-lm's loader (so 1e-5 reads as a float)."""
    import yaml
    from mlx_lm.lora import yaml_loader

    try:
        with open(path) as f:
            config = yaml.load(f, yaml_loader) or {}
    except OSError as e:
        raise RefusionError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RefusionError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise RefusionError(f"{path} must hold a mapping of options")
    unknown = sorted(set(config) - set(CONFIG_DEFAULTS))
    if unknown:
        raise RefusionError(f"unknown option in {path}: {unknown[0]!r}")
    return config


def resolve_args(argv: Optional[Sequence[str]] = None) -> types.SimpleNamespace:
    """Options: flags, then the YAML config, then defaults; checked."""
    args = vars(build_parser().parse_args(argv))
    config = read_yaml(args["config"]) if args["config"] else {}
    for k, v in {**CONFIG_DEFAULTS, **config}.items():
        if args.get(k) is None:
            args[k] = v
    args = types.SimpleNamespace(**args)
    args.lora_parameters = lora_parameters(args)
    check_args(args)
    return args


def lora_parameters(args) -> dict:
    """rank / alpha / scale / dropout / keys from flags, then YAML, then upstream's defaults."""
    given = args.lora_parameters or {}
    if not isinstance(given, dict):
        raise RefusionError(f"lora_parameters must be a mapping (rank, alpha, dropout, keys), got {given!r}")
    params = {**LORA_DEFAULTS, **given}
    flags = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
             "keys": args.lora_keys.split(",") if args.lora_keys else None}
    params.update({k: v for k, v in flags.items() if v is not None})
    check_int("LoRA rank", params["rank"], 1)
    if "scale" in given and "alpha" not in given and args.lora_alpha is None:
        params["alpha"] = check_float("LoRA scale", given["scale"]) * params["rank"]
    check_float("LoRA alpha", params["alpha"])
    if check_float("LoRA dropout", params["dropout"], 0.0, 1.0) == 1.0:
        raise RefusionError("LoRA dropout must be below 1, got 1.0")
    keys = params["keys"]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise RefusionError(f"LoRA keys must be a list of layer names, got {keys!r}")
    # mlx-lm's LoRA layers take scale (PEFT's alpha / r)
    params["scale"] = float(params["alpha"]) / params["rank"]
    return params


def check_args(args):
    """Reject what cannot work before anything is loaded."""
    if not args.model:
        raise RefusionError("--model is required")
    if not (args.train or args.test):
        raise RefusionError("nothing to do: pass --train and/or --test")
    if not args.data:
        raise RefusionError("--data is required")
    for name in ["batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every",
                 "grad_accumulation_steps"]:
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ["val_batches", "test_batches", "num_layers"]:
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), -1)
    check_int("--max-seq-length", args.max_seq_length, 2)
    check_seed("--seed", args.seed)
    check_float("--learning-rate", args.learning_rate, positive=True)
    check_float("--ar-fraction", args.ar_fraction, 0.0, 1.0)
    for name in ["model", "data", "adapter_path"]:
        check_path(f"--{name.replace('_', '-')}", getattr(args, name))
    check_path("--resume-adapter-file", args.resume_adapter_file, optional=True)
    for name in ["train", "test", "grad_checkpoint"]:
        check_bool(name, getattr(args, name))
    for name in ["optimizer_config", "lr_schedule"]:
        value = getattr(args, name)
        if value is not None and not isinstance(value, dict):
            raise RefusionError(f"{name} must be a mapping, got {value!r}")
    if args.fine_tune_type not in ("lora", "dora", "full"):
        raise RefusionError(f"unknown fine_tune_type {args.fine_tune_type!r}")
    if str(args.optimizer).lower() not in OPTIMIZERS:
        raise RefusionError(f"unknown optimizer {args.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")


def adapter_config(args) -> dict:
    """adapter_config.json in mlx-lm's layout (what ``load_adapters`` reads) plus our run's options."""
    keep = ["model", "data", "fine_tune_type", "num_layers", "lora_parameters", "optimizer", "seed",
            "batch_size", "iters", "learning_rate", "lr_schedule", "max_seq_length", "ar_fraction",
            "grad_accumulation_steps"]
    config = {k: getattr(args, k) for k in keep}
    config["objective"] = "refusion-hybrid-ar-mdm"
    return config


def training_args(args):
    """The trainer's dataclass from the command line's options."""
    from .tuner.trainer import TrainingArgs

    return TrainingArgs(batch_size=args.batch_size, iters=args.iters, val_batches=args.val_batches,
                        steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
                        steps_per_save=args.save_every, adapter_path=args.adapter_path,
                        grad_accumulation_steps=args.grad_accumulation_steps, seed=args.seed,
                        ar_fraction=args.ar_fraction)


def train_model(args, model, train_set, valid_set, mask_id: int, pad_id: int, callback=None):
    """Set up layers, optimizer, resume and the adapter folder; train; return the losses."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import print_trainable_parameters

    from .tuner.trainer import ADAPTER_FILE, PrintReports, resume, train
    from .tuner.utils import build_optimizer, checkpoint_blocks, prepare_model
    from .utils import atomic_write_json

    mx.random.seed(args.seed)
    lora = dict(args.lora_parameters) if args.lora_parameters else None
    if args.grad_checkpoint and lora and lora["dropout"] > 0:
        # The recomputed forward pass would draw new dropout masks: gradients of another network
        print("[WARNING] --grad-checkpoint sets LoRA dropout to 0 (recomputing would redraw its masks)")
        lora["dropout"] = 0.0
    args.lora_parameters = prepare_model(model, args.fine_tune_type, args.num_layers, lora)
    optimizer = build_optimizer(args.optimizer, args.learning_rate, args.lr_schedule, args.optimizer_config)
    start, trained = resume(model, optimizer, args.resume_adapter_file) if args.resume_adapter_file else (0, 0)
    if start >= args.iters:
        print(f"Already at step {start} of --iters {args.iters}: nothing to train")
    print_trainable_parameters(model)
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    adapter_dir = Path(args.adapter_path)
    created = not adapter_dir.exists()
    try:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(adapter_dir / "adapter_config.json", adapter_config(args))
    except OSError as e:  # under a file, read-only, /proc, full disk
        raise RefusionError(f"cannot write --adapter-path {adapter_dir}: {one_line(e)}") from None
    try:
        return train(model, optimizer, train_set, valid_set, training_args(args), mask_id, pad_id, start, trained,
                     callback or PrintReports())
    except BaseException:
        # A run that saved nothing leaves nothing: no folder holding only a config.
        if created and not (adapter_dir / ADAPTER_FILE).exists():
            shutil.rmtree(adapter_dir, ignore_errors=True)
        raise


def evaluate_model(args, model, test_set, mask_id: int, pad_id: int) -> float:
    """Held-out loss on test.jsonl (seeded layouts)."""
    from .tuner.trainer import evaluate

    loss, ar, mdm = evaluate(model, test_set, args.batch_size, args.test_batches, mask_id, pad_id,
                             args.seed, args.ar_fraction)
    print(f"Test loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f})")
    return loss


def run(args) -> int:
    """Load model and data; train and/or test."""
    from .blas import warn_if_slow_blas
    from .loading import load
    from .tuner.datasets import check_vocabulary, load_datasets

    print("Loading pretrained model", flush=True)
    adapters = args.adapter_path if args.test and not args.train and args.adapter_path else None
    model, tokenizer = load(args.model, adapter_path=adapters)
    mask_id = model.args.mask_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print("Loading datasets", flush=True)
    train_set, valid_set, test_set = load_datasets(args.data, tokenizer, args.max_seq_length,
                                                   bool(args.train), bool(args.test))
    check_vocabulary(model.args.vocab_size, {"train.jsonl": train_set, "valid.jsonl": valid_set,
                                             "test.jsonl": test_set}, {"mask": mask_id, "pad": pad_id})
    warn_if_slow_blas()  # only once the input has proved good: bad input stays one line
    if args.train:
        train_model(args, model, train_set, valid_set, mask_id, pad_id)
    if args.test:
        evaluate_model(args, model, test_set, mask_id, pad_id)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = resolve_args(argv)
    except RefusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_command(run, args, "interrupted (resume with --resume-adapter-file ADAPTER_PATH/adapters.safetensors)")


if __name__ == "__main__":
    sys.exit(main())
