"""Tensor parallelism: two processes over MLX's ring backend on this machine decode exactly
as one process does, and a bad launch ends every rank with one line instead of a hang.

The ranks are started here with a hostfile on 127.0.0.1 and free ports (what ``mlx.launch
--backend ring -n 2`` does), except in the test of the documented ``mlx.launch`` command.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import tiny_config, write_checkpoint, write_tokenizer
from conftest import ROOT, with_root_on_path

pytestmark = pytest.mark.skipif(not mx.distributed.is_available(), reason="MLX built without mx.distributed")

WORKER = Path(__file__).parent / "distributed_worker.py"
LAUNCH_TIMEOUT = 240  # seconds for a whole launch; a hang fails the test instead of stalling CI


def free_ports(n: int):
    """``n`` ports nobody listens on now, from the kernel."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def spawn_ranks(tmp_path, args, ranks=(0, 1), size=2, ports=None, **env):
    """``python ARGS`` started as the given ranks of a ``size``-rank ring on localhost (Popen each)."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports or free_ports(size)]))
    base = dict(os.environ, PYTHONPATH=with_root_on_path(), MLX_HOSTFILE=str(hostfile), **env)
    return [subprocess.Popen([sys.executable, *args], env=dict(base, MLX_RANK=str(r)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in ranks]


def start_ranks(tmp_path, args, ranks=(0, 1), size=2, **env):
    """Run ``python ARGS`` as the given ranks of a ``size``-rank ring on localhost; the
    (returncode, stdout, stderr) of each, in rank order. Every rank is killed at the timeout."""
    procs = spawn_ranks(tmp_path, args, ranks, size, **env)
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture(scope="module")
def tiny_4bit(tiny_path, tmp_path_factory):
    """The tiny checkpoint at 4 bits, groups of 32 (each rank's half of o_proj's 64 inputs is one group)."""
    import contextlib
    import io

    from refusion_mlx.convert import convert

    target = tmp_path_factory.mktemp("q4") / "tiny_4bit"
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's "[INFO] Quantized" line
        convert(str(tiny_path), str(target), quantize=True, q_bits=4, q_group_size=32)
    return target


def test_two_ranks_take_the_single_process_decisions(tmp_path, tiny_path, tiny_4bit):
    """float32 and 4-bit: plan-and-infill, left to right and batches give one process's tokens."""
    from distributed_worker import PROMPTS, decode_all

    from refusion_mlx import load_model

    checkpoints = [tiny_path, tiny_4bit]
    out = start_ranks(tmp_path, [str(WORKER), str(tmp_path), *map(str, checkpoints)])
    for rank, (code, _, err) in enumerate(out):
        assert code == 0, f"rank {rank} failed: {err[-2000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    for checkpoint, run0, run1 in zip(checkpoints, ranks[0]["runs"], ranks[1]["runs"]):
        assert "KV heads 0-0 of 2" in run0["shard"] and "KV heads 1-1 of 2" in run1["shard"]
        # Bit-identical logits on both ranks (the all-reduce hands both the same sums) ...
        assert run0["logits"] == run1["logits"]
        # ... equal to the unsplit model's up to the order of the sums.
        model = load_model(checkpoint, dtype="float32")
        whole = np.array(model(mx.array([PROMPTS[2]])).tolist())
        np.testing.assert_allclose(np.array(run0["logits"]), whole, rtol=1e-4, atol=1e-5 * np.abs(whole).max())
        single = decode_all(model)
        for run in (run0, run1):
            for decoder, tokens in single.items():
                assert run[decoder] == tokens, (checkpoint.name, decoder)


def test_generate_under_mlx_launch_prints_once(tmp_path, tiny_path, tiny_tokenizer_model):
    """The README's command: rank 0 prints the single process's text, rank 1 nothing; --verbose
    has each rank name its shard on stderr."""
    from refusion_mlx import generate

    # mlx's own script, installed beside the interpreter (a venv, pyenv) or on PATH.
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    assert launcher, "mlx.launch (installed with mlx) is neither beside python nor on PATH"
    knobs = dict(gen_length=12, slot_size=4, serial_num_blocks=1, token_threshold=0.1)
    alone = generate(*tiny_tokenizer_model, "the quick brown", use_chat_template=False, **knobs)
    port = next(p for p in iter(lambda: free_ports(1)[0], None) if _port_free(p + 1))  # mlx.launch: p, p+1
    env = dict(os.environ, PYTHONPATH=with_root_on_path())
    launched = subprocess.run(
        [launcher, "--backend", "ring", "-n", "2", "--starting-port", str(port), "--", sys.executable, "-m",
         "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "the quick brown", "--ignore-chat-template",
         "-m", "12", "--slot-size", "4", "--blocks", "1", "--token-threshold", "0.1", "--verbose"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=LAUNCH_TIMEOUT)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.split("==========")[0] == alone + "\n"  # printed once, by rank 0
    assert "rank 0 of 2: KV heads 0-0 of 2" in launched.stderr
    assert "rank 1 of 2: KV heads 1-1 of 2" in launched.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_rank_count_that_does_not_split_the_kv_heads_is_one_line_on_every_rank(tmp_path):
    path = write_checkpoint(tmp_path / "one_kv_head", tiny_config(num_key_value_heads=1), seed=0)
    write_tokenizer(path)
    out = start_ranks(tmp_path, ["-m", "refusion_mlx.generate", "--model", str(path), "--prompt", "hi"])
    for code, stdout, stderr in out:
        assert code == 2 and stdout == ""
        assert stderr.strip().splitlines() == [
            "error: 2 ranks cannot split the model's 1 KV heads evenly; run on a number of ranks that divides 1"]


def test_a_missing_peer_is_one_line_and_an_exit_not_a_hang(tmp_path, tiny_path):
    """Rank 0 of two, started alone, gives up after REFUSION_CONNECT_TIMEOUT seconds."""
    [(code, stdout, stderr)] = start_ranks(
        tmp_path, ["-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "hi"], ranks=(0,),
        REFUSION_CONNECT_TIMEOUT="2")
    assert code != 0 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: rank 0 could not reach every peer within 2 s")


def test_the_server_across_two_ranks_answers_as_one_process(tmp_path, tiny_path, tiny_tokenizer_model):
    """Rank 0 serves concurrent requests (one batch) with the single process's text; SIGTERM to
    rank 0 stops both ranks cleanly."""
    import signal
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from refusion_mlx import generate

    prompts = ["the quick brown", "def add", "12 + 34"]
    knobs = dict(max_tokens=12, slot_size=4, blocks=1, token_threshold=0.1)
    *ring, port = free_ports(3)  # one call: three different ports
    procs = spawn_ranks(tmp_path, ["-m", "refusion_mlx.server", "--model", str(tiny_path), "--port", str(port)],
                        ports=ring)
    try:
        ready = threading.Event()
        first = []
        threading.Thread(target=lambda: (first.append(procs[0].stdout.readline()), ready.set()), daemon=True).start()
        assert ready.wait(LAUNCH_TIMEOUT) and first[0].startswith("serving"), first

        def ask(prompt):
            body = json.dumps({"prompt": prompt, **knobs}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=LAUNCH_TIMEOUT) as reply:
                return json.loads(reply.read())["choices"][0]["text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(ask, prompts))
        alone = [generate(*tiny_tokenizer_model, p, use_chat_template=False, gen_length=12, slot_size=4,
                          serial_num_blocks=1, token_threshold=0.1) for p in prompts]
        assert texts == alone

        procs[0].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-1000:] for _, err in outputs]
        assert outputs[1][0] == ""  # rank 1 printed nothing
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
