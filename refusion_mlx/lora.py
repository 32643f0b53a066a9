"""Fine-tune ReFusion (LoRA, DoRA, QLoRA or full) with its hybrid AR + masked-diffusion objective.

    python -m refusion_mlx.lora --model PATH --train --data DIR --iters 600

Flags follow ``mlx_lm.lora``; LoRA/DoRA layers, optimizers, schedules and the
adapter layout (``adapter_config.json`` + ``adapters.safetensors``) are mlx-lm's,
so ``refusion_mlx.load(..., adapter_path=...)`` and ``mlx_lm`` both read what is
saved here. What is ours: the loss (``objective.py``), the batches it needs and
a small training loop that saves atomically and resumes where it stopped.
"""

import argparse
import json
import os
import random
import re
import sys
import time
import types
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .errors import RefusionError
from .objective import collate, hybrid_loss, layout_example

# Upstream train.py: PEFT LoRA r=8, alpha=16, dropout 0.01 on q/k/v/o, every layer.
LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.01,
                 "keys": ["q_proj", "k_proj", "v_proj", "o_proj"]}
CONFIG_DEFAULTS = {
    "model": None, "train": False, "test": False, "data": None, "fine_tune_type": "lora",
    "optimizer": "adam", "optimizer_config": {}, "lr_schedule": None, "seed": 0, "num_layers": -1,
    "batch_size": 4, "iters": 1000, "val_batches": 25, "test_batches": 500, "learning_rate": 1e-5,
    "steps_per_report": 10, "steps_per_eval": 200, "save_every": 100, "resume_adapter_file": None,
    "adapter_path": "adapters", "max_seq_length": 2048, "grad_checkpoint": False,
    "grad_accumulation_steps": 1, "lora_parameters": {}, "config": None,
    "lora_rank": None, "lora_alpha": None, "lora_dropout": None, "lora_keys": None,
}
OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}
ADAPTER_FILE = "adapters.safetensors"
STATE_FILE = "training_state.safetensors"  # optimizer moments, so a resume continues exactly


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ``error:`` line, like every other error here."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """mlx-lm's flags, plus --lora-rank/--lora-alpha/--lora-dropout/--lora-keys."""
    p = _Parser(prog="python -m refusion_mlx.lora",
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
    given = dict(args.lora_parameters or {})
    params = {**LORA_DEFAULTS, **given}
    flags = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
             "keys": args.lora_keys.split(",") if args.lora_keys else None}
    params.update({k: v for k, v in flags.items() if v is not None})
    if "scale" in given and "alpha" not in given and args.lora_alpha is None:
        params["alpha"] = given["scale"] * given.get("rank", LORA_DEFAULTS["rank"])
    if not isinstance(params["rank"], int) or params["rank"] < 1:
        raise RefusionError(f"LoRA rank must be a positive integer, got {params['rank']!r}")
    if not 0 <= params["dropout"] < 1:
        raise RefusionError(f"LoRA dropout must be in [0, 1), got {params['dropout']}")
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
    positive = ["batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every",
                "grad_accumulation_steps"]
    for name in positive:
        if not isinstance(getattr(args, name), int) or getattr(args, name) < 1:
            raise RefusionError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.max_seq_length < 2:
        raise RefusionError("--max-seq-length must be at least 2")
    if not args.learning_rate > 0:
        raise RefusionError("--learning-rate must be positive")
    if args.fine_tune_type not in ("lora", "dora", "full"):
        raise RefusionError(f"unknown fine_tune_type {args.fine_tune_type!r}")
    if str(args.optimizer).lower() not in OPTIMIZERS:
        raise RefusionError(f"unknown optimizer {args.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")


def resolve_keys(model, keys: Sequence[str]) -> list:
    """Turn short names (``q_proj``) into paths inside a block (``self_attn.q_proj``), as mlx-lm wants."""
    linear = (nn.Linear, nn.QuantizedLinear)
    names = [n for n, m in model.layers[0].named_modules() if isinstance(m, linear)]
    resolved = []
    for key in keys:
        matches = [n for n in names if n == key or n.endswith("." + key)]
        if not matches:
            have = ", ".join(sorted(names))
            raise RefusionError(f"LoRA key {key!r} matches no linear layer (have: {have})")
        resolved += [n for n in matches if n not in resolved]
    return resolved


