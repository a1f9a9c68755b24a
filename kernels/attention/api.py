"""Public block-attention op (one ring step, or one KV shard in decode). Contract: reference.py.

On a GPU backend (see backend.use_gpu_kernels) it runs tokamax's Mosaic GPU flash attention
(tokamax_gpu.py). Unsupported inputs (e.g. fp32) raise NotImplementedError there: with kernels="auto" we
log the reason once and run the jnp reference; with kernels="gpu" the error propagates.
"""

from __future__ import annotations

import functools
import logging

from ..backend import use_gpu_kernels
from . import reference
from .reference import merge_partials, merge_stacked  # noqa: F401  (part of the public surface)


@functools.cache
def _log_fallback(reason: str) -> None:
    logging.getLogger(__name__).warning("attention: GPU kernel unavailable (%s); running the jnp reference", reason)


def attention_block(q, k, v, q_pos, k_pos, *, scale=None, causal=True, kernels="auto"):
    """Returns (out [B, Tq, Hq, D] fp32, lse [B, Hq, Tq] fp32)."""
    if use_gpu_kernels(kernels):
        from . import tokamax_gpu

        try:
            return tokamax_gpu.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=causal)
        except NotImplementedError as e:
            if kernels == "gpu":
                raise
            _log_fallback(str(e))
    return reference.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=causal)
