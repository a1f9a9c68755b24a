"""FP8 matmuls with block-scaled e4m3 weights (the released Qwen3.5 FP8 checkpoints): api.py, reference.py."""
