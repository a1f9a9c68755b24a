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


VISIBLE = ("auto", "diagonal", "all")


def attention_block(q, k, v, q_pos, k_pos, *, scale=None, causal=True, kernels="auto", visible="auto"):
    """Returns (out [B, Tq, Hq, D] fp32, lse [B, Hq, Tq] fp32).

    `visible` is a promise by the caller about the positions, which lets a GPU backend compile one mask
    form instead of choosing among several at run time (each choice is a compiled kernel):
      "diagonal": causal, q_pos == k_pos, one contiguous ascending run, no empty slot (a ring's diagonal);
      "all":      every key visible to every query (no empty slot, and not causal or all keys earlier);
      "auto":     no promise; the backend inspects the positions.
    The result is the same either way when the promise holds (the jnp path always masks by position);
    tests/test_ring_attention.py checks the ring's promises against the run-time chooser."""
    if visible not in VISIBLE:
        raise ValueError(f"visible={visible!r}; expected one of {VISIBLE}")
    if use_gpu_kernels(kernels):
        from . import tokamax_gpu

        try:
            return tokamax_gpu.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=causal,
                                               path={"auto": "auto", "diagonal": "causal", "all": "plain"}[visible])
        except NotImplementedError as e:
            if kernels == "gpu":
                raise
            _log_fallback(str(e))
    return reference.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=causal)
