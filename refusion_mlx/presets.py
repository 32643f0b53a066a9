"""Knob settings with names: the paper's per-benchmark presets and the defaults without one."""

from typing import Dict

# The paper's evaluation settings (upstream eval.sh): slot size, blocks, thresholds; 512 tokens.
PRESETS: Dict[str, dict] = {
    "gsm8k": dict(slot_size=32, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.4),
    "math": dict(slot_size=32, serial_num_blocks=8, slot_threshold=0.8, token_threshold=0.6),
    "mbpp": dict(slot_size=32, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.3),
    "humaneval": dict(slot_size=32, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.4),
    "gpqa": dict(slot_size=8, serial_num_blocks=32, slot_threshold=0.8, token_threshold=0.2),
    "arc": dict(slot_size=8, serial_num_blocks=64, slot_threshold=0.8, token_threshold=0.1),
    "mmlu-pro": dict(slot_size=16, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.4),
}
PRESET_GEN_LENGTH = 512
# Without a preset (CLI and text API): upstream generate.py's example settings.
DEFAULTS = dict(gen_length=512, slot_size=4, serial_num_blocks=32, slot_threshold=0.6, token_threshold=0.3)
# For the packaged demo model (max_position_embeddings 512, answers under 200 tokens): the
# setting of row 2 of its benchmark (README): 95% at 2.28x left-to-right on CPU, 7.9x on GPU.
DEMO_DEFAULTS = dict(gen_length=256, slot_size=8, serial_num_blocks=4, slot_threshold=0.9, token_threshold=0.5)
