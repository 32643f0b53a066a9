"""Every entry point's answer to bad input: exit status 2, exactly one ``error:`` line on stderr,
no traceback, no stray warning, and no new file anywhere.

One table per entry point; every row is its own case. Rows run the command's ``main(argv)``
in this process (cheap); a representative subset also runs as a real ``python -m`` process,
where a warning, a prompt or a traceback printed by a library would show too.
"""

import importlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import refusion_mlx  # noqa: F401  (before mlx.core: the BLAS preload)
import mlx.core as mx
from conftest import ROOT, with_root_on_path

from checkpoints import tiny_config, write_checkpoint, write_tokenizer

ENTRY_POINTS = {
    "generate": "refusion_mlx.generate",
    "convert": "refusion_mlx.convert",
    "lora": "refusion_mlx.lora",
    "fuse": "refusion_mlx.fuse",
    "evaluate": "refusion_mlx.evaluate",
    "benchmark": "refusion_mlx.benchmark",
    "demo.tasks": "refusion_mlx.demo.tasks",
    "refusion_mlx": "refusion_mlx.__main__",
    "server": "refusion_mlx.server",
    "serve_bench": "refusion_mlx.serve_bench",
    "chat": "refusion_mlx.chat",
    "cache_prompt": "refusion_mlx.cache_prompt",
}
FAST = ["--max-tokens", "16", "--slot-size", "4", "--blocks", "2"]
ROWS_OF_DATA = [{"query": f"Add {a} and {b}.", "response": f"{a} + {b} = {a + b}."}
                for a, b in [(12, 34), (7, 8), (3, 1), (20, 22)]]
