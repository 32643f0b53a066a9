"""Teach the shipped demo model to converse: fine-tune it (every weight) on single-turn tasks mixed
with multi-turn conversations, with room for an 8-turn chat, then export it as the demo folder.

    python examples/train_demo_chat.py --out models/demo_chat --data-only   # data (and its .tar.xz)
    python examples/train_demo_chat.py --out models/demo_chat               # init, train, export
    python examples/train_demo_chat.py --out models/demo_chat --ship        # and replace the packaged model

Steps (the project's own public code):
  1. data: ``refusion_mlx.demo.tasks`` single-turn splits (the same 80000 train examples as
     ``examples/train_demo.py``) plus ``refusion_mlx.demo.conversations`` (1-8 turns, the loss on the
     last assistant turn, half with a system prompt); valid is both kinds' valid splits.
  2. init: the shipped demo (or ``--from``), cast to float32, ``max_position_embeddings`` raised to
     ``--max-position`` (RoPE has no learned positions: the config is the only change).
  3. ``refusion_mlx.lora --fine-tune-type full`` from there (``--resume`` continues exactly).
  4. fuse + float16 export and data card, as ``examples/train_demo.py`` does.
``--train-seconds`` stops training after that long and exports the last saved step (a device
budget); the card records how many iterations that was.
"""

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "demo"))

import train_demo  # noqa: E402
from refusion_mlx import convert  # noqa: E402
from refusion_mlx.demo import conversations, tasks  # noqa: E402
from refusion_mlx.loading import DEMO_MODEL_PATH  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/demo_chat", help="work folder: data/, init/, adapters/, model/")
    p.add_argument("--from", dest="source", default=str(DEMO_MODEL_PATH), help="model to start from")
    p.add_argument("--max-position", type=int, default=2048, help="max_position_embeddings of the result")
    p.add_argument("--train-examples", type=int, default=80000,
                   help="single-turn training examples (train_demo.py's 80000: the same split)")
    p.add_argument("--conversations", type=int, default=30000, help="multi-turn training conversations")
    p.add_argument("--single-turn-repeats", type=int, default=1,
                   help="times each single-turn training example is in train.jsonl (weights the mix toward "
                        "single turns; the task families have only ~80000 distinct examples)")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ar-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-eval", type=int, default=500)
    p.add_argument("--val-batches", type=int, default=-1, help="validation batches per evaluation (-1: all)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--train-seconds", type=float, help="stop training after this long; export the last save")
    p.add_argument("--data-only", action="store_true", help="write the data (and data.tar.xz) and stop")
    p.add_argument("--resume", action="store_true", help="continue from OUT/adapters if it is there")
    p.add_argument("--ship", action="store_true", help=f"copy the result into {DEMO_MODEL_PATH}")
    args = p.parse_args(argv)
    if args.single_turn_repeats < 1:
        p.error(f"--single-turn-repeats must be at least 1, got {args.single_turn_repeats}")
    return args


def write_data(data: Path, args) -> Path:
    """train/valid JSONL: single-turn records then conversations (the trainer batches by length)."""
    single = tasks.make_splits(args.seed, train_demo.split_sizes(args))
    chats = conversations.make_splits(args.seed, {"train": args.conversations, "valid": 200, "test": 200})
    single["train"] = single["train"] * args.single_turn_repeats
    data.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        lines = (json.dumps(x, ensure_ascii=False) for x in single[name] + chats[name])
        (data / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with tarfile.open(data.parent / "data.tar.xz", "w:xz") as tar:  # small enough to carry to a GPU
        tar.add(data, arcname="data")
    return data


def prepare_init(init: Path, args) -> Path:
    """The starting checkpoint: ``--from`` in float32 with the new position count."""
    if not (init / "model.safetensors").exists():
        convert.convert(args.source, str(init), dtype="float32", force=True)
        config_file = init / "config.json"
        config = json.loads(config_file.read_text())
        config["max_position_embeddings"] = args.max_position
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    return init


def train(out: Path, data: Path, init: Path, args) -> Path:
    """Full fine-tuning with the project's trainer, in a child process so a time limit can stop it."""
    adapters = out / "adapters"
    argv = [sys.executable, "-m", "refusion_mlx.lora", "--model", str(init), "--train", "--data", str(data),
            "--fine-tune-type", "full", "--optimizer", "adamw", "--batch-size", str(args.batch_size),
            "--iters", str(args.iters), "--learning-rate", str(args.learning_rate),
            "--steps-per-report", "50", "--steps-per-eval", str(args.steps_per_eval), "--val-batches", str(args.val_batches),
            "--save-every", str(args.save_every), "--max-seq-length", str(args.max_position),
            "--seed", str(args.seed), "--ar-fraction", str(args.ar_fraction),
            "--adapter-path", str(adapters), "-c", str(train_demo.schedule_file(out, args))]
    if args.resume and (adapters / "adapters.safetensors").exists():
        argv += ["--resume-adapter-file", str(adapters / "adapters.safetensors")]
    try:
        code = subprocess.run(argv, cwd=ROOT, timeout=args.train_seconds).returncode
    except subprocess.TimeoutExpired:  # the child is killed; its last save is what we export
        print(f"training stopped after {args.train_seconds:g} s (--train-seconds)", flush=True)
        code = 0
    if code != 0 or not (adapters / "adapters.safetensors").exists():
        raise SystemExit("training failed")
    return adapters


def saved_step(adapters: Path) -> int:
    """The step of the last save (its safetensors metadata)."""
    import mlx.core as mx

    _, metadata = mx.load(str(adapters / "adapters.safetensors"), return_metadata=True)
    return int(metadata.get("step", 0))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "train.jsonl").exists():
        write_data(data, args)
    if args.data_only:
        print(f"data written to {data} and {out / 'data.tar.xz'}")
        return 0
    init = prepare_init(out / "init", args)
    tic = time.perf_counter()
    adapters = train(out, data, init, args)
    seconds = time.perf_counter() - tic
    args.iters_done = saved_step(adapters)
    args.sizes_conversations = {"train": args.conversations, "valid": 200, "test": 200}
    train_demo.GENERATION_CONFIG.update(prompt_formats=PROMPT_FORMATS, system_prompts=True)
    model = train_demo.export(out, init, adapters, export_args(args), seconds)
    print(f"demo model written to {model} ({args.iters_done} iterations)")
    if args.ship:
        train_demo.ship(model)
    return 0


PROMPT_FORMATS = ["chat template, thinking on, with or without a system prompt, 1-8 turns "
                  "(refusion_mlx.demo.conversations)"]


def export_args(args) -> argparse.Namespace:
    """What training.json records: this run's recipe (``train_demo.export`` drops out/resume/ship)."""
    recipe = {k: v for k, v in vars(args).items() if k not in ("data_only", "train_seconds")}
    recipe["source"] = "the model of from_recipe, fine-tuned by examples/train_demo_chat.py"
    earlier = Path(args.source) / "training.json"  # the chain of phases stays on record
    if earlier.exists():
        recipe["from_recipe"] = json.loads(earlier.read_text())
    return argparse.Namespace(**recipe)


if __name__ == "__main__":
    sys.exit(main())
