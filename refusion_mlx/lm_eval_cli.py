"""lm-evaluation-harness's own command line, with ReFusion registered as the model ``refusion``.

    python -m refusion_mlx.lm_eval_cli --model refusion --model_args model=demo,decoder=left-to-right \\
        --tasks gsm8k_cot --limit 10 --apply_chat_template

Every lm-eval flag works as with ``lm-eval``; ``--model_args`` takes ``lm_eval_model.RefusionLM``'s
arguments (model, decoder, preset, max_tokens, slot_size, blocks, slot_threshold,
token_threshold, batch_size). lm-eval has no plugin hook for models, so this is the route:
import ``refusion_mlx.lm_eval_model`` (which registers the model), then run lm-eval's CLI.
"""

import sys
from typing import Optional, Sequence

from .errors import RefusionError


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .eval_tasks import require_lm_eval

    try:
        require_lm_eval()
        from . import lm_eval_model  # noqa: F401  (registers "refusion")
        from lm_eval.__main__ import cli_evaluate

        if argv is not None:
            sys.argv = ["lm-eval", *argv]
        cli_evaluate()
    except RefusionError as e:  # a bad model argument: one line, as our own commands say it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
