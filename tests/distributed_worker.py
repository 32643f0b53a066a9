"""One rank of tests/test_distributed.py: load a checkpoint split across the ranks, decode.

    python tests/distributed_worker.py OUT_DIR CHECKPOINT...   (started by the test, once per rank)

Each rank writes OUT_DIR/rank<r>.json with, per checkpoint, its shard, the logits of one
forward and the tokens of the decoders (``decode_all``, as the single process computes
them), so the test can check that every rank took the same decisions as one process.
"""

import json
import sys
from pathlib import Path

PROMPTS = [[316, 84, 82, 266], [316, 90, 77], [316, 70, 71, 72, 73, 74]]
PLAN = dict(gen_length=32, slot_size=4, serial_num_blocks=2, temperature=0.0)
AR_TOKENS = 24


def decode_all(model) -> dict:
    """The three decoders' tokens (greedy) on fixed prompts: one process or one rank."""
    from refusion_mlx import batch_generate_ids, generate_ar_ids, generate_ids

    return {
        "plan-and-infill": generate_ids(model, PROMPTS[0], **PLAN).tokens,
        "left-to-right": generate_ar_ids(model, PROMPTS[1], max_tokens=AR_TOKENS).tokens,
        "batch": [r.tokens for r in batch_generate_ids(model, PROMPTS, **PLAN)],
        "batch-left-to-right": [r.tokens for r in batch_generate_ids(model, PROMPTS, decoder="left-to-right",
                                                                      gen_length=AR_TOKENS)],
    }


def main(out_dir: str, *checkpoints: str) -> int:
    import mlx.core as mx

    from refusion_mlx.distributed import barrier, connect, describe_shard
    from refusion_mlx.loading import load_model

    group = connect()
    runs = []
    for checkpoint in checkpoints:
        model = load_model(checkpoint, dtype="float32", group=group)
        barrier(group)
        logits = model(mx.array([PROMPTS[2]])).tolist()
        runs.append({"shard": describe_shard(model), "logits": logits, **decode_all(model)})
    result = {"rank": group.rank(), "size": group.size(), "runs": runs}
    (Path(out_dir) / f"rank{group.rank()}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
