"""The paper's per-benchmark knob settings (upstream eval.sh), by name.

A preset sets slots, blocks and thresholds; its 512 tokens are fitted to the model's positions
like any length nobody asked for explicitly (``decode.settings_for``). Defaults without a preset
are ``decode.DecodeSettings``'s, or the model's own ``generation_config.json``.
"""

from typing import Dict

PRESETS: Dict[str, dict] = {
    "gsm8k": dict(slot_size=32, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.4),
    "math": dict(slot_size=32, serial_num_blocks=8, slot_threshold=0.8, token_threshold=0.6),
    "mbpp": dict(slot_size=32, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.3),
    "humaneval": dict(slot_size=32, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.4),
    "gpqa": dict(slot_size=8, serial_num_blocks=32, slot_threshold=0.8, token_threshold=0.2),
    "arc": dict(slot_size=8, serial_num_blocks=64, slot_threshold=0.8, token_threshold=0.1),
    "mmlu-pro": dict(slot_size=16, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.4),
}
for _knobs in PRESETS.values():
    _knobs["gen_length"] = 512  # every benchmark of the paper generates 512 tokens
