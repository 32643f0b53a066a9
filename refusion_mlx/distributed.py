"""One model across several processes: tensor parallelism over ``mx.distributed``.

    mlx.launch --backend ring -n 2 -- python -m refusion_mlx.generate --prompt "..."

Every rank loads only its shard of the layers (``Model.shard``, MLX's sharded linears, as
mlx-lm's Qwen3) and runs the whole decoder. The all-reduces leave the same hidden states,
hence the same logits, on every rank, so every rank takes the same decisions with no
further messages (measured: examples/perf/distributed_identity.py). What is not computed
from logits (a random seed, a server's requests) rank 0 decides and sends to the others
(``broadcast_json``). Rank 0 prints and serves; the others follow silently.

Connecting is the one step MLX may wait on forever (a peer that never starts), holding the
interpreter, so a separate watchdog process ends the wait: one line and a non-zero exit.
A peer lost later makes MLX raise ("connection to a peer was lost"): one line too.
"""

import json
import os
import subprocess
import sys
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import RefusionError

# Set by mlx.launch (ring, jaccl) or by mpirun: this process is one rank of several.
LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")
TIMEOUT_VARIABLE = "REFUSION_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 120.0  # seconds to reach every peer (their loading comes later)

# Run by a child interpreter: wait for the parent to close our stdin; past the deadline,
# say why and end the parent, which is stuck in MLX's connect with the interpreter held.
_WATCHDOG = """
import os, select, signal, sys
ready = select.select([sys.stdin], [], [], float(sys.argv[1]))[0]
if not ready:
    sys.stderr.write(sys.argv[3] + "\\n")
    sys.stderr.flush()
    os.kill(int(sys.argv[2]), signal.SIGKILL)
"""


def launched_backend() -> str:
    """The backend ``mlx.launch`` (or mpirun) set this process up for, from its environment.

    Named, not ``"any"``: MLX tries every backend it has and takes the first that starts, and an
    MPI library on the machine could then start as a group of one, quietly running alone.
    """
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        return "mpi"
    if "MLX_JACCL_COORDINATOR" in os.environ or "MLX_IBV_DEVICES" in os.environ:
        return "jaccl"
    if "MLX_HOSTFILE" in os.environ:
        return "ring"
    return "any"


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch, mpirun)."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def check_stdin_unused(reads_stdin: bool, what: str):
    """Refuse to read standard input as one of several ranks: mlx.launch copies what is typed
    to every rank but never passes the end of the input on, so every rank would wait forever."""
    if reads_stdin and launched():
        raise RefusionError(f"{what} reads standard input, which mlx.launch never closes; "
                            "give the text as an argument when running on several ranks")


def connect_timeout() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RefusionError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r}")
    return value


def connect() -> Optional[mx.distributed.Group]:
    """The group of all ranks when launched as several processes, else None (one process).

    Waits at most ``REFUSION_CONNECT_TIMEOUT`` seconds (default 120) for the peers; past
    that the process prints one ``error:`` line and is killed (exit status 137).
    """
    if not launched():
        return None
    timeout = connect_timeout()
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (f"error: rank {rank} could not reach every peer within {timeout:g} s "
               f"(is every rank started, with the same hostfile? {TIMEOUT_VARIABLE} sets the wait)")
    watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(timeout), str(os.getpid()),
                                 message], stdin=subprocess.PIPE)
    try:
        group = mx.distributed.init(strict=True, backend=launched_backend())
    except RuntimeError as e:
        raise RefusionError(f"cannot start the distributed group: {e}") from None
    finally:
        watchdog.stdin.close()  # end of file: the watchdog leaves quietly
        watchdog.wait()
    return group if group.size() > 1 else None


def barrier(group: Optional[mx.distributed.Group]):
    """Wait for every rank (after loading: a rank that failed has left, and this raises)."""
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group, stream=mx.cpu))


def is_leader(group: Optional[mx.distributed.Group]) -> bool:
    """Rank 0 (or the only process): the one that prints and serves."""
    return group is None or group.rank() == 0


def follow_quietly(group: Optional[mx.distributed.Group]):
    """On every rank but 0, standard output goes nowhere (errors still reach stderr)."""
    if not is_leader(group):
        sys.stdout = open(os.devnull, "w")


def broadcast_json(value, group: Optional[mx.distributed.Group]):
    """Rank 0's ``value`` (JSON-able) on every rank; the others' ``value`` is ignored."""
    if group is None:
        return value
    leader = group.rank() == 0
    data = json.dumps(value).encode() if leader else b""
    size = mx.distributed.all_sum(mx.array(len(data), dtype=mx.int32), group=group, stream=mx.cpu).item()
    buffer = mx.array(np.frombuffer(data, dtype=np.uint8)) if leader else mx.zeros((size,), dtype=mx.uint8)
    received = mx.distributed.all_sum(buffer, group=group, stream=mx.cpu)
    return json.loads(bytes(memoryview(received)).decode())


def shared_seed(seed: Optional[int], group: Optional[mx.distributed.Group]) -> Optional[int]:
    """``seed``, or when None and several ranks sample, one random seed drawn by rank 0 for all."""
    if group is None or seed is not None:
        return seed
    return broadcast_json(int.from_bytes(os.urandom(4), "little"), group)


def ranks_note(group: Optional[mx.distributed.Group]) -> str:
    """``"; tensor-parallel across N ranks"`` for a report's header; empty for one process."""
    return "" if group is None else f"; tensor-parallel across {group.size()} ranks"


def describe_shard(model) -> str:
    """Which part of the model this rank holds, for --verbose."""
    group = getattr(model, "group", None)
    args = model.args
    if group is None:
        return "one process: the whole model"
    r, n = group.rank(), group.size()

    def part(total):
        share = total // n
        return f"{r * share}-{(r + 1) * share - 1} of {total}"

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return (f"rank {r} of {n}: KV heads {part(args.num_key_value_heads)}, query heads "
            f"{part(args.num_attention_heads)}, MLP units {part(args.intermediate_size)} in each of "
            f"{args.num_hidden_layers} layers; embedding, norms and head whole; "
            f"{weights / 1e6:.1f} MB of weights here")


def take_part(model, group: Optional[mx.distributed.Group], verbose: bool = False):
    """After every rank has built its shard: wait for all, say which shard with ``verbose``
    (stderr, every rank), and silence the followers' standard output."""
    if group is None:
        return
    barrier(group)
    if verbose:
        print(describe_shard(model), file=sys.stderr, flush=True)
    follow_quietly(group)


def load_for_command(path_or_repo, adapter_path=None, dtype=None, verbose: bool = False):
    """``loading.load`` for a command line that may be one rank of several: (model, tokenizer, group).

    Launched by ``mlx.launch`` (or mpirun), it joins the other ranks, loads this rank's shard
    and returns once every rank has; on ranks other than 0 standard output is then silenced.
    Started alone, it is ``load``, and ``group`` is None.
    """
    from .loading import load

    group = connect()
    model, tokenizer = load(path_or_repo, adapter_path=adapter_path, dtype=dtype, group=group)
    take_part(model, group, verbose)
    return model, tokenizer, group
