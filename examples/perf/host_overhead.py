"""Host time per left-to-right token, on a model so small that its arithmetic is negligible.

On a GPU the demo model's forward is a few microseconds of device work, so a single stream's
speed is the host's: graph building, the decoder's Python, the scheduler. This measures that
host work on any machine, with a proxy of the demo's architecture (its 6 layers, its tokenizer)
shrunk to 32 hidden units (random weights): ms per token of

  (a) mlx-lm's ``generate_step`` loop,
  (b) our ``generate_ar_ids``,
  (c) our scheduler with one sequence (``batch_generate_ids``, what the server runs),
  (c') the same with the executor's padded path (what CUDA runs: key buckets of 256),

the fastest and the median of ``--rounds`` rounds taking turns, the same tokens checked across (a)-(c').

    python examples/perf/host_overhead.py                      # writes the proxy to a temp dir
    python examples/perf/host_overhead.py --write /tmp/proxy   # keep it (for the servers)

``--write`` leaves a checkpoint both servers load (``python -m mlx_lm.server --model /tmp/proxy``,
``examples/perf/vs_mlx_lm_server.py --model /tmp/proxy``).
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's refusion_mlx

import mlx.core as mx  # noqa: E402

from refusion_mlx import demo  # noqa: E402
from refusion_mlx.autoregressive import generate_ar_ids  # noqa: E402
from refusion_mlx.loading import load_model  # noqa: E402
from refusion_mlx.scheduler import LEFT_TO_RIGHT, Scheduler  # noqa: E402
from refusion_mlx.settings import settings_for  # noqa: E402

DEMO = Path(demo.__file__).parent / "model"
SHRUNK = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 16, "torch_dtype": "float32"}


def write_proxy(path: Path, seed: int = 0):
    """The demo's config and tokenizer with the layers shrunk (``SHRUNK``) and random float32 weights."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(DEMO / name, path / name)
    config = {**json.loads((DEMO / "config.json").read_text()), **SHRUNK}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    H, I, D, V = config["hidden_size"], config["intermediate_size"], config["head_dim"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * D, config["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                       p + "post_attention_layernorm.weight": (H,)})
    weights = {name: mx.ones(shape) if len(shape) == 1 else mx.random.normal(shape) / shape[-1] ** 0.5
               for name, shape in shapes.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def mlx_lm_tokens(model, prompt, n):
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def ar_tokens(model, prompt, n):
    return generate_ar_ids(model, prompt, max_tokens=n, eos_token_id=[]).tokens


def scheduler_tokens(model, prompt, n, padded=False):
    scheduler = Scheduler(model, 1)
    if padded:  # as on CUDA (executor.Executor: key buckets, padded rows)
        scheduler.executor.bucket, scheduler.executor.packed = 256, False
    seq = scheduler.add(prompt, settings_for(model, len(prompt), gen_length=n), decoder=LEFT_TO_RIGHT,
                        eos_token_id=[])
    while scheduler.busy:
        scheduler.step()
    return seq.result.tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="write the proxy checkpoint here (kept)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per run")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    folder = args.write or Path(tempfile.mkdtemp())
    write_proxy(folder)
    from mlx_lm import load as mlx_lm_load

    theirs, _ = mlx_lm_load(str(folder))
    ours = load_model(folder)
    prompt = list(range(3, 35))
    ways = {"(a) mlx-lm generate_step": lambda: mlx_lm_tokens(theirs, prompt, args.tokens),
            "(b) generate_ar_ids": lambda: ar_tokens(ours, prompt, args.tokens),
            "(c) scheduler, one sequence": lambda: scheduler_tokens(ours, prompt, args.tokens),
            "(c') scheduler, padded (CUDA path)": lambda: scheduler_tokens(ours, prompt, args.tokens, True)}
    times = {name: [] for name in ways}
    tokens = {}
    for name, run in ways.items():  # warm-up
        tokens[name] = run()
    for _ in range(args.rounds):
        for name, run in ways.items():
            tic = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - tic) / args.tokens * 1e3)
    # The fastest round is the one least disturbed by other work on the machine: the host work itself.
    base = {f: f(times["(a) mlx-lm generate_step"]) for f in (min, statistics.median)}
    for name in ways:
        best, median = min(times[name]), statistics.median(times[name])
        print(f"{name:36s} fastest {best:6.3f} ms/token {best / base[min]:5.2f}x mlx-lm, "
              f"median {median:6.3f} {median / base[statistics.median]:5.2f}x")
    same = all(t[: args.tokens] == tokens["(a) mlx-lm generate_step"] for t in tokens.values())
    print(f"same tokens: {same}")
    if args.write is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
