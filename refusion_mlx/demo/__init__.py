"""The demo model's ingredients: synthetic instruction tasks with exact-match answers, a small
byte-level BPE tokenizer with Qwen's special tokens, and a blank Qwen3 checkpoint to train from."""
