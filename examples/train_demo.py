"""Reproduce the shipped demo model from nothing: data, tokenizer, blank model, training, fp16 export.

    python examples/train_demo.py --out models/demo                 # every step, defaults below
    python examples/train_demo.py --out models/demo --ship          # and replace the packaged model

Steps (each one the project's own public code, nothing else):
  1. ``refusion_mlx.demo.tasks``      seeded train/valid/test splits of the 7 task families
  2. ``examples/demo/build_tokenizer.py``  byte-level BPE on train.jsonl + a blank Qwen3 (float32)
  3. ``refusion_mlx.lora``            ``--fine-tune-type full``: every weight, hybrid AR + MDM loss
  4. ``refusion_mlx.fuse`` + ``refusion_mlx.convert``  the trained weights as a float16 folder
Runs on any MLX device: one H100 through MLX's CUDA backend took about 28 minutes (~733M
tokens; refusion_mlx/demo/model/training.json says how), a 2-core CPU would take days.
``--resume`` continues exactly (weights, optimizer moments, data order) after an interruption.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "examples" / "demo"))  # the build-time helpers beside this script

from refusion_mlx import convert, fuse, lora  # noqa: E402
import build_tokenizer as tokenizer  # noqa: E402
from card import write_card  # noqa: E402
from refusion_mlx.demo import tasks  # noqa: E402
from refusion_mlx.loading import DEMO_MODEL_PATH  # noqa: E402

SPLIT_SIZES = {"valid": 500, "test": 500}  # the test split is generated first, so never trained on
# The decoding defaults that travel with the model (generation_config.json): row 2 of the demo's
# benchmark (README), 95% at 2.28x left-to-right on CPU; and the one prompt format it was trained on.
GENERATION_CONFIG = {"gen_length": 256, "slot_size": 8, "serial_num_blocks": 4, "slot_threshold": 0.9,
                     "token_threshold": 0.5, "prompt_formats": ["chat template, thinking on, no system prompt"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/demo", help="work folder: data/, init/, adapters/, model/")
    p.add_argument("--size", default="small", choices=sorted(tokenizer.SIZES))
    p.add_argument("--train-examples", type=int, default=80000,
                   help="training split size (more unique examples, less memorising)")
    p.add_argument("--iters", type=int, default=26000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ar-fraction", type=float, default=0.25,
                   help="share of plain left-to-right examples (the AR skill Qwen3 brings upstream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-eval", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUT/adapters if it is there")
    p.add_argument("--ship", action="store_true", help=f"copy the result into {DEMO_MODEL_PATH}")
    return p.parse_args(argv)


def prepare(out: Path, args):
    """Steps 1-2: the splits and the blank checkpoint (skipped when already there)."""
    data, init = out / "data", out / "init"
    if not (data / "train.jsonl").exists():
        tasks.write_splits(data, args.seed, split_sizes(args))
    if not (init / "model.safetensors").exists():
        tokenizer.train_tokenizer(tokenizer.corpus(data), init)
        tokenizer.init_checkpoint(init, init, args.size, args.seed)
    return data, init


def split_sizes(args) -> dict:
    """Example counts of the train/valid/test splits."""
    return dict(SPLIT_SIZES, train=args.train_examples)


def schedule_file(out: Path, args) -> Path:
    """mlx-lm's lr_schedule: linear warm-up, then cosine decay to 1% of the peak."""
    path = out / "schedule.yaml"
    peak = args.learning_rate
    path.write_text(
        "lr_schedule:\n  name: cosine_decay\n"
        f"  warmup: {args.warmup}\n  warmup_init: {peak / 100}\n"
        f"  arguments: [{peak}, {args.iters - args.warmup}, {peak / 100}]\n")
    return path


def train(out: Path, data: Path, init: Path, args):
    """Step 3: the project's trainer, full fine-tuning of every weight from the blank model."""
    adapters = out / "adapters"
    argv = ["--model", str(init), "--train", "--test", "--data", str(data), "--fine-tune-type", "full",
            "--optimizer", "adamw", "--batch-size", str(args.batch_size), "--iters", str(args.iters),
            "--learning-rate", str(args.learning_rate), "--steps-per-report", "100",
            "--steps-per-eval", str(args.steps_per_eval), "--val-batches", "-1", "--test-batches", "-1",
            "--save-every", "500", "--max-seq-length", "320", "--seed", str(args.seed),
            "--ar-fraction", str(args.ar_fraction),
            "--adapter-path", str(adapters), "-c", str(schedule_file(out, args))]
    if args.resume and (adapters / "adapters.safetensors").exists():
        argv += ["--resume-adapter-file", str(adapters / "adapters.safetensors")]
    if lora.main(argv) != 0:
        raise SystemExit("training failed")
    return adapters


def export(out: Path, init: Path, adapters: Path, args, seconds: float) -> Path:
    """Step 4: fuse, cast to float16, add the data card."""
    fused = fuse.fuse(str(init), str(adapters), str(out / "fused"))
    model = convert.convert(str(fused), str(out / "model"), dtype="float16", force=True)
    shutil.rmtree(fused)
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "ship")}
    # A resumed run only knows its own time: say so rather than under-report the whole.
    recipe.update(sizes=split_sizes(args), train_seconds_this_run=round(seconds), resumed=args.resume)
    (model / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    config = json.loads((model / "config.json").read_text())
    generation = {"eos_token_id": config["eos_token_id"], **GENERATION_CONFIG}
    (model / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_card(model)
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, init = prepare(out, args)
    tic = time.perf_counter()
    adapters = train(out, data, init, args)
    model = export(out, init, adapters, args, time.perf_counter() - tic)
    print(f"demo model written to {model}")
    if args.ship:
        ship(model)
    return 0


def ship(model: Path):
    """Replace the packaged demo model with ``model``."""
    shutil.rmtree(DEMO_MODEL_PATH, ignore_errors=True)
    shutil.copytree(model, DEMO_MODEL_PATH)
    print(f"shipped to {DEMO_MODEL_PATH}")


if __name__ == "__main__":
    sys.exit(main())