def prepare_model(model, args):
    """Freeze the base, then add LoRA/DoRA layers or unfreeze blocks for full fine-tuning."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if args.num_layers == 0 or args.num_layers < -1 or args.num_layers > n:
        raise RefusionError(f"--num-layers must be -1 (all) or 1..{n}, got {args.num_layers}")
    model.freeze()
    if args.fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise RefusionError("full fine-tuning needs an unquantized model (use lora or dora for QLoRA)")
        for layer in model.layers[-max(args.num_layers, 0):]:
            layer.unfreeze()
        args.lora_parameters = None  # as mlx-lm: a full run's adapter_config has no LoRA block
        return
    args.lora_parameters["keys"] = resolve_keys(model, args.lora_parameters["keys"])
    try:
        linear_to_lora_layers(model, args.num_layers, args.lora_parameters,
                              use_dora=args.fine_tune_type == "dora")
    except (ValueError, KeyError) as e:
        raise RefusionError(f"cannot add {args.fine_tune_type} layers: {e}") from None


@lru_cache(maxsize=None)
def _checkpointed(cls):
    """A subclass of block class ``cls`` whose forward pass is recomputed during backprop."""

    def __call__(self, x, positions, mask=None, cache=None, view=None):
        def inner(params, x, positions):
            self.update(params)
            return cls.__call__(self, x, positions, mask, cache, view)

        return mx.checkpoint(inner)(self.trainable_parameters(), x, positions)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


def checkpoint_blocks(model):
    """Gradient checkpointing on this model's blocks only (mlx-lm's patches the class for everyone)."""
    for layer in model.layers:
        layer.__class__ = _checkpointed(type(layer))


def atomic_save(path: Path, arrays: dict, step: int):
    """Write safetensors next to ``path`` then rename: a crash never leaves a torn file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata={"step": str(step)})
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: dict):
    """JSON written to a temp file and renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=4))
    os.replace(tmp, path)


def adapter_config(args) -> dict:
    """adapter_config.json in mlx-lm's layout (what ``load_adapters`` reads) plus our run's options."""
    keep = ["model", "data", "fine_tune_type", "num_layers", "lora_parameters", "optimizer", "seed",
            "batch_size", "iters", "learning_rate", "lr_schedule", "max_seq_length",
            "grad_accumulation_steps"]
    config = {k: getattr(args, k) for k in keep}
    config["objective"] = "refusion-hybrid-ar-mdm"
    return config


def save_adapters(adapter_dir: Path, model, optimizer, step: int, numbered: bool):
    """adapters.safetensors (+ a numbered copy) and the training state, each written atomically."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_save(adapter_dir / ADAPTER_FILE, weights, step)
    if numbered:
        atomic_save(adapter_dir / f"{step:07d}_{ADAPTER_FILE}", weights, step)
    atomic_save(adapter_dir / STATE_FILE, dict(tree_flatten(optimizer.state)), step)


def saved_step(path: Path, metadata: dict) -> int:
    """The step an adapter file was saved at: its metadata, else a ``0000100_`` name prefix."""
    if "step" in metadata:
        return int(metadata["step"])
    found = re.match(r"(\d+)_", path.name)
    if found:
        return int(found.group(1))
    print(f"[WARNING] {path.name} does not record its step; counting from 0")
    return 0


def resume(model, optimizer, path: str) -> int:
    """Load adapter weights (and the training state saved with them); return their step."""
    path = Path(path)
    if not path.is_file():
        raise RefusionError(f"--resume-adapter-file not found: {path}")
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise RefusionError(f"cannot read {path}: {e}") from None
    trainable = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name not in trainable or trainable[name].shape != w.shape:
            raise RefusionError(f"{path.name} does not fit this run ({name}); same --fine-tune-type, "
                                "--num-layers and LoRA rank/keys as the run that saved it?")
    model.load_weights(list(weights.items()), strict=False)
    step = saved_step(path, metadata)
    restore_state(optimizer, path.parent / STATE_FILE, step)
    print(f"Resuming from {path} at step {step}")
    return step


def restore_state(optimizer, state_file: Path, step: int):
    """Optimizer moments when saved at the same step; otherwise only the step count."""
    state, metadata = mx.load(str(state_file), return_metadata=True) if state_file.exists() else ({}, {})
    if metadata.get("step") != str(step):
        if state_file.exists():
            print(f"[WARNING] {state_file.name} is from another step; optimizer moments start afresh")
        optimizer.state["step"] = mx.array(step, mx.uint64)  # schedules continue where they were
        return
    restored = tree_unflatten(list(state.items()))
    # Hyper-parameters (learning_rate, ...) come from this run's flags, not the saved run's
    restored.update({k: v for k, v in optimizer.state.items() if k != "step" and isinstance(v, mx.array)})
    optimizer.state = restored