# Warnings Python shows by default (a second stderr line in a real run).
HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class Ctx:
    """What a row builds its bad input from: a scratch folder, good model, data and adapters."""

    def __init__(self, root: Path, model: Path, adapters: Path):
        self.root, self.good_model, self.good_adapters = root, model, adapters
        self.data = self.jsonl_folder("data", ROWS_OF_DATA)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def model(self, config=None, text=None, drop=(), remove=(), raw=None, **changes) -> str:
        """A copy of the good model with its config (or files) spoilt."""
        folder = self.root / "model"
        shutil.copytree(self.good_model, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config or {}, **changes)
        for key in drop:
            cfg.pop(key)
        (folder / "config.json").write_text(text if text is not None else json.dumps(cfg))
        if raw is not None:
            (folder / "config.json").write_bytes(raw)
        for name in remove:
            (folder / name).unlink()
        return str(folder)

    def write(self, name: str, content) -> str:
        file = self.root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            file.write_bytes(content)
        else:
            file.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(file)

    def jsonl_folder(self, name: str, rows, train_bytes=None) -> str:
        folder = self.root / name
        folder.mkdir()
        for split in ("train", "valid", "test"):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if train_bytes is not None:
            (folder / "train.jsonl").write_bytes(train_bytes)
        return str(folder)

    def adapters(self, config=None, weights=True, mismatch=False) -> str:
        folder = self.root / "adapters"
        shutil.copytree(self.good_adapters, folder)
        if config is not None:
            (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if not weights:
            (folder / "adapters.safetensors").unlink()
        if mismatch:  # adapters of another base: every tensor has the wrong shape
            saved = mx.load(str(folder / "adapters.safetensors"))
            mx.save_safetensors(str(folder / "adapters.safetensors"),
                                {k: mx.zeros((v.shape[0] + 3, v.shape[1])) for k, v in saved.items()})
        return str(folder)

    def empty_folder(self, name: str) -> str:
        (self.root / name).mkdir()
        return self.path(name)

    def a_file(self) -> str:
        return self.write("a_file", "not a folder")


def gen(ctx, *extra, model=None, prompt="hi"):
    return ["--model", model or str(ctx.good_model), "--prompt", prompt, *FAST, *extra]


GENERATE = {
    "config is a list": lambda c: gen(c, model=c.model(text="[]")),
    "config is null": lambda c: gen(c, model=c.model(text="null")),
    "config is a number": lambda c: gen(c, model=c.model(text="3")),
    "config is not JSON": lambda c: gen(c, model=c.model(text="{")),
    "config is not UTF-8": lambda c: gen(c, model=c.model(raw=b'{"model_type": "qwen3\xff"}')),
    "num_attention_heads 0": lambda c: gen(c, model=c.model(num_attention_heads=0)),
    "num_key_value_heads 0": lambda c: gen(c, model=c.model(num_key_value_heads=0)),
    "max_position_embeddings a string": lambda c: gen(c, model=c.model(max_position_embeddings="1024")),
    "eos_token_id a string": lambda c: gen(c, model=c.model(eos_token_id="317")),
    "mask_token_id a string": lambda c: gen(c, model=c.model(mask_token_id="319")),
    "mask_token_id outside the vocabulary": lambda c: gen(c, model=c.model(mask_token_id=5000)),
    "vocab_size a string": lambda c: gen(c, model=c.model(vocab_size="320")),
    "hidden_size a float": lambda c: gen(c, model=c.model(hidden_size=64.5)),
    "head_dim negative": lambda c: gen(c, model=c.model(head_dim=-1)),
    "rms_norm_eps missing": lambda c: gen(c, model=c.model(drop=["rms_norm_eps"])),
    "rope_scaling a string": lambda c: gen(c, model=c.model(rope_scaling="yes")),
    "linear rope_scaling without factor": lambda c: gen(c, model=c.model(rope_scaling={"type": "linear"})),
    "rope_scaling yarn": lambda c: gen(c, model=c.model(rope_scaling={"type": "yarn", "factor": 2.0})),
    "quantization a string": lambda c: gen(c, model=c.model(quantization="8")),
    "tie_word_embeddings a string": lambda c: gen(c, model=c.model(tie_word_embeddings="no")),
    "model_type llama": lambda c: gen(c, model=c.model(model_type="llama")),
    "model_type missing": lambda c: gen(c, model=c.model(drop=["model_type"])),
    "auto_map with a custom model type": lambda c: gen(c, model=c.model(
        model_type="refusion", auto_map={"AutoConfig": "custom.Config"})),
    "model_file": lambda c: gen(c, model=c.model(model_file="custom.py")),
    "tokenizer auto_map": lambda c: gen(c, model=tokenizer_auto_map(c)),
    "no tokenizer files": lambda c: gen(c, model=c.model(remove=["tokenizer.json"])),
    "index weight_map a list": lambda c: gen(c, model=with_index(c, {"weight_map": [1]})),
    "index a list": lambda c: gen(c, model=with_index(c, [])),
    "shard is a folder": lambda c: gen(c, model=shard_folder(c)),
    "only pickled weights": lambda c: gen(c, model=pickled_only(c)),
    "model is a file": lambda c: gen(c, model=c.a_file()),
    "model missing": lambda c: gen(c, model=c.path("nowhere")),
    "seed -1 with temp 1": lambda c: gen(c, "--temp", "1", "--seed", "-1"),
    "seed 2**64 with temp 1": lambda c: gen(c, "--temp", "1", "--seed", str(2**64)),
    "temp nan": lambda c: gen(c, "--temp", "nan"),
    "temp inf": lambda c: gen(c, "--temp", "inf"),
    "temp negative": lambda c: gen(c, "--temp", "-1"),
    "slot threshold nan": lambda c: gen(c, "--slot-threshold", "nan"),
    "token threshold inf": lambda c: gen(c, "--token-threshold", "inf"),
    "max tokens 0": lambda c: gen(c, "--max-tokens", "0"),
    "blocks 0": lambda c: gen(c, "--blocks", "0"),
    "slot size negative": lambda c: gen(c, "--slot-size", "-4"),
    "max tokens not a number": lambda c: gen(c, "--max-tokens", "lots"),
    "unknown flag": lambda c: gen(c, "--nucleus", "0.9"),
    "unknown preset": lambda c: gen(c, "--preset", "gsm9k"),
    "unknown dtype": lambda c: gen(c, "--dtype", "float8"),
    "empty prompt": lambda c: gen(c, prompt="   "),
    "prompt with undecodable bytes": lambda c: gen(c, prompt="hi \udcff there"),
    "system prompt with undecodable bytes": lambda c: gen(c, "--system-prompt", "be \udcfe"),
    "stdin not UTF-8": lambda c: (gen(c, prompt="-"), b"hi \xff\xfe there"),
    "prompt longer than the positions": lambda c: gen(c, prompt="the quick brown fox jumps " * 300),
    "adapter_config {}": lambda c: gen(c, "--adapter-path", c.adapters(config={})),
    "adapter_config a list": lambda c: gen(c, "--adapter-path", c.adapters(config=[1, 2])),
    "adapter_config without lora_parameters": lambda c: gen(c, "--adapter-path", c.adapters(
        config={"fine_tune_type": "lora", "num_layers": 2})),
    "adapter rank a string": lambda c: gen(c, "--adapter-path", c.adapters(config={
        "num_layers": 2, "lora_parameters": {"rank": "8", "scale": 2.0, "dropout": 0.0}})),
    "adapter_config not JSON": lambda c: gen(c, "--adapter-path", c.adapters(config="{")),
    "adapters without weights": lambda c: gen(c, "--adapter-path", c.adapters(weights=False)),
    "adapters of another base": lambda c: gen(c, "--adapter-path", c.adapters(mismatch=True)),
    "adapter path missing": lambda c: gen(c, "--adapter-path", c.path("no_adapters")),
    "adapter path a file": lambda c: gen(c, "--adapter-path", c.a_file()),
}


def tokenizer_auto_map(ctx):
    folder = Path(ctx.model())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom.Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def with_index(ctx, index):
    folder = Path(ctx.model())
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


def shard_folder(ctx):
    """An unreadable shard (as root nothing is unreadable by permission: a folder of that name)."""
    folder = Path(ctx.model())
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model-00002-of-00002.safetensors").mkdir()
    return str(folder)


def pickled_only(ctx):
    folder = Path(ctx.model(remove=["model.safetensors"]))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return str(folder)


def conv(ctx, *extra, source=None, out=None):
    return ["--hf-path", source or str(ctx.good_model), "--mlx-path", out or ctx.path("out"), *extra]


CONVERT = {
    "config is a list": lambda c: conv(c, source=c.model(text="[]")),
    "config is null": lambda c: conv(c, source=c.model(text="null")),
    "num_attention_heads 0": lambda c: conv(c, source=c.model(num_attention_heads=0)),
    "eos_token_id a string": lambda c: conv(c, source=c.model(eos_token_id="317")),
    "auto_map with a custom model type": lambda c: conv(c, source=c.model(
        model_type="refusion", auto_map={"AutoModel": "custom.Model"})),
    "unreadable shard": lambda c: conv(c, source=shard_folder(c)),
    "truncated shard": lambda c: conv(c, source=truncated(c)),
    "only pickled weights": lambda c: conv(c, source=pickled_only(c)),
    "source missing": lambda c: conv(c, source=c.path("nowhere")),
    "mlx-path under a file": lambda c: conv(c, out=str(Path(c.a_file()) / "out")),
    "mlx-path in /proc": lambda c: conv(c, out="/proc/refusion-test-out"),
    "mlx-path exists": lambda c: conv(c, out=str(c.root)),
    "mlx-path not a model, --force": lambda c: conv(c, "--force", out=c.jsonl_folder("notmodel", [])),
    "mlx-path is the source": lambda c: conv(c, "--force", out=str(c.good_model)),
    "quantize and dequantize": lambda c: conv(c, "-q", "--dequantize"),
    "q-bits 7": lambda c: conv(c, "-q", "--q-bits", "7"),
    "q-bits without -q": lambda c: conv(c, "--q-bits", "4"),
    "dequantize a float model": lambda c: conv(c, "--dequantize"),
    "max shard size lots": lambda c: conv(c, "--max-shard-size", "lots"),
    "max shard size 0": lambda c: conv(c, "--max-shard-size", "0MB"),
    "unknown dtype": lambda c: conv(c, "--dtype", "float8"),
    "upload repo not a repo id": lambda c: conv(c, "--upload-repo", "a/b/c"),
}


def truncated(ctx):
    folder = Path(ctx.model())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(folder)


def lora(ctx, *extra, model=None, data=None, adapters=None):
    return ["--model", model or str(ctx.good_model), "--train", "--data", data or ctx.data,
            "--adapter-path", adapters or ctx.path("new_adapters"), "--iters", "3", "--batch-size", "2",
            "--steps-per-report", "1", *extra]


def yaml(ctx, text):
    return lora(ctx, "-c", ctx.write("options.yaml", text))


LORA = {
    "yaml max_seq_length lots": lambda c: yaml(c, "max_seq_length: lots\n"),
    "yaml learning_rate fast": lambda c: yaml(c, "learning_rate: fast\n"),
    "yaml lora_parameters a list": lambda c: yaml(c, "lora_parameters: [1, 2]\n"),
    "yaml seed abc": lambda c: yaml(c, "seed: abc\n"),
    "yaml rank a string": lambda c: yaml(c, "lora_parameters: {rank: eight}\n"),
    "yaml keys a string": lambda c: yaml(c, "lora_parameters: {keys: q_proj}\n"),
    "yaml num_layers all": lambda c: yaml(c, "num_layers: all\n"),
    "yaml test a string": lambda c: yaml(c, "test: sure\n"),
    "yaml optimizer_config a list": lambda c: yaml(c, "optimizer_config: [adam]\n"),
    "yaml a list": lambda c: yaml(c, "- 1\n- 2\n"),
    "yaml unknown option": lambda c: yaml(c, "lerning_rate: 0.1\n"),
    "yaml not YAML": lambda c: yaml(c, "a: [1\n"),
    "yaml missing": lambda c: lora(c, "-c", c.path("nowhere.yaml")),
    "adapter-path under a file": lambda c: lora(c, adapters=str(Path(c.a_file()) / "ad")),
    "adapter-path in /proc": lambda c: lora(c, adapters="/proc/refusion-test-adapters"),
    "lora alpha nan": lambda c: lora(c, "--lora-alpha", "nan"),
    "lora dropout 1": lambda c: lora(c, "--lora-dropout", "1"),
    "lora rank 0": lambda c: lora(c, "--lora-rank", "0"),
    "learning rate nan": lambda c: lora(c, "--learning-rate", "nan"),
    "learning rate negative": lambda c: lora(c, "--learning-rate", "-1e-3"),
    "ar fraction 2": lambda c: lora(c, "--ar-fraction", "2"),
    "batch size 0": lambda c: lora(c, "--batch-size", "0"),
    "iters negative": lambda c: lora(c, "--iters", "-5"),
    "seed negative": lambda c: lora(c, "--seed", "-1"),
    "val batches -2": lambda c: lora(c, "--val-batches", "-2"),
    "mask id outside the vocabulary": lambda c: lora(c, model=c.model(mask_token_id=5000)),
    "tokenizer larger than the vocabulary": lambda c: lora(c, model=small_vocabulary(c)),
    "no tokenizer files": lambda c: lora(c, model=c.model(remove=["tokenizer.json"])),
    "train.jsonl not UTF-8": lambda c: lora(c, data=c.jsonl_folder("bad", ROWS_OF_DATA, b'{"query": "\xff"}\n')),
    "train.jsonl not JSON": lambda c: lora(c, data=c.jsonl_folder("bad", ROWS_OF_DATA, b"{oops\n")),
    "no train.jsonl": lambda c: lora(c, data=c.empty_folder("nodata")),
    "resume file missing": lambda c: lora(c, "--resume-adapter-file", c.path("nowhere.safetensors")),
    "loss becomes NaN": lambda c: lora(c, "--learning-rate", "1e30", "--val-batches", "0"),
    "unknown fine-tune type": lambda c: lora(c, "--fine-tune-type", "qlora"),
}


def small_vocabulary(ctx):
    """A model whose embedding has 300 rows under a tokenizer of 320 tokens (chat markers >= 300)."""
    folder = ctx.root / "small_vocab"
    config = tiny_config(vocab_size=300, mask_token_id=299, eos_token_id=299, bos_token_id=299)
    write_checkpoint(folder, config, head_scale=8.0)
    write_tokenizer(folder)
    return str(folder)


def fuse(ctx, *extra, model=None, adapters=None, save=None):
    return ["--model", model or str(ctx.good_model), "--adapter-path", adapters or str(ctx.good_adapters),
            "--save-path", save or ctx.path("fused"), *extra]


FUSE = {
    "save-path under a file": lambda c: fuse(c, save=str(Path(c.a_file()) / "fused")),
    "save-path in /proc": lambda c: fuse(c, save="/proc/refusion-test-fused"),
    "save-path is the base model": lambda c: fuse(c, save=str(c.good_model)),
    "save-path not a model": lambda c: fuse(c, save=c.jsonl_folder("notmodel", [])),
    "adapter_config {}": lambda c: fuse(c, adapters=c.adapters(config={})),
    "adapter_config a list": lambda c: fuse(c, adapters=c.adapters(config=[])),
    "adapters of another base": lambda c: fuse(c, adapters=c.adapters(mismatch=True)),
    "adapter path missing": lambda c: fuse(c, adapters=c.path("nowhere")),
    "model with auto_map": lambda c: fuse(c, model=c.model(model_type="refusion", auto_map={"AutoModel": "x.M"})),
    "model config null": lambda c: fuse(c, model=c.model(text="null")),
    "unknown flag": lambda c: fuse(c, "--gguf"),
}


def evaluate(ctx, *extra, data=None, model=None):
    return ["--model", model or str(ctx.good_model), "--data", data or ctx.data, "--limit", "2",
            "--max-tokens", "16", "--settings", "s=4,b=2", *extra]


EVALUATE = {
    "test.jsonl not UTF-8": lambda c: evaluate(c, data=c.write("t.jsonl", b'{"query": "\xff"}\n')),
    "test.jsonl not JSON": lambda c: evaluate(c, data=c.write("t.jsonl", "{oops\n")),
    "test.jsonl empty": lambda c: evaluate(c, data=c.write("t.jsonl", "\n")),
    "test.jsonl without responses": lambda c: evaluate(c, data=c.write("t.jsonl", '{"query": "q"}\n')),
    "data missing": lambda c: evaluate(c, data=c.path("nowhere")),
    "setting not a number": lambda c: evaluate(c, "--settings", "s=abc"),
    "setting threshold nan": lambda c: evaluate(c, "--settings", "st=nan"),
    "setting unknown key": lambda c: evaluate(c, "--settings", "q=3"),
    "setting slot size 0": lambda c: evaluate(c, "--settings", "s=0,b=3"),
    "limit 0": lambda c: evaluate(c, "--limit", "0"),
    "max tokens 0": lambda c: evaluate(c, "--max-tokens", "0"),
    "plot in a missing folder": lambda c: evaluate(c, "--plot", c.path("no/such/plot.png")),
    "model config null": lambda c: evaluate(c, model=c.model(text="null")),
    # --tasks (lm-evaluation-harness): refused before lm-eval is imported or the model loaded.
    "tasks limit 0": lambda c: ["--model", str(c.good_model), "--tasks", "gsm8k", "--limit", "0"],
    "tasks num-fewshot -1": lambda c: ["--model", str(c.good_model), "--tasks", "gsm8k", "--num-fewshot", "-1"],
    "tasks output in a missing folder": lambda c: ["--model", str(c.good_model), "--tasks", "gsm8k",
                                                   "--output-path", c.path("no/such/out")],
}


def bench(ctx, *extra, model=None):
    return ["--model", model or str(ctx.good_model), *FAST, *extra]


BENCHMARK = {
    "temp nan": lambda c: bench(c, "--temp", "nan"),
    "seed -1 with temp 1": lambda c: bench(c, "--temp", "1", "--seed", "-1"),
    "prompt with undecodable bytes": lambda c: bench(c, "--prompt", "hi \udcff"),
    "slot size 0": lambda c: bench(c, "--slot-size", "0"),
    "config is a list": lambda c: bench(c, model=c.model(text="[]")),
    "model missing": lambda c: bench(c, model=c.path("nowhere")),
    "--model and --shape": lambda c: bench(c, "--shape", "small"),
    "--shape with 0 prompt tokens": lambda c: ["--shape", "small", "--prompt-tokens", "0", *FAST],
    "plan slots -1": lambda c: bench(c, "--plan-slots", "-1"),
    "--break-even without --shape": lambda c: bench(c, "--break-even"),
    "--break-even with an unknown preset": lambda c: ["--shape", "small", "--break-even", "--presets", "nope"],
    "--plan-slots-sweep 0": lambda c: ["--shape", "small", "--break-even", "--plan-slots-sweep", "0"],
    "--min-calls 0": lambda c: ["--shape", "small", "--break-even", "--min-calls", "0"],
}

DEMO_TASKS = {
    "out under a file": lambda c: ["--out", str(Path(c.a_file()) / "splits")],
    "seed not a number": lambda c: ["--out", c.path("splits"), "--seed", "abc"],
    "no --out": lambda c: [],
}

DISPATCHER = {  # python -m refusion_mlx <command>
    "unknown command": lambda c: ["generat", "--prompt", "hi"],
    "generate with temp nan": lambda c: ["generate", *gen(c, "--temp", "nan")],
    "convert with config null": lambda c: ["convert", *conv(c, source=c.model(text="null"))],
}

SERVER = {  # refused before anything listens
    "port out of range": lambda c: ["--model", str(c.good_model), "--port", "99999"],
    "max-concurrency 0": lambda c: ["--model", str(c.good_model), "--max-concurrency", "0"],
    "prefill-step-size -1": lambda c: ["--model", str(c.good_model), "--prefill-step-size", "-1"],
    "model missing": lambda c: ["--model", c.path("nowhere"), "--port", "0"],
    "model config null": lambda c: ["--model", c.model(text="null"), "--port", "0"],
    "unknown flag": lambda c: ["--workers", "4"],
}

SERVE_BENCH = {
    "requests 0": lambda c: ["--model", str(c.good_model), "--requests", "0"],
    "concurrency 0": lambda c: ["--model", str(c.good_model), "--concurrency", "0"],
    "mixed -1": lambda c: ["--model", str(c.good_model), "--mixed", "-1"],
    "long-prompt -1": lambda c: ["--model", str(c.good_model), "--long-prompt", "-1"],
    "model missing (its server does not start)": lambda c: ["--model", c.path("nowhere"), "--requests", "1"],
}

def cached(c, *extra):
    return ["--model", str(c.good_model), "--prompt", "hi", "--prompt-cache-file", c.path("doc.safetensors"), *extra]


CHAT = {
    "model missing": lambda c: ["--model", c.path("nowhere")],
    "max-kv-size 0": lambda c: ["--model", str(c.good_model), "--max-kv-size", "0"],
    "max-kv-size too small for one block": lambda c: ["--model", str(c.good_model), *FAST, "--max-kv-size", "3"],
    "prompt cache file missing": lambda c: ["--model", str(c.good_model), "--prompt-cache-file", c.path("no.safetensors")],
    "prompt cache file not safetensors": lambda c: ["--model", str(c.good_model), "--prompt-cache-file", c.a_file()],
    "temp 3": lambda c: ["--model", str(c.good_model), "--temp", "3"],
}

CACHE_PROMPT = {
    "model missing": lambda c: ["--model", c.path("nowhere"), "--prompt", "hi", "--prompt-cache-file",
                                c.path("doc.safetensors")],
    "max-kv-size 0": lambda c: cached(c, "--max-kv-size", "0"),
    "file exists, no --force": lambda c: ["--model", str(c.good_model), "--prompt", "hi", "--prompt-cache-file",
                                          c.a_file()],
    "folder of the file missing": lambda c: ["--model", str(c.good_model), "--prompt", "hi", "--prompt-cache-file",
                                             c.path("no/such/folder/doc.safetensors")],
    "no --prompt-cache-file": lambda c: ["--model", str(c.good_model), "--prompt", "hi"],
}

TABLES = {
    "generate": GENERATE, "chat": CHAT, "cache_prompt": CACHE_PROMPT, "convert": CONVERT, "lora": LORA,
    "fuse": FUSE, "evaluate": EVALUATE, "benchmark": BENCHMARK, "demo.tasks": DEMO_TASKS, "refusion_mlx": DISPATCHER, "server": SERVER,
    "serve_bench": SERVE_BENCH,
}
ROWS = [pytest.param(entry, name, id=f"{entry}: {name}") for entry, table in TABLES.items() for name in table]
# Run again as real processes (~3 s each, so a few): the classes most likely to leak a library's
# own output (stdin and argv bytes, transformers' length warning, unreadable files, YAML types).
IN_SUBPROCESS = [
    ("generate", "stdin not UTF-8"), ("generate", "prompt with undecodable bytes"),
    ("generate", "prompt longer than the positions"), ("convert", "unreadable shard"),
    ("lora", "yaml max_seq_length lots"),
]


@pytest.fixture(scope="module")
def good_adapters(tmp_path_factory, tiny_path):
    """LoRA adapters for the tiny model, in mlx-lm's layout (as refusion_mlx.lora saves them)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from refusion_mlx import load_model

    folder = tmp_path_factory.mktemp("good_adapters")
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    model = load_model(tiny_path)
    model.freeze()
    linear_to_lora_layers(model, 2, params)
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}))
    return folder


@pytest.fixture
def ctx(tmp_path, tiny_path, good_adapters):
    return Ctx(tmp_path, tiny_path, good_adapters)


def build(ctx, entry, name):
    made = TABLES[entry][name](ctx)
    argv, stdin = made if isinstance(made, tuple) else (made, None)
    return [str(a) for a in argv], stdin


def snapshot(*folders) -> dict:
    """Every path under the folders, with file sizes: a new, removed or rewritten file shows."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                seen[os.path.join(root, name)] = None
            for name in files:
                path = os.path.join(root, name)
                seen[path] = os.path.getsize(path)
    return seen


def check_answer(code, err: str):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith("\n"), err
    assert len(lines[0]) > len("error: ") + 10, err


@pytest.mark.parametrize("entry, name", ROWS)
def test_bad_input_is_one_line_exit_2_and_no_new_files(ctx, entry, name, capfd, monkeypatch):
    argv, stdin = build(ctx, entry, name)
    work = ctx.root / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    main = importlib.import_module(ENTRY_POINTS[entry]).main
    before = snapshot(ctx.root, ctx.good_model, ctx.good_adapters)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    out, err = capfd.readouterr()
    check_answer(code, err)
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_BY_DEFAULT)]
    assert not shown, [str(w.message) for w in shown]
    assert snapshot(ctx.root, ctx.good_model, ctx.good_adapters) == before


