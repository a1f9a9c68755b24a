"""Public block-attention op (one ring step, or one KV shard in decode). Contract: reference.py."""

from __future__ import annotations

from ..backend import use_gpu_kernels
from . import reference
from .reference import merge_partials, merge_stacked  # noqa: F401  (part of the public surface)


def attention_block(q, k, v, q_pos, k_pos, *, scale=None, causal=True, kernels="auto"):
    """Returns (out [B, Tq, Hq, D] fp32, lse [B, Hq, Tq] fp32)."""
    use_gpu_kernels(kernels)
    return reference.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=causal)