def build_optimizer(args):
    """The optimizer with a constant rate or the YAML ``lr_schedule`` (mlx-lm's build_schedule)."""
    from mlx_lm.tuner.utils import build_schedule

    name = args.optimizer.lower()
    try:
        lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
        return OPTIMIZERS[name](learning_rate=lr, **(args.optimizer_config or {}).get(name, {}))
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise RefusionError(f"bad optimizer or lr_schedule settings: {e}") from None


def length_batches(examples, batch_size: int) -> list:
    """Index batches of similar lengths (less padding); the last one may be smaller."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_for_step(batches: list, step: int, seed: int) -> list:
    """Step ``step``'s batch: each epoch visits every batch once, in a seeded order.

    A function of (seed, step) only, so a resumed run sees exactly the data the
    uninterrupted run would have.
    """
    epoch, k = divmod(step - 1, len(batches))
    order = list(range(len(batches)))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return batches[order[k]]


def make_batch(examples, indices, mask_id: int, pad_id: int, rng: random.Random, ts=None):
    """Lay out and collate the examples at ``indices`` (at given t's, if any); count their tokens."""
    ts = ts or [None] * len(indices)
    layouts = [layout_example(examples[i].prompt, examples[i].response, mask_id, rng, t=t)
               for i, t in zip(indices, ts)]
    return collate(layouts, pad_id), sum(len(x.inputs) for x in layouts)


def evaluate(model, examples, batch_size: int, num_batches: int, mask_id: int, pad_id: int, seed: int):
    """Mean (loss, AR, MDM) over held-out batches.

    Layouts are seeded, so evaluations compare; t is spread evenly over the
    examples ((k + 0.5) / n) rather than drawn, which estimates the same
    expected loss with far less noise on a small held-out set.
    """
    model.eval()
    batches = length_batches(examples, batch_size)
    if num_batches != -1:
        batches = batches[:num_batches]
    n = sum(len(b) for b in batches)
    if n == 0:
        raise RefusionError("no held-out batches to evaluate (--val-batches/--test-batches 0?)")
    totals, seen = mx.zeros(3), 0
    for k, indices in enumerate(batches):
        ts = [(seen + j + 0.5) / n for j in range(len(indices))]
        seen += len(indices)
        batch, _ = make_batch(examples, indices, mask_id, pad_id, random.Random(f"{seed}:eval:{k}"), ts)
        loss, ar, mdm, _ = hybrid_loss(model, batch)
        totals = totals + mx.stack([loss, ar, mdm])
        mx.eval(totals)
    return (totals / len(batches)).tolist()


def make_step(model, optimizer, accumulate: int):
    """One compiled training step: loss, gradients, and (every ``accumulate`` steps) an update."""
    loss_and_grad = nn.value_and_grad(model, hybrid_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (loss, ar, mdm, ntokens), grad = loss_and_grad(model, batch)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if accumulate > 1:
                grad = tree_map(lambda g: g / accumulate, grad)
            optimizer.update(model, grad)
            grad = None
        return mx.stack([loss, ar, mdm]), ntokens, grad

    return step, state


def report_train(it: int, args, sums, steps: int, tokens: int, seconds: float, optimizer, trained: int):
    """One line per report: losses, rate, throughput, memory."""
    loss, ar, mdm = (sums / steps).tolist()
    lr = optimizer.learning_rate.item()
    print(f"Iter {it}/{args.iters}: train loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f}), lr {lr:.3e}, "
          f"it/s {steps / seconds:.3f}, tokens/s {tokens / seconds:.1f}, trained tokens {trained}, "
          f"peak mem {mx.get_peak_memory() / 1e9:.3f} GB", flush=True)


def validate(model, it: int, args, valid_set, mask_id: int, pad_id: int):
    """Validation loss line; back to training mode afterwards."""
    tic = time.perf_counter()
    loss, ar, mdm = evaluate(model, valid_set, args.batch_size, args.val_batches, mask_id, pad_id,
                             args.seed)
    model.train()
    print(f"Iter {it}/{args.iters}: val loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f}), "
          f"took {time.perf_counter() - tic:.2f}s", flush=True)


def train(model, optimizer, train_set, valid_set, args, mask_id: int, pad_id: int, start: int = 0):
    """Steps ``start + 1 .. args.iters``: report, validate, save (atomically) as asked."""
    adapter_dir = Path(args.adapter_path)
    step, state = make_step(model, optimizer, args.grad_accumulation_steps)
    batches = length_batches(train_set, args.batch_size)
    model.train()
    sums, steps, tokens, seconds, trained, grad = mx.zeros(3), 0, 0, 0.0, 0, None
    for it in range(start + 1, args.iters + 1):
        due = it == start + 1 or it % args.steps_per_eval == 0 or it == args.iters
        if valid_set and args.val_batches != 0 and due:
            validate(model, it, args, valid_set, mask_id, pad_id)
        tic = time.perf_counter()
        mx.random.seed(args.seed * 1_000_003 + it)  # dropout masks depend on (seed, step) only: resumable
        indices = batch_for_step(batches, it, args.seed)
        rng = random.Random(f"{args.seed}:step:{it}")
        batch, ntok = make_batch(train_set, indices, mask_id, pad_id, rng)
        losses, _, grad = step(batch, grad, it % args.grad_accumulation_steps == 0)
        sums = sums + losses
        mx.eval(state, sums, grad)
        seconds += time.perf_counter() - tic
        steps, tokens, trained = steps + 1, tokens + ntok, trained + ntok
        if it % args.steps_per_report == 0 or it == args.iters:
            report_train(it, args, sums, steps, tokens, seconds, optimizer, trained)
            sums, steps, tokens, seconds = mx.zeros(3), 0, 0, 0.0
        if it % args.save_every == 0 and it != args.iters:
            save_adapters(adapter_dir, model, optimizer, it, numbered=True)
            print(f"Iter {it}/{args.iters}: saved adapters to {adapter_dir / ADAPTER_FILE}", flush=True)
    save_adapters(adapter_dir, model, optimizer, max(args.iters, start), numbered=False)
    print(f"Saved final adapters to {adapter_dir / ADAPTER_FILE}", flush=True)


def run_training(model, args, train_set, valid_set, mask_id: int, pad_id: int):
    """Set up layers, optimizer, resume and the adapter folder; then train."""
    from mlx_lm.tuner.utils import print_trainable_parameters

    mx.random.seed(args.seed)
    if args.grad_checkpoint and args.lora_parameters and args.lora_parameters["dropout"] > 0:
        # The recomputed forward pass would draw new dropout masks: gradients of another network
        print("[WARNING] --grad-checkpoint sets LoRA dropout to 0 (recomputing would redraw its masks)")
        args.lora_parameters["dropout"] = 0.0
    prepare_model(model, args)
    optimizer = build_optimizer(args)
    start = resume(model, optimizer, args.resume_adapter_file) if args.resume_adapter_file else 0
    if start >= args.iters:
        print(f"Already at step {start} of --iters {args.iters}: nothing to train")
    print_trainable_parameters(model)
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    adapter_dir = Path(args.adapter_path)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(adapter_dir / "adapter_config.json", adapter_config(args))
    train(model, optimizer, train_set, valid_set, args, mask_id, pad_id, start)


def run_test(model, args, test_set, mask_id: int, pad_id: int):
    """Held-out loss on test.jsonl (seeded layouts)."""
    loss, ar, mdm = evaluate(model, test_set, args.batch_size, args.test_batches, mask_id, pad_id,
                             args.seed)
    print(f"Test loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f})")
    return loss


def run(args):
    """Load model and data; train and/or test."""
    from .blas import warn_if_slow_blas
    from .data import load_datasets
    from .loading import load

    warn_if_slow_blas()
    print("Loading pretrained model", flush=True)
    adapters = args.adapter_path if args.test and not args.train and args.adapter_path else None
    model, tokenizer = load(args.model, adapter_path=adapters)
    mask_id = model.args.mask_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print("Loading datasets", flush=True)
    train_set, valid_set, test_set = load_datasets(args.data, tokenizer, args.max_seq_length,
                                                   bool(args.train), bool(args.test))
    if args.train:
        run_training(model, args, train_set, valid_set, mask_id, pad_id)
    if args.test:
        run_test(model, args, test_set, mask_id, pad_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(resolve_args(argv))
    except RefusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (resume with --resume-adapter-file ADAPTER_PATH/adapters.safetensors)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