def real_argv(arg: str):
    """As a shell passes it: undecodable bytes stay bytes."""
    return arg.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("entry, name", [pytest.param(*row, id=f"{row[0]}: {row[1]}") for row in IN_SUBPROCESS])
def test_bad_input_in_a_real_process(ctx, entry, name):
    argv, stdin = build(ctx, entry, name)
    work = ctx.root / "cwd"
    work.mkdir()
    before = snapshot(ctx.root, ctx.good_model, ctx.good_adapters)
    proc = subprocess.run([sys.executable, "-m", ENTRY_POINTS[entry], *map(real_argv, argv)],
                          input=stdin if stdin is not None else b"", capture_output=True, cwd=work,
                          env=dict(os.environ, PYTHONPATH=with_root_on_path()), timeout=120)
    check_answer(proc.returncode, proc.stderr.decode("utf-8", "replace"))
    assert snapshot(ctx.root, ctx.good_model, ctx.good_adapters) == before


def test_every_entry_point_has_a_table():
    scripts = [line.split("=")[1].strip().strip('"').split(":")[0]
               for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("refusion-")]
    assert scripts and set(scripts) <= set(ENTRY_POINTS.values())
    assert all(len(table) >= 3 for table in TABLES.values())


def limit_file_size(limit: int):
    """For a child: files it writes stop at ``limit`` bytes with EFBIG, as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("entry, fails", [("convert", "writing weights"), ("fuse", "writing weights"),
                                           ("lora", "saving adapters"), ("lora", "compiling a kernel")])
def test_a_full_disk_is_one_line_and_leaves_nothing(ctx, entry, fails, tmp_path_factory, capsys):
    """Writes fail part-way (the file-size limit stands in for a full disk): one line, no
    half-written model, no temporary file (lora: ``.adapters.<pid>.tmp.safetensors``). MLX's CPU
    backend also writes: it compiles kernels under $TMPDIR, which may be on the full disk too."""
    out = str(ctx.root / "out")
    argv = {"convert": lambda: conv(ctx, out=out), "lora": lambda: lora(ctx, "--save-every", "1", adapters=out),
            "fuse": lambda: fuse(ctx, save=out)}[entry]()
    run_env = dict(os.environ, PYTHONPATH=with_root_on_path())
    if fails == "saving adapters":  # the kernels this run needs are compiled and on disk already
        warm = tmp_path_factory.mktemp("warm")
        importlib.import_module(ENTRY_POINTS["lora"]).main(lora(ctx, adapters=str(warm / "a")))
        capsys.readouterr()
    if fails == "compiling a kernel":  # an empty kernel cache: the first training step compiles
        run_env["TMPDIR"] = str(tmp_path_factory.mktemp("empty_tmp"))
    before = snapshot(ctx.root, ctx.good_model, ctx.good_adapters)
    proc = subprocess.run([sys.executable, "-m", ENTRY_POINTS[entry], *argv], capture_output=True, text=True,
                          cwd=ctx.root, env=run_env, timeout=120, preexec_fn=limit_file_size(8000))
    check_answer(proc.returncode, proc.stderr)
    expected = {"writing weights": "cannot write", "saving adapters": "cannot save",
                "compiling a kernel": "could not compile"}[fails]
    assert expected in proc.stderr
    assert snapshot(ctx.root, ctx.good_model, ctx.good_adapters) == before
